# session 13 call B: w4a8fp8 against w8a8fp8 and w4g128 next to vLLM bf16 and Marlin (baselines.py, Zipf routing);
# Mixtral also with the csrc/ w4 kernel at 1-16 tokens. GPU clocks sampled. GPU0: Qwen3, Qwen1.5, DeepSeek; GPU1: Mixtral.
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh
export PYTHONPATH=.:$PYTHONPATH
mkdir -p $OUT/b0 $OUT/b1 $OUT/b2
nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,clocks_throttle_reasons.active --format=csv,noheader -lms 200 > $OUT/b0/smi.csv 2>&1 &
SMI=$!
JOBS=
( export CUDA_VISIBLE_DEVICES=0; OUT=$OUT/b0 timeout 540 python3 benchmarks/baselines.py --shapes qwen3-30b-a3b,qwen1.5-moe,deepseek-v2-lite \
    --ours w4g128,w8a8fp8,w4a8fp8 --tokens 1,16,64,256,1024,8192 --budget-s 420 --procs 8 > $OUT/b0/log.txt 2>&1; echo b0 rc $? ) &
JOBS="$JOBS $!"
( export CUDA_VISIBLE_DEVICES=1
  OUT=$OUT/b1 timeout 260 python3 benchmarks/baselines.py --shapes mixtral-8x7b --ours w4g128,w4g128+csrc,w4a8fp8 --tokens 1,2,4,16 \
    --budget-s 200 --procs 7 > $OUT/b1/log.txt 2>&1; echo b1 rc $?
  OUT=$OUT/b2 timeout 270 python3 benchmarks/baselines.py --shapes mixtral-8x7b --ours w4g128,w8a8fp8,w4a8fp8 --tokens 64,256,1024,8192 \
    --budget-s 210 --procs 7 > $OUT/b2/log.txt 2>&1; echo b2 rc $? ) &
JOBS="$JOBS $!"
wait $JOBS
kill $SMI
for d in b0 b1 b2; do grep -v "^warm" $OUT/$d/baselines.txt | cut -c1-200; done
cd $OUT && tar czf kern.tgz b0 b1 b2 && rm -rf b0 b1 b2
