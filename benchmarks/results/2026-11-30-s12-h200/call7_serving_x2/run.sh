# session 12: serving through vLLM 0.25 (CUDA graphs, zero-mean dummy weights). GPU0: Qwen3-30B-A3B Marlin, mixed 2.25, WA mix;
# GPU1: DeepSeek-V2-Lite Marlin, mixed 3.25, w4g128.
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
ROOT_OUT=$OUT; mkdir -p $ROOT_OUT/g0 $ROOT_OUT/g1
( export CUDA_VISIBLE_DEVICES=0 OUT=$ROOT_OUT/g0
  timeout 575 python3 benchmarks/gpu_serving_check.py all x x --config qwen3-30b-a3b --skip-accuracy --latency-batches 1 \
     --variants gptq4_marlin,mxmoe_mixed225,mxmoe_wa_mix > $OUT/serving.txt 2>&1; echo serving0 rc $? ) &
( export CUDA_VISIBLE_DEVICES=1 OUT=$ROOT_OUT/g1
  timeout 575 python3 benchmarks/gpu_serving_check.py all x x --config deepseek-v2-lite --skip-accuracy --latency-batches 1 \
     --variants gptq4_marlin,mxmoe_mixed325,mxmoe_w4g128 > $OUT/serving_ds.txt 2>&1; echo serving1 rc $? ) &
wait
grep -h "RESULT\|Error\|error" $ROOT_OUT/g0/serving.txt $ROOT_OUT/g1/serving_ds.txt | grep -v "^INFO" | cut -c1-250 | tail -45
cd $ROOT_OUT && tar czf all.tgz g0 g1 && rm -rf g0 g1
