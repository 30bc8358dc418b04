# session 14 call 4 (H200 x2, vLLM staged). GPU0: Qwen3 batch-256 trace with idle gaps, mixed 3.25 (call 3 timed out
# after Marlin's). GPU1: DeepSeek-V2-Lite with spread router gates, traces at batch 16/64/256, Marlin and mixed 3.25.
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
R=$OUT; mkdir -p $R/q3 $R/ds
( export CUDA_VISIBLE_DEVICES=0 OUT=$R/q3
  timeout 300 python3 benchmarks/serving_profile.py --config qwen3-30b-a3b --variants mxmoe_mixed325 --batch 256 \
     --tokens 32 --trace > $R/q3/log.txt 2>&1; echo q3 rc $? ) &
J0=$!
( export CUDA_VISIBLE_DEVICES=1 OUT=$R/ds
  timeout 420 python3 benchmarks/serving_profile.py --config deepseek-v2-lite --variants gptq4_marlin,mxmoe_mixed325 \
     --batch 16,64,256 --tokens 32 --trace --spread-routers > $R/ds/log.txt 2>&1; echo ds rc $? ) &
J1=$!
wait $J0 $J1
grep -h "^#" $R/*/serving_profile_*.txt | cut -c1-230
grep -h "Traceback\|Error" $R/*/log.txt | head
cd $R && tar czf k4.tgz q3 ds && rm -rf q3 ds
