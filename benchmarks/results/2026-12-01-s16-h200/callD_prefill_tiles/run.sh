# session 16 call D (H200, kernel only), code 19aeae2. Prefill-chunk tiles around 128 rows per expert: the shipped tile
# against 32-, 64- and 128-row tiles, uniform routing (as served with dummy weights) and Zipf s=1, mixed 3.25 and w4g128.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
R=$OUT; mkdir -p $R/probe
OV="m32:block_m=32,block_n=64,block_k=128,num_warps=4,num_stages=4,dequant=2,swap_ab=1,split_k=1 m64:block_m=64,block_n=128,swap_ab=0,num_stages=2 m128:block_m=128,block_n=128,swap_ab=0,num_stages=2"
for z in 0 1; do
  for s in qwen1.5-moe:1920,2048,2400 qwen3-30b-a3b:2048,2560 deepseek-v2-lite:1536,2048; do
    OUT=$R/probe timeout 80 python3 benchmarks/decode_probe.py --shape ${s%:*} --assign mixed3.25,w4g128 --tokens ${s#*:} \
       --zipf-s $z --overrides $OV > $R/probe/${s%:*}_z$z.txt 2>&1; echo ${s%:*} z$z rc $?; done; done
for f in $R/probe/*_z*.txt; do echo "== $f"; grep -v "^device\|^ *assign" $f | cut -c1-118; done
cd $R && tar czf kD.tgz probe && rm -rf probe
