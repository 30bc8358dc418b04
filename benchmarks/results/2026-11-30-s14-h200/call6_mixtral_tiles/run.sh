# session 14 call 6: Mixtral-8x7b w4g128 decode tile variants (BLOCK_N, stages, warps, unroll) at 1/2/4 tokens, Zipf s=1.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
timeout 280 python3 benchmarks/decode_probe.py --shape mixtral-8x7b --assign w4g128 --tokens 1,2,4 --zipf-s 1 \
  --overrides n32:block_n=32 n128:block_n=128 s4:num_stages=4 s2:num_stages=2 w8:num_warps=8 "n128w8:block_n=128,num_warps=8" \
  "u1s4:k_unroll=1,num_stages=4" "k256:block_k=256" > $OUT/log.txt 2>&1; echo rc $?
grep -v "^device" $OUT/log.txt | cut -c1-150
