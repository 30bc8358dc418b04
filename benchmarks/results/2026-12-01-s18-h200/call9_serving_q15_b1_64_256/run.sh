# session 18 call 9 (H200): Qwen1.5-MoE-A2.7B (spread gates) served: mixed 3.25 (fused SiLU), Marlin at batches 1, 64, 256;
# throughput, median of 3, cached and fresh prompts.
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
R=$OUT; mkdir -p $R/q15
OUT=$R/q15 timeout 560 python3 benchmarks/gpu_serving_check.py all x x --config qwen1.5-moe-a2.7b --skip-accuracy \
  --batches 1,64,256 --latency-batches "" --variants mxmoe_mixed325,gptq4_marlin \
  --repeats 3 --prefill both --spread-routers > $R/q15/serving.txt 2>&1
echo rc $?
grep -h "RESULT" $R/q15/serving.txt | cut -c1-190
grep -h "Traceback\|Error" $R/q15/*.txt | sort | uniq -c | head
cd $R && tar czf k9.tgz q15 && rm -rf q15
