# session 18 call 1 (H200, no vLLM): silu(gate)*up in GEMM1's epilogue + unrolled top-k sum.
# 1) kernel_check correctness (bf16, NaN-poisoned, every scheme; the fused epilogue wherever GEMM1 is unsplit);
# 2) per-kernel layer profile, HEAD (f560a37, .ab/s18/head) against this tree, same GPU.
export PYTHONUNBUFFERED=1
bash .gpu-vllm6/p0/stage.sh
R=$OUT; mkdir -p $R/kc $R/prof
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
OUT=$R/kc PYTHONPATH=. timeout 280 python3 benchmarks/kernel_check.py --parts check --check-modes default --procs 14 > $R/kc/log.txt 2>&1
echo kc rc $?
for v in new head; do
  d=.; [ $v = head ] && d=.ab/s18/head
  for s in qwen1.5-moe qwen3-30b-a3b; do
    (cd $d && OUT=$R/prof PYTHONPATH=. timeout 120 python3 benchmarks/layer_profile.py --shape $s --assign mixed3.25,w4g128 \
       --tokens 1,16,64,256,8192 > $R/prof/${v}_$s.txt 2>&1; echo prof $v $s rc $?)
  done
done
grep -c " ok$" $R/kc/log.txt; grep -h "FAIL\|failed\|correctness:" $R/kc/log.txt | head -20
for f in $R/prof/*.txt; do echo "## $f"; grep -v "^#" $f | cut -c1-110 | head -80; done
grep -h "Traceback\|Error" $R/*/*.txt | sort | uniq -c | head
cd $R && tar czf k1.tgz kc prof && rm -rf kc prof
