# session 15 call 1 (H200 x2): served throughput after the eager-step host cut, median of 3 runs, prompts cached
# (as before) and fresh (whole prefill, like vllm bench throughput). GPU0: Qwen3-30B-A3B, then the host-time
# benchmark with real launches (ours, Marlin, bf16). GPU1: DeepSeek-V2-Lite with spread gates.
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
R=$OUT; mkdir -p $R/g0 $R/g1
( export CUDA_VISIBLE_DEVICES=0 OUT=$R/g0
  timeout 430 python3 benchmarks/gpu_serving_check.py all x x --config qwen3-30b-a3b --skip-accuracy --latency-batches 1 \
     --variants gptq4_marlin,mxmoe_mixed325 --repeats 3 --prefill both > $OUT/serving_q3.txt 2>&1; echo q3 rc $?
  timeout 130 python3 benchmarks/host_overhead.py --device cuda --shape qwen3-30b-a3b --assign mixed3.25 \
     --tokens 16,256,2048,8192 --baselines > $OUT/host.txt 2>&1; echo host rc $?
) &
J0=$!
( export CUDA_VISIBLE_DEVICES=1 OUT=$R/g1
  timeout 560 python3 benchmarks/gpu_serving_check.py all x x --config deepseek-v2-lite --skip-accuracy --latency-batches 1 \
     --variants gptq4_marlin,mxmoe_mixed325,mxmoe_w4g128 --repeats 3 --prefill both --spread-routers > $OUT/serving_ds.txt 2>&1
  echo ds rc $?
) &
J1=$!
wait $J0 $J1
grep -h "RESULT" $R/g*/serving_*.txt | cut -c1-220
grep -v "^$" $R/g0/host.txt | grep -v Warning | tail -20
grep -h "Traceback\|Error" $R/g*/*.txt | sort | uniq -c | head
cd $R && tar czf k1.tgz g0 g1 && rm -rf g0 g1
