# session 15 call 6 (H200 x2). GPU0: the allocator's perf table re-measured with the 32-row decode tile (rows per
# expert 1/4/16/32/64/256). GPU1: 32-row swap-AB tiles against the 64-row tile at 64-128 rows per expert.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
R=$OUT; mkdir -p $R/table $R/probe
( OUT=$R/table CUDA_VISIBLE_DEVICES=0 timeout 175 python3 benchmarks/kernel_check.py --shapes qwen3-30b-a3b,qwen1.5-moe \
    --parts table --quick --csrc 0 --table-schemes w2g128,w3g128,w4g128,w8,w8a8fp8,w4a8fp8 --table-tokens 1,4,16,32,64,256 \
    --procs 14 --part-budget-s 120 --budget-s 150 > $R/table/log.txt 2>&1; echo table rc $? ) &
( export CUDA_VISIBLE_DEVICES=1
  OV="m32s:block_m=32,block_n=64,dequant=2,swap_ab=1,num_stages=4"
  OUT=$R/probe timeout 100 python3 benchmarks/decode_probe.py --shape mixtral-8x7b --assign w4g128,mixed3.25 --tokens 256,512 \
     --zipf-s 1 --overrides $OV > $R/probe/mixtral.txt 2>&1; echo mixtral rc $?
  OUT=$R/probe timeout 60 python3 benchmarks/decode_probe.py --shape deepseek-v2-lite --assign w4g128,mixed3.25 --tokens 1024 \
     --zipf-s 1 --overrides $OV > $R/probe/deepseek.txt 2>&1; echo ds rc $? ) &
wait
grep -v "^device\|^ *assign" $R/probe/*.txt | cut -c1-140
tail -5 $R/table/log.txt; ls $R/table
