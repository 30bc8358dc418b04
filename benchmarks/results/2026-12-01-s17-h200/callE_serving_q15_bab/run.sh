# session 17 call E (H200), typed inline right after call D on the same lease (vLLM already staged), code as committed
# (no direct launches): Qwen1.5-MoE-A2.7B (spread gates) engines Marlin, mixed 3.25, Marlin (the other order of call C).
export PYTHONUNBUFFERED=1; . /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh; export PYTHONPATH=.:$PYTHONPATH
R=$OUT; mkdir -p $R/q15
OUT=$R/q15 timeout 560 python3 benchmarks/gpu_serving_check.py all x x --config qwen1.5-moe-a2.7b --skip-accuracy \
  --batches 16 --latency-batches "" --variants gptq4_marlin,mxmoe_mixed325,gptq4_marlin --repeats 5 --prefill both \
  --prefill-step-batches 16,64 --spread-routers > $R/q15/serving.txt 2>&1
grep -h "RESULT" $R/q15/serving.txt | cut -c1-190
cd $R && tar czf kE.tgz q15 && rm -rf q15
