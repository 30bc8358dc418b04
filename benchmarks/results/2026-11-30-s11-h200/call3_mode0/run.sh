#!/bin/bash
# session 11 call 3: the mode-0 (large tile) 3-bit path with the spare codes gathered once per word
export PYTHONUNBUFFERED=1
PYTHONPATH=. timeout 150 python benchmarks/kernel_check.py --shapes mixtral-8x7b,qwen3-30b-a3b --parts check --check-modes default --csrc 0 > $OUT/check.txt 2>&1
grep "correctness:" $OUT/check.txt; grep -i "fail" $OUT/check.txt | head
for r in 1 2; do
  PYTHONPATH=. timeout 70 python benchmarks/decode_probe.py --shape mixtral-8x7b --assign w3g128,mixed3.25 --tokens 256,1024 > /tmp/n.txt 2>&1; cat /tmp/n.txt >> $OUT/mixtral_new.txt
  PYTHONPATH=.ab/head timeout 70 python .ab/head/benchmarks/decode_probe.py --shape mixtral-8x7b --assign w3g128,mixed3.25 --tokens 256,1024 > /tmp/o.txt 2>&1; cat /tmp/o.txt >> $OUT/mixtral_old.txt
done
grep -E "(256|1024) +(down|gate_up)" $OUT/mixtral_new.txt $OUT/mixtral_old.txt
