# session 16 call B (H200 x2), code 19aeae2. GPU0: kernel_check correctness (bf16, every scheme, Zipf, 1-2048 tokens)
# then the perf table (3-bit layers on the 32-row tile at 64 rows). GPU1: the low-bit rule against the 64-row tile on the
# four shapes (decode_probe), then baselines.py (Zipf) at 256-2048 tokens against Marlin and bf16.
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
R=$OUT; mkdir -p $R/kc $R/table $R/probe $R/base
( export CUDA_VISIBLE_DEVICES=0
  OUT=$R/kc timeout 230 python3 benchmarks/kernel_check.py --parts check --check-modes default --procs 12 > $R/kc/log.txt 2>&1
  echo kc rc $?
  OUT=$R/table timeout 200 python3 benchmarks/kernel_check.py --shapes qwen3-30b-a3b,qwen1.5-moe \
    --parts table --quick --csrc 0 --table-schemes w2g128,w3g128,w4g128,w8,w8a8fp8,w4a8fp8 --table-tokens 1,4,16,32,64,256 \
    --procs 14 --part-budget-s 150 --budget-s 180 > $R/table/log.txt 2>&1; echo table rc $?
) &
J0=$!
( export CUDA_VISIBLE_DEVICES=1
  OV="m64:block_m=64,block_n=128,swap_ab=0,num_stages=2"
  for s in qwen3-30b-a3b:1024,2048 qwen1.5-moe:1024,2048 deepseek-v2-lite:1024 mixtral-8x7b:256,512; do
    OUT=$R/probe timeout 60 python3 benchmarks/decode_probe.py --shape ${s%:*} --assign mixed3.25 --tokens ${s#*:} \
       --zipf-s 1 --overrides $OV > $R/probe/${s%:*}.txt 2>&1; echo ${s%:*} rc $?; done
  OUT=$R/base timeout 250 python3 benchmarks/baselines.py --shapes qwen3-30b-a3b,deepseek-v2-lite,mixtral-8x7b \
     --ours w4g128,mixed3.25 --tokens 256,512,1024,2048 --budget-s 220 --procs 12 > $R/base/log.txt 2>&1; echo base rc $?
) &
J1=$!
wait $J0 $J1
grep -c " ok$" $R/kc/log.txt; grep -h "FAIL\|failed" $R/kc/log.txt | head -20
grep -v "^device\|^ *assign" $R/probe/*.txt | cut -c1-150
grep "^w3g128\|^w2g128\|^w4g128" $R/table/log.txt | head -20; tail -2 $R/table/log.txt
grep -v "^warm" $R/base/baselines.txt | tail -40 | cut -c1-160
grep -h "Traceback\|Error" $R/*/*.txt | sort | uniq -c | head
cd $R && tar czf kB.tgz kc table probe base && rm -rf kc table probe base
