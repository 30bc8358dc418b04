#!/bin/bash
# session 11 call 1: correctness of the new 2/3-bit decoders, then A/B against HEAD
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt
PYTHONPATH=. timeout 170 python benchmarks/kernel_check.py --shapes qwen3-30b-a3b,mixtral-8x7b --parts check --check-modes default --csrc 0 > $OUT/check.txt 2>&1
grep -c " ok" $OUT/check.txt; grep -i "fail\|error" $OUT/check.txt | head
for S in qwen3-30b-a3b deepseek-v2-lite qwen1.5-moe mixtral-8x7b; do
  PYTHONPATH=. timeout 65 python benchmarks/decode_probe.py --shape $S --assign w2g128,w3g128,mixed3.25 --tokens 1,4,16,64,256 --overrides u2:k_unroll=2,num_stages=3 > /tmp/n.txt 2>&1; cat /tmp/n.txt >> $OUT/new.txt
  PYTHONPATH=.ab/head timeout 45 python .ab/head/benchmarks/decode_probe.py --shape $S --assign w2g128,w3g128,mixed3.25 --tokens 1,4,16,64,256 > /tmp/o.txt 2>&1; cat /tmp/o.txt >> $OUT/old.txt
done
tail -3 $OUT/new.txt
