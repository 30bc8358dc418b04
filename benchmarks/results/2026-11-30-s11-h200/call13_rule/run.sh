#!/bin/bash
# session 11 call 13: 64-row tiles of 2/3-bit layers take the asm (configs.LOW_BIT_ASM_MAX_BLOCK_M): check, then Mixtral 256 / Qwen3 2048
export PYTHONUNBUFFERED=1
PYTHONPATH=. timeout 200 python benchmarks/kernel_check.py --shapes qwen1.5-moe,qwen3-30b-a3b,deepseek-v2-lite,mixtral-8x7b --parts check --check-modes default --csrc 0 > $OUT/check.txt 2>&1
grep "correctness:" $OUT/check.txt; grep -i "fail" $OUT/check.txt | head
PYTHONPATH=. timeout 90 python benchmarks/decode_probe.py --shape mixtral-8x7b --assign mixed3.25,w2g128 --tokens 256 --overrides d0:dequant=0 > $OUT/mixtral.txt 2>&1
PYTHONPATH=. timeout 90 python benchmarks/decode_probe.py --shape qwen1.5-moe --assign mixed3.25,w2g128 --tokens 2048 --overrides d0:dequant=0 > $OUT/qwen15.txt 2>&1
grep -E "gate_up|down" $OUT/mixtral.txt $OUT/qwen15.txt
