# session 18 call 12 (H200, no vLLM): kernel_check correctness with the mixed 3.25-bit layer now also checked at
# 512 and 2048 tokens (GEMM1 with the SiLU epilogue on the 32-row and 128-row tiles).
export PYTHONUNBUFFERED=1
R=$OUT; mkdir -p $R/kc
OUT=$R/kc PYTHONPATH=. timeout 165 python3 benchmarks/kernel_check.py --parts check --check-modes default --csrc 0 --procs 15 > $R/kc/log.txt 2>&1
echo kc rc $?
grep -h "mixed3.25\|correctness:\|FAIL\|compile" $R/kc/log.txt | head -40
