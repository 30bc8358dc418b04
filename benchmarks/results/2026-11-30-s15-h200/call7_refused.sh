# session 15 call 7 (H200 x2), after the low-bit wide rule (3-bit layers keep the 32-row tile up to 128 rows).
# GPU0: the perf table again (w3g128 at 64 rows now on the 32-row tile). GPU1: mixed 3.25 layers at 64-96 rows per
# expert, shipped (32-row) against the 64-row tile, with the output difference between them.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
R=$OUT; mkdir -p $R/table $R/probe
( OUT=$R/table CUDA_VISIBLE_DEVICES=0 timeout 110 python3 benchmarks/kernel_check.py --shapes qwen3-30b-a3b,qwen1.5-moe \
    --parts table --quick --csrc 0 --table-schemes w2g128,w3g128,w4g128,w8,w8a8fp8,w4a8fp8 --table-tokens 1,4,16,32,64,256 \
    --procs 14 --part-budget-s 90 --budget-s 100 > $R/table/log.txt 2>&1; echo table rc $? ) &
( export CUDA_VISIBLE_DEVICES=1
  OV="m64:block_m=64,block_n=128,swap_ab=0,num_stages=2"
  for s in qwen3-30b-a3b:1024 qwen1.5-moe:1024 deepseek-v2-lite:1024 mixtral-8x7b:256; do
    OUT=$R/probe timeout 40 python3 benchmarks/decode_probe.py --shape ${s%:*} --assign mixed3.25 --tokens ${s#*:} \
       --zipf-s 1 --overrides $OV > $R/probe/${s%:*}.txt 2>&1; echo ${s%:*} rc $?; done ) &
wait
grep -v "^device\|^ *assign" $R/probe/*-*.txt | cut -c1-150
grep "^w3g128\|^w2g128\|^w4g128" $R/table/log.txt; tail -2 $R/table/log.txt
