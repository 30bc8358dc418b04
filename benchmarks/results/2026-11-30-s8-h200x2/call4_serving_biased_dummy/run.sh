# session 8 call (x2) after staging p0-p4 (.gpu-vllm6: the kit in six parts): serving through vLLM 0.25, CUDA graphs on, random weights.
# GPU0: Qwen3-30B-A3B Marlin, mxmoe mixed 3.25 (experts only), mixed 3.25 + w4g128 attention;
# GPU1: Qwen3 bf16, Qwen1.5-MoE Marlin, Qwen1.5 mixed 3.25 + w4g128 attention and shared expert.
bash .gpu-vllm6/p5/stage.sh > /dev/null 2>&1; echo stage rc $?
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
ROOT_OUT=$OUT; mkdir -p $ROOT_OUT/g0 $ROOT_OUT/g1
( export CUDA_VISIBLE_DEVICES=0 OUT=$ROOT_OUT/g0
  timeout 555 python3 benchmarks/gpu_serving_check.py all x x --config qwen3-30b-a3b --skip-accuracy --latency-batches 1 \
     --variants gptq4_marlin,mxmoe_mixed325,mxmoe_mixed325_lin4 > $OUT/serving.txt 2>&1; echo serving0 rc $? ) &
( export CUDA_VISIBLE_DEVICES=1 OUT=$ROOT_OUT/g1
  timeout 250 python3 benchmarks/gpu_serving_check.py all x x --config qwen3-30b-a3b --skip-accuracy --latency-batches 1 \
     --variants bf16 > $OUT/serving_q3.txt 2>&1; echo serving1a rc $?
  timeout 300 python3 benchmarks/gpu_serving_check.py all x x --config qwen1.5-moe-a2.7b --skip-accuracy --latency-batches 1 \
     --variants gptq4_marlin,mxmoe_mixed325_lin4 > $OUT/serving_q15.txt 2>&1; echo serving1b rc $? ) &
wait
grep -h "RESULT\|Error\|error" $ROOT_OUT/g0/serving.txt $ROOT_OUT/g1/serving_q3.txt $ROOT_OUT/g1/serving_q15.txt | grep -v "^INFO" | cut -c1-250 | tail -45
cd $ROOT_OUT && tar czf all.tgz g0 g1 && rm -rf g0 g1
