# session 16 call A (H200 x2), code 19aeae2 (32-row decode tiles; 3-bit layers keep them up to 128 rows).
# Qwen3-30B-A3B served on both GPUs, engines in opposite order, median of 5 runs, prompts cached and fresh.
# GPU0: Marlin then mixed 3.25. GPU1: mixed 3.25, Marlin, then vLLM bf16.
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
R=$OUT; mkdir -p $R/g0 $R/g1
( export CUDA_VISIBLE_DEVICES=0 OUT=$R/g0
  timeout 560 python3 benchmarks/gpu_serving_check.py all x x --config qwen3-30b-a3b --skip-accuracy --latency-batches 1 \
     --variants gptq4_marlin,mxmoe_mixed325 --repeats 5 --prefill both > $OUT/serving_q3.txt 2>&1; echo q3a rc $?
) &
J0=$!
( export CUDA_VISIBLE_DEVICES=1 OUT=$R/g1; sleep 20
  timeout 560 python3 benchmarks/gpu_serving_check.py all x x --config qwen3-30b-a3b --skip-accuracy --latency-batches 1 \
     --variants mxmoe_mixed325,gptq4_marlin,bf16 --repeats 5 --prefill both > $OUT/serving_q3.txt 2>&1; echo q3b rc $?
) &
J1=$!
wait $J0 $J1
grep -h "RESULT" $R/g*/serving_*.txt | grep -v engine_start | sed 's/ wall=.*runs=/ runs=/' | cut -c1-170
grep -h "Traceback\|Error" $R/g*/*.txt | sort | uniq -c | head
cd $R && tar czf kA.tgz g0 g1 && rm -rf g0 g1
