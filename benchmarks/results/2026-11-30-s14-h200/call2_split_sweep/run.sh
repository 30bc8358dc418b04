# session 14 call 2: split-K sweep where a wave-aware rule (floor instead of ceil of 4 programs per SM) would change the
# split of all-4-bit decode GEMMs; uniform routing (as the rule assumes) and Zipf s=1.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
O=$OUT
for z in 0 1; do
for sh in mixtral-8x7b:1,2,4,16 qwen1.5-moe:2,4 deepseek-v2-lite:2 qwen3-30b-a3b:2; do
  s=${sh%%:*}; mkdir -p $O/z$z/$s
  OUT=$O/z$z/$s timeout 120 python3 benchmarks/decode_probe.py --shape $s --assign w4g128 --tokens ${sh##*:} --zipf-s $z \
    --overrides sk1:split_k=1 sk2:split_k=2 sk3:split_k=3 sk4:split_k=4 sk5:split_k=5 > $O/z$z/$s/log.txt 2>&1
  echo "== z$z $s rc $?"; grep -v "^device" $O/z$z/$s/log.txt | cut -c1-150
done; done
cd $O && tar czf k2.tgz z0 z1 && rm -rf z0 z1
