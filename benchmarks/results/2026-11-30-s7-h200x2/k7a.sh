# session 7 call 1 (x2): GPU0 baselines (new code, vLLM bf16 + Marlin), GPU1 align check/timing, layer checks, profiles, Mixtral sweep
bash .gpu-vllm/p4/stage.sh > /dev/null 2>&1; echo stage rc $?
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
nvidia-smi --query-gpu=index,name --format=csv,noheader
ROOT_OUT=$OUT
( export CUDA_VISIBLE_DEVICES=0 OUT=$ROOT_OUT/g0; mkdir -p $OUT
  timeout 420 python3 benchmarks/baselines.py --shapes qwen3-30b-a3b,deepseek-v2-lite,qwen1.5-moe,mixtral-8x7b \
     --tokens 1,16,64,256,8192 --ours w4g128,mixed3.25,w8a8fp8 --budget-s 380 > $OUT/baselines_stdout.txt 2>&1; echo baselines rc $? ) &
( export CUDA_VISIBLE_DEVICES=1 OUT=$ROOT_OUT/g1; mkdir -p $OUT
  timeout 100 python3 .ab/align_gpu.py > $OUT/align.txt 2>&1; echo align rc $?
  timeout 120 python3 benchmarks/kernel_check.py --parts check --check-modes default --csrc 0 --budget-s 100 --procs 14 > $OUT/check.txt 2>&1; echo check rc $?
  timeout 90 python3 benchmarks/layer_profile.py --shape qwen3-30b-a3b --assign w4g128,w8a8fp8 --tokens 16,64,8192 > $OUT/prof_new.txt 2>&1; echo prof rc $?
  timeout 170 python3 benchmarks/tile_sweep.py --shapes mixtral-8x7b --assign w4g128 --tokens 1,16 --swap-ab \
     --block-n 64,128 --block-k 128,256 --stages 4,6 --procs 14 --budget-s 150 --compile-budget-s 90 > $OUT/sweep_mixtral.txt 2>&1; echo sweep rc $? ) &
wait
tail -3 $ROOT_OUT/g1/align.txt; grep -E "FAIL|fail|pass" $ROOT_OUT/g1/check.txt | tail -5
