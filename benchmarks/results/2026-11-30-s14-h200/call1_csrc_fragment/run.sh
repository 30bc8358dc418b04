# session 14 call 1: csrc/ w4 kernel reading fragment order (w4g128): build, check against the torch reference
# (int4mix layers: w4g128, w4g128_sym, w4 per channel in fragment order next to w4g64_sym, w4g32 in v1), and time it
# against the Triton decode path at 1-16 tokens on all four shapes (kernel_check times variants on its last shape,
# so one run per shape).
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
for sh in qwen3-30b-a3b mixtral-8x7b qwen1.5-moe deepseek-v2-lite; do
  mkdir -p $OUT/$sh
  OUT=$OUT/$sh timeout 150 python3 benchmarks/kernel_check.py --shapes $sh --parts check,time --check-modes default \
     --assign w4g128 --time-tokens 1,2,4,16 --csrc 1 --procs 15 --budget-s 130 > $OUT/$sh/log.txt 2>&1
  echo "$sh rc $?"
  grep -E "csrc|FAIL|correctness:|^$sh|^${sh:0:14}" $OUT/$sh/log.txt | grep -v "^warm" | cut -c1-170
done
cd $OUT && tar czf k1.tgz */ && rm -rf */
