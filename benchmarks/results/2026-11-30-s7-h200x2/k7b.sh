# session 7 call 2 (x2): GPU0 uniform-routing baselines + profiles + align timing; GPU1 serving qwen3 mixed325 vs Marlin, then Mixtral sweep
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
ROOT_OUT=$OUT; mkdir -p $ROOT_OUT/g0 $ROOT_OUT/g1
( export CUDA_VISIBLE_DEVICES=0 OUT=$ROOT_OUT/g0
  timeout 60 python3 .ab/align_gpu.py > $OUT/align.txt 2>&1; echo align rc $?
  timeout 250 python3 benchmarks/baselines.py --shapes qwen3-30b-a3b,qwen1.5-moe,deepseek-v2-lite --zipf-s 0 \
     --tokens 1,16,64,256 --ours w4g128,mixed3.25 --budget-s 220 > $OUT/baselines_uniform_stdout.txt 2>&1; echo baselines rc $?
  mkdir -p $OUT/bl && mv $OUT/baselines.* $OUT/bl/ 2>/dev/null
  timeout 80 python3 benchmarks/layer_profile.py --shape qwen3-30b-a3b --assign w4g128,mixed3.25 --tokens 16,64 --zipf-s 0 > $OUT/prof_uniform.txt 2>&1; echo prof rc $?
  timeout 60 python3 benchmarks/layer_profile.py --shape qwen3-30b-a3b --assign w4g128,w8a8fp8 --tokens 16,8192 > $OUT/prof_zipf.txt 2>&1; echo prof2 rc $?
  timeout 100 python3 benchmarks/tile_sweep.py --shapes mixtral-8x7b --assign w4g128 --tokens 1,16 --swap-ab \
     --block-n 64,128 --block-k 128,256 --stages 4,6 --procs 14 --budget-s 90 --compile-budget-s 50 > $OUT/sweep_mixtral.txt 2>&1; echo sweep rc $?
) &
( export CUDA_VISIBLE_DEVICES=1 OUT=$ROOT_OUT/g1
  timeout 520 python3 benchmarks/gpu_serving_check.py all x x --config qwen3-30b-a3b --skip-accuracy --latency-batches 1,16 \
     --variants mxmoe_mixed325,gptq4_marlin,mxmoe_auto325 > $OUT/serving.txt 2>&1; echo serving rc $? ) &
wait
cat $ROOT_OUT/g0/align.txt | tail -40; grep -h "RESULT" $ROOT_OUT/g1/serving.txt | cut -c1-400
cd $ROOT_OUT && tar czf all.tgz g0 g1 && rm -rf g0 g1; ls -la $ROOT_OUT
