# session 12 call 13: GPU0 Qwen1.5 Marlin + mixed 3.25 (second sample), GPU1 Qwen3 bf16 + mixed 3.25
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
ROOT_OUT=$OUT; mkdir -p $ROOT_OUT/g0 $ROOT_OUT/g1
( export CUDA_VISIBLE_DEVICES=0 OUT=$ROOT_OUT/g0
  timeout 575 python3 benchmarks/gpu_serving_check.py all x x --config qwen1.5-moe-a2.7b --skip-accuracy --latency-batches 1 \
     --variants gptq4_marlin,mxmoe_mixed325 > $OUT/serving.txt 2>&1; echo serving0 rc $? ) &
( export CUDA_VISIBLE_DEVICES=1 OUT=$ROOT_OUT/g1
  timeout 575 python3 benchmarks/gpu_serving_check.py all x x --config qwen3-30b-a3b --skip-accuracy --latency-batches 1 \
     --variants bf16,mxmoe_mixed325 > $OUT/serving_q3.txt 2>&1; echo serving1 rc $? ) &
wait
grep -h "RESULT\|Error\|error" $ROOT_OUT/g0/serving.txt $ROOT_OUT/g1/serving_q3.txt | grep -v "^INFO" | cut -c1-250 | tail -45
cd $ROOT_OUT && tar czf all.tgz g0 g1 && rm -rf g0 g1
