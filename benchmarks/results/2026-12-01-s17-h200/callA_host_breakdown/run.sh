# session 17 call A (H200): host-time breakdown of one eager MoE layer (no vLLM needed)
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
timeout 400 python .ab/s17/host_breakdown.py qwen1.5-moe > $OUT/breakdown.txt 2>&1; echo rc $?
cat $OUT/breakdown.txt | cut -c1-160
