# session 15 call 4 (H200 x2), after the 32-row decode tile.
# GPU0: baselines (Zipf routing): ours w4g128 and mixed 3.25 against vLLM Marlin and bf16, 4 shapes, 16-512 tokens.
# GPU1: Qwen1.5-MoE-A2.7B served (Marlin, mixed 3.25, w4g128).
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
R=$OUT; mkdir -p $R/g0 $R/g1
( export CUDA_VISIBLE_DEVICES=0 OUT=$R/g0
  timeout 330 python3 benchmarks/baselines.py --shapes qwen1.5-moe,qwen3-30b-a3b,deepseek-v2-lite,mixtral-8x7b \
     --ours w4g128,mixed3.25 --tokens 16,64,128,256,512 --budget-s 280 --procs 12 > $OUT/log.txt 2>&1; echo base rc $?
) &
J0=$!
( export CUDA_VISIBLE_DEVICES=1 OUT=$R/g1
  timeout 500 python3 benchmarks/gpu_serving_check.py all x x --config qwen1.5-moe-a2.7b --skip-accuracy --latency-batches 1 \
     --variants gptq4_marlin,mxmoe_mixed325,mxmoe_w4g128 --repeats 3 --prefill both --spread-routers > $OUT/serving_q15.txt 2>&1
  echo q15 rc $?
) &
J1=$!
wait $J0 $J1
grep -h "RESULT" $R/g1/serving_*.txt | grep -v engine_start | sed 's/ wall=.*runs=/ runs=/' | cut -c1-160
grep -v "^warm" $R/g0/baselines.txt 2>/dev/null | cut -c1-160
grep -h "Traceback\|Error" $R/g*/*.txt | sort | uniq -c | head
cd $R && tar czf k4.tgz g0 g1 && rm -rf g0 g1
