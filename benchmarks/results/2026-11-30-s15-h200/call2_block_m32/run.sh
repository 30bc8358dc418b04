# session 15 call 2 (H200 x2): 32-row swap-AB decode tiles WITH the asm dequant (session 9's m32 probe fell back to
# the v1 dequant for w4 layers), against the shipped 16-row tiles at 128-512 tokens, uniform routing.
export PYTHONUNBUFFERED=1
export PYTHONPATH=.:$PYTHONPATH
R=$OUT
OV="m32a2:block_m=32,dequant=2 m32a3:block_m=32,dequant=3 m32a2u1:block_m=32,dequant=2,k_unroll=1,num_stages=4 m32a2s2:block_m=32,dequant=2,num_stages=2 m32a2n128:block_m=32,dequant=2,block_n=128"
probe() {  # gpu shape
  mkdir -p $R/$2; OUT=$R/$2 CUDA_VISIBLE_DEVICES=$1 timeout 280 python3 benchmarks/decode_probe.py --shape $2 \
     --assign w4g128,mixed3.25 --tokens 128,256,512 --overrides $OV > $R/$2/log.txt 2>&1; echo $2 rc $?
}
( probe 0 deepseek-v2-lite; probe 0 qwen3-30b-a3b ) &
( probe 1 qwen1.5-moe; probe 1 mixtral-8x7b ) &
wait
for s in deepseek-v2-lite qwen1.5-moe qwen3-30b-a3b mixtral-8x7b; do echo "== $s"; grep -v "^device\|^ *assign" $R/$s/log.txt | cut -c1-125; done
