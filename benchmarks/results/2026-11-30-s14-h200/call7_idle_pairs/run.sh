# session 14 call 7 (H200 x2): where the GPU idles in served decode batches, summed per kernel pair
# (serving_profile.py --trace, idle by_pair). DeepSeek-V2-Lite with spread gates, batch 64 and 256:
# GPU0 Marlin, GPU1 mixed 3.25. Then Qwen3-30B-A3B batch 256 on both (GPU0 Marlin, GPU1 mixed 3.25).
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
R=$OUT; mkdir -p $R/g0 $R/g1
run() {  # gpu variant
  export CUDA_VISIBLE_DEVICES=$1 OUT=$R/g$1
  timeout 250 python3 benchmarks/serving_profile.py --config deepseek-v2-lite --variants $2 --batch 64,256 --tokens 32 \
     --trace --spread-routers > $OUT/ds.txt 2>&1; echo ds g$1 rc $?
  timeout 200 python3 benchmarks/serving_profile.py --config qwen3-30b-a3b --variants $2 --batch 256 --tokens 32 \
     --trace > $OUT/q3.txt 2>&1; echo q3 g$1 rc $?
}
run 0 gptq4_marlin & J0=$!
run 1 mxmoe_mixed325 & J1=$!
wait $J0 $J1
grep -h "^#" $R/g*/ds.txt $R/g*/q3.txt | grep -v "us total" | cut -c1-200
cd $R && tar czf k7.tgz g0 g1 && rm -rf g0 g1
