# session 12: record the router's decode-step choices in vLLM's engine (mixed 3.25, batch 64, eager) and replay them
# on the kernels alone against Marlin, next to uniform synthetic routing. GPU0: Qwen3-30B-A3B, GPU1: Qwen1.5-MoE.
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
run() {  # gpu config shape out
  export CUDA_VISIBLE_DEVICES=$1; mkdir -p $OUT/$4
  timeout 200 python3 benchmarks/serving_profile.py --config $2 --variants mxmoe_mixed325 --batch 64 --tokens 12 \
     --record-routing /tmp/routing_$4.pt > $OUT/$4/record.txt 2>&1; echo record $4 rc $?
  OUT=$OUT/$4 timeout 240 python3 benchmarks/baselines.py --shapes $3 --tokens 64 --ours w4g128,mixed3.25 --zipf-s 0 \
     --routing /tmp/routing_$4.pt --routing-samples 10 --budget-s 200 --procs 8 > $OUT/$4/replay.txt 2>&1; echo replay $4 rc $?
}
run 0 qwen3-30b-a3b qwen3-30b-a3b q3 &
run 1 qwen1.5-moe-a2.7b qwen1.5-moe q15 &
wait
for d in q3 q15; do grep "recorded\|Error" $OUT/$d/record.txt | tail -2; grep -v "^#\|warm-up" $OUT/$d/baselines.txt; done
rm -f $OUT/*/baselines.json
