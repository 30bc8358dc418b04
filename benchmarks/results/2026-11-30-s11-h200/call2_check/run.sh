#!/bin/bash
# session 11 call 2: GPU correctness on four shapes; the Mixtral 256-token mixed regression re-measured, alternating
export PYTHONUNBUFFERED=1
PYTHONPATH=. timeout 240 python benchmarks/kernel_check.py --shapes qwen1.5-moe,qwen3-30b-a3b,deepseek-v2-lite,mixtral-8x7b --parts check --check-modes default --csrc 0 > $OUT/check.txt 2>&1
grep "correctness:" $OUT/check.txt; grep -i "fail" $OUT/check.txt | head
for r in 1 2; do
  PYTHONPATH=. timeout 70 python benchmarks/decode_probe.py --shape mixtral-8x7b --assign w4g128,w3g128,mixed3.25 --tokens 64,256 > /tmp/n.txt 2>&1; cat /tmp/n.txt >> $OUT/mixtral_new.txt
  PYTHONPATH=.ab/head timeout 70 python .ab/head/benchmarks/decode_probe.py --shape mixtral-8x7b --assign w4g128,w3g128,mixed3.25 --tokens 64,256 > /tmp/o.txt 2>&1; cat /tmp/o.txt >> $OUT/mixtral_old.txt
done
grep -E "256 +down" $OUT/mixtral_new.txt $OUT/mixtral_old.txt
