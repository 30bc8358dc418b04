#!/bin/bash
# session 11: kernel-level layers against vLLM's bf16 fused_moe and Marlin MoE, same process; GPU0 Zipf s=1, GPU1 uniform
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
R=$OUT; mkdir -p $R/z1 $R/z0
( export CUDA_VISIBLE_DEVICES=0 OUT=$R/z1; timeout 280 python benchmarks/baselines.py --shapes mixtral-8x7b,qwen3-30b-a3b,deepseek-v2-lite,qwen1.5-moe --tokens 1,4,16,64 --ours w4g128,mixed3.25 --zipf-s 1 --budget-s 230 > $OUT/log.txt 2>&1; echo z1 rc $? ) &
( export CUDA_VISIBLE_DEVICES=1 OUT=$R/z0; timeout 280 python benchmarks/baselines.py --shapes mixtral-8x7b,qwen3-30b-a3b,deepseek-v2-lite,qwen1.5-moe --tokens 1,4,16,64 --ours w4g128,mixed3.25 --zipf-s 0 --budget-s 230 > $OUT/log.txt 2>&1; echo z0 rc $? ) &
wait
tail -5 $R/z1/log.txt $R/z0/log.txt
