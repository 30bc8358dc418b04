# session 18 call 8 (H200): Qwen1.5-MoE-A2.7B (spread gates) served: Marlin, mixed 3.25 (fused SiLU), Marlin (the other order of call 7);
# batch 16 throughput, median of 5, cached and fresh prompts.
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
R=$OUT; mkdir -p $R/q15
OUT=$R/q15 timeout 585 python3 benchmarks/gpu_serving_check.py all x x --config qwen1.5-moe-a2.7b --skip-accuracy \
  --batches 16 --latency-batches "" --variants gptq4_marlin,mxmoe_mixed325,gptq4_marlin \
  --repeats 5 --prefill both --spread-routers > $R/q15/serving.txt 2>&1
echo rc $?
grep -h "RESULT" $R/q15/serving.txt | cut -c1-190
grep -h "Traceback\|Error" $R/q15/*.txt | sort | uniq -c | head
cd $R && tar czf k8.tgz q15 && rm -rf q15
