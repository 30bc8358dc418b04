#!/bin/bash
# session 11 call 12: large tiles (BLOCK_M >= 64, plain-Triton decode by default) with the field-wise modes
export PYTHONUNBUFFERED=1
PYTHONPATH=. timeout 150 python benchmarks/decode_probe.py --shape mixtral-8x7b --assign w3g128,mixed3.25,w4g128 --tokens 256,1024 --overrides d1:dequant=1 d2:dequant=2 > $OUT/mixtral.txt 2>&1
PYTHONPATH=. timeout 150 python benchmarks/decode_probe.py --shape qwen3-30b-a3b --assign mixed3.25,w4g128 --tokens 512,2048 --overrides d1:dequant=1 d2:dequant=2 > $OUT/qwen3.txt 2>&1
grep -v "^$" $OUT/mixtral.txt $OUT/qwen3.txt | grep -v Warning | tail -60
