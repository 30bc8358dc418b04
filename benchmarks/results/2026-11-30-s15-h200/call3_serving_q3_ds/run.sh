# session 15 call 3 (H200 x2), after the 32-row decode tile (configs.TILE_TABLE, 14-48 rows per expert).
# GPU0: Qwen3-30B-A3B served (Marlin, mixed 3.25), then kernel_check correctness (bf16, every scheme, Zipf).
# GPU1: DeepSeek-V2-Lite served with spread gates (Marlin, mixed 3.25, w4g128).
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
R=$OUT; mkdir -p $R/g0 $R/g1 $R/g0/kc
( export CUDA_VISIBLE_DEVICES=0 OUT=$R/g0
  timeout 360 python3 benchmarks/gpu_serving_check.py all x x --config qwen3-30b-a3b --skip-accuracy --latency-batches 1 \
     --variants gptq4_marlin,mxmoe_mixed325 --repeats 3 --prefill both > $OUT/serving_q3.txt 2>&1; echo q3 rc $?
  OUT=$R/g0/kc timeout 200 python3 benchmarks/kernel_check.py --parts check --check-modes default --procs 12 > $R/g0/kc/log.txt 2>&1
  echo kc rc $?
) &
J0=$!
( export CUDA_VISIBLE_DEVICES=1 OUT=$R/g1
  timeout 560 python3 benchmarks/gpu_serving_check.py all x x --config deepseek-v2-lite --skip-accuracy --latency-batches 1 \
     --variants gptq4_marlin,mxmoe_mixed325,mxmoe_w4g128 --repeats 3 --prefill both --spread-routers > $OUT/serving_ds.txt 2>&1
  echo ds rc $?
) &
J1=$!
wait $J0 $J1
grep -h "RESULT" $R/g*/serving_*.txt | grep -v engine_start | sed 's/ wall=.*runs=/ runs=/' | cut -c1-160
grep -c " ok$" $R/g0/kc/log.txt; grep -h "FAIL\|failed" $R/g0/kc/log.txt | head -20
grep -h "Traceback\|Error" $R/g*/*.txt | sort | uniq -c | head
cd $R && tar czf k3.tgz g0 g1 && rm -rf g0 g1
