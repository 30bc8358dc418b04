# session 18 call 11 (H200): Qwen3-30B-A3B served: mixed 3.25 (fused SiLU), Marlin at batches 16, 64;
# throughput, median of 3, cached prompts.
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
R=$OUT; mkdir -p $R/q3
OUT=$R/q3 timeout 500 python3 benchmarks/gpu_serving_check.py all x x --config qwen3-30b-a3b --skip-accuracy \
  --batches 16,64 --latency-batches "" --variants mxmoe_mixed325,gptq4_marlin \
  --repeats 3 --prefill cached > $R/q3/serving.txt 2>&1
echo rc $?
grep -h "RESULT" $R/q3/serving.txt | cut -c1-190
grep -h "Traceback\|Error" $R/q3/*.txt | sort | uniq -c | head
cd $R && tar czf k11.tgz q3 && rm -rf q3
