# session 7 call 3 (x2): GPU0 split-K sweeps (uniform and Zipf routing); GPU1 DeepSeek-V2-Lite serving
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
ROOT_OUT=$OUT; mkdir -p $ROOT_OUT/g0/u $ROOT_OUT/g0/z $ROOT_OUT/g1
( export CUDA_VISIBLE_DEVICES=0
  for z in 0 1; do d=$ROOT_OUT/g0/u; [ $z = 1 ] && d=$ROOT_OUT/g0/z
  OUT=$d timeout 200 python3 benchmarks/tile_sweep.py --shapes qwen3-30b-a3b,qwen1.5-moe,deepseek-v2-lite,mixtral-8x7b --assign w4g128 \
     --tokens 16,64,1 --only-swap-ab --block-n 64,128 --block-k 128 --stages 4 --split-k 1,2,3,4,6,8 --zipf-s $z \
     --procs 14 --budget-s 180 --compile-budget-s 60 > $d/sweep.txt 2>&1; echo sweep $z rc $?; done ) &
( export CUDA_VISIBLE_DEVICES=1 OUT=$ROOT_OUT/g1
  timeout 470 python3 benchmarks/gpu_serving_check.py all x x --config deepseek-v2-lite --skip-accuracy --latency-batches 1,16 \
     --variants gptq4_marlin,mxmoe_mixed325,mxmoe_w4g128 > $OUT/serving.txt 2>&1; echo serving rc $? ) &
wait
grep -h "shipped" $ROOT_OUT/g0/*/sweep.txt; grep -h "RESULT\|Error" $ROOT_OUT/g1/serving.txt | cut -c1-300 | tail -30
cd $ROOT_OUT && tar czf all.tgz g0 g1 && rm -rf g0 g1
