# session 17 call C (H200): Qwen1.5-MoE-A2.7B (spread gates) served, engines mixed 3.25 (direct launches), Marlin, mixed 3.25
# with MXMOE_DIRECT_LAUNCH=0. Batch 16 throughput (median of 5, cached and fresh prompts) and the prefill step alone
# (one token out of new prompts, median of 9) at batch 16 and 64.
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
R=$OUT; mkdir -p $R/q15
OUT=$R/q15 timeout 585 python3 benchmarks/gpu_serving_check.py all x x --config qwen1.5-moe-a2.7b --skip-accuracy \
  --batches 16 --latency-batches "" --variants mxmoe_mixed325,gptq4_marlin,mxmoe_mixed325@MXMOE_DIRECT_LAUNCH=0 \
  --repeats 5 --prefill both --prefill-step-batches 16,64 --spread-routers > $R/q15/serving.txt 2>&1
echo rc $?
grep -h "RESULT" $R/q15/serving.txt | cut -c1-190
grep -h "Traceback\|Error" $R/q15/*.txt | sort | uniq -c | head
cd $R && tar czf kC.tgz q15 && rm -rf q15
