# session 13 call D: the per-scheme table again, now with w4a8fp8 (so the allocator stops pricing it by the roofline).
export PYTHONUNBUFFERED=1 PYTHONPATH=.
timeout 200 python3 benchmarks/kernel_check.py --shapes qwen3-30b-a3b,qwen1.5-moe --parts table --quick --csrc 0 \
    --table-schemes w2g128,w3g128,w4g128,w8,w8a8fp8,w4a8fp8 --procs 14 --part-budget-s 150 --budget-s 180 > $OUT/table.txt 2>&1; echo rc $?
tail -40 $OUT/table.txt; ls $OUT
