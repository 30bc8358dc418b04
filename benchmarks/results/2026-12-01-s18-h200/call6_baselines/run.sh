# session 18 call 6 (H200): stage the last vLLM part, then the four layer shapes against vLLM bf16 and Marlin w4 (Zipf s=1):
# ours w4g128 and mixed 3.25 with silu(gate)*up in GEMM1's epilogue and, +sep, as its own kernel (both with the unrolled top-k sum).
export PYTHONUNBUFFERED=1
bash .gpu-vllm6/p5/stage.sh | tail -2
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
R=$OUT; mkdir -p $R/bl
OUT=$R/bl timeout 540 python3 benchmarks/baselines.py --shapes qwen1.5-moe,qwen3-30b-a3b,deepseek-v2-lite,mixtral-8x7b \
  --tokens 1,16,64,128,256,8192 --ours w4g128,w4g128+sep,mixed3.25,mixed3.25+sep --zipf-s 1 --budget-s 380 > $R/bl/log.txt 2>&1
echo bl rc $?
grep -v "^#" $R/bl/baselines.txt | cut -c1-200 | head -90
grep -h "Traceback\|Error" $R/bl/log.txt | sort | uniq -c | head
