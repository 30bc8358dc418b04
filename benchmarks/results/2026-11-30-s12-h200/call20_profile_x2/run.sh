# session 12: per-kernel GPU time of a served decode batch of 64 (Qwen3-30B-A3B, dummy weights). GPU0: Marlin, w4g128; GPU1: mixed 3.25.
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
( CUDA_VISIBLE_DEVICES=0 timeout 400 python3 benchmarks/serving_profile.py --variants gptq4_marlin,mxmoe_w4g128 > $OUT/prof0.txt 2>&1; echo p0 rc $? ) &
( CUDA_VISIBLE_DEVICES=1 timeout 400 python3 benchmarks/serving_profile.py --variants mxmoe_mixed325 > $OUT/prof1.txt 2>&1; echo p1 rc $? ) &
wait
cat $OUT/serving_profile_*.txt | cut -c1-170; grep -h "Error\|Traceback" $OUT/prof*.txt | head
