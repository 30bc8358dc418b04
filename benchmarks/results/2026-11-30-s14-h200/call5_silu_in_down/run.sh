# session 14 call 5: SiLU fused into the down GEMM's activation loads (grouped_gemm_silu, decode tiles): checks
# (bf16, mixed3.25 weight-only layer at 1-40 tokens + EP) and timing against the separate SiLU launch ('silu_sep')
# on all four shapes, w4g128 and mixed3.25, 1-256 tokens (kernel_check times variants on its last shape: one run per shape).
export PYTHONUNBUFFERED=1 PYTHONPATH=.
for sh in qwen3-30b-a3b qwen1.5-moe deepseek-v2-lite mixtral-8x7b; do
  mkdir -p $OUT/$sh
  OUT=$OUT/$sh timeout 140 python3 benchmarks/kernel_check.py --shapes $sh --parts check,time --check-modes default \
     --assign w4g128,mixed3.25 --time-tokens 1,4,16,64,256 --csrc 0 --procs 15 --budget-s 120 > $OUT/$sh/log.txt 2>&1
  echo "$sh rc $?"
  grep -E "FAIL|correctness:|failed" $OUT/$sh/log.txt | head -5
  grep -E "^${sh:0:14} " $OUT/$sh/log.txt | grep -E " (table|silu_sep) " | cut -c1-100
done
cd $OUT && tar czf k5.tgz */ && rm -rf */
