# session 12: perf table + layer times with the session-11 kernels. GPU0: check,time on qwen3 + qwen1.5 (+ a 2-bit two-tile probe);
# GPU1: the per-scheme table on both shapes (-> perf_table_h200.json).
export PYTHONUNBUFFERED=1 PYTHONPATH=.
ROOT_OUT=$OUT; mkdir -p $ROOT_OUT/g0 $ROOT_OUT/g1
( export CUDA_VISIBLE_DEVICES=0 OUT=$ROOT_OUT/g0
  timeout 300 python3 benchmarks/kernel_check.py --shapes qwen3-30b-a3b,qwen1.5-moe --assign w4g128,mixed3.25 --quick \
    --time-tokens 1,16,64,256,1024,8192 --procs 14 --part-budget-s 120 --parts check,time --check-modes default --csrc 0 --budget-s 280 \
    > $OUT/check_time.txt 2>&1; echo kc0 rc $?
  for s in qwen3-30b-a3b deepseek-v2-lite; do
    timeout 100 python3 benchmarks/decode_probe.py --shape $s --assign w2g128 --tokens 1,4,16,64 --zipf-s 0 \
      --overrides u2:k_unroll=2,num_stages=3 >> $OUT/probe_u2.txt 2>&1; echo probe $s rc $?; done ) &
( export CUDA_VISIBLE_DEVICES=1 OUT=$ROOT_OUT/g1
  timeout 330 python3 benchmarks/kernel_check.py --shapes qwen3-30b-a3b,qwen1.5-moe --parts table --quick --csrc 0 \
    --procs 14 --part-budget-s 240 --budget-s 300 > $OUT/table.txt 2>&1; echo kc1 rc $? ) &
wait
tail -25 $ROOT_OUT/g0/check_time.txt; grep -v "^#" $ROOT_OUT/g0/probe_u2.txt | tail -30; tail -5 $ROOT_OUT/g1/table.txt
ls -R $ROOT_OUT | head -30
