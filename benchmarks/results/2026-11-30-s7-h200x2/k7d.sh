# session 7 call 4 (x2): GPU0 layer checks + baselines (final code); GPU1 Qwen1.5-MoE serving mixed325 vs Marlin
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
ROOT_OUT=$OUT; mkdir -p $ROOT_OUT/g0 $ROOT_OUT/g1
( export CUDA_VISIBLE_DEVICES=0 OUT=$ROOT_OUT/g0
  timeout 100 python3 benchmarks/kernel_check.py --parts check --check-modes default --csrc 0 --budget-s 85 --procs 14 > $OUT/check.txt 2>&1; echo check rc $?
  timeout 220 python3 benchmarks/baselines.py --shapes qwen3-30b-a3b,deepseek-v2-lite,qwen1.5-moe,mixtral-8x7b \
     --tokens 1,16,64,256,8192 --ours w4g128,mixed3.25,w8a8fp8 --budget-s 200 > $OUT/baselines_stdout.txt 2>&1; echo baselines rc $? ) &
( export CUDA_VISIBLE_DEVICES=1 OUT=$ROOT_OUT/g1
  timeout 330 python3 benchmarks/gpu_serving_check.py all x x --config qwen1.5-moe-a2.7b --skip-accuracy --latency-batches 1,16 \
     --variants mxmoe_mixed325,gptq4_marlin > $OUT/serving.txt 2>&1; echo serving rc $? ) &
wait
grep -E "correctness" $ROOT_OUT/g0/check.txt; grep -v "^check\|^warm" $ROOT_OUT/g0/baselines.txt; grep -h "RESULT\|Error" $ROOT_OUT/g1/serving.txt | cut -c1-300 | tail -20
cd $ROOT_OUT && tar czf all.tgz g0 g1 && rm -rf g0 g1
