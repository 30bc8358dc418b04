# session 16 call C (H200 x2), code 19aeae2. Engine order, A-B-A: GPU0 DeepSeek-V2-Lite (spread gates) Marlin, mixed 3.25,
# Marlin; GPU1 Qwen1.5-MoE-A2.7B (spread gates) mixed 3.25, Marlin, mixed 3.25. Median of 5 runs, prompts cached and fresh.
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
R=$OUT; mkdir -p $R/g0 $R/g1
( export CUDA_VISIBLE_DEVICES=0 OUT=$R/g0
  timeout 575 python3 benchmarks/gpu_serving_check.py all x x --config deepseek-v2-lite --skip-accuracy --latency-batches 1 \
     --variants gptq4_marlin,mxmoe_mixed325,gptq4_marlin --repeats 5 --prefill both --spread-routers > $OUT/serving_ds.txt 2>&1
  echo ds rc $?
) &
J0=$!
( export CUDA_VISIBLE_DEVICES=1 OUT=$R/g1; sleep 20
  timeout 555 python3 benchmarks/gpu_serving_check.py all x x --config qwen1.5-moe-a2.7b --skip-accuracy --latency-batches 1 \
     --variants mxmoe_mixed325,gptq4_marlin,mxmoe_mixed325 --repeats 5 --prefill both --spread-routers > $OUT/serving_q15.txt 2>&1
  echo q15 rc $?
) &
J1=$!
wait $J0 $J1
grep -h "RESULT" $R/g*/serving_*.txt | grep -v engine_start | sed 's/ wall=.*runs=/ runs=/' | cut -c1-170
grep -h "Traceback\|Error" $R/g*/*.txt | sort | uniq -c | head
cd $R && tar czf kC.tgz g0 g1 && rm -rf g0 g1
