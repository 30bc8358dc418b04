# session 8 call 1 (x2): GPU0 this code: MoE checks + dense-linear check/timing;
# GPU1 A/B of the hoisted routing loads: layer_profile of HEAD's copy (.ab/head) vs this code
true
export PYTHONUNBUFFERED=1
ROOT=$(pwd); ROOT_OUT=$OUT; mkdir -p $ROOT_OUT/g0 $ROOT_OUT/g1
nvidia-smi --query-gpu=index,name --format=csv,noheader
( export CUDA_VISIBLE_DEVICES=0 OUT=$ROOT_OUT/g0 PYTHONPATH=.
  timeout 130 python3 benchmarks/kernel_check.py --parts check --check-modes default --csrc 0 --budget-s 110 --procs 14 > $OUT/check.txt 2>&1; echo check rc $?
  timeout 330 python3 benchmarks/linear_check.py --schemes w4g128,w3g128 --tokens 1,16,64,256,1024,8192 > $OUT/linear_stdout.txt 2>&1; echo linear rc $? ) &
( export CUDA_VISIBLE_DEVICES=1
  for z in 0 1; do
    for side in new head; do
      if [ $side = head ]; then cd .ab/head; else cd $ROOT; fi
      OUT=$ROOT_OUT/g1/${side}_z$z PYTHONPATH=. timeout 110 python3 benchmarks/layer_profile.py --shape qwen3-30b-a3b \
        --assign w4g128,mixed3.25 --tokens 1,16,64 --zipf-s $z > $ROOT_OUT/g1/prof_${side}_z$z.txt 2>&1; echo prof $side z$z rc $?
      cd $ROOT
    done
  done ) &
wait
grep -E "correctness|FAIL" $ROOT_OUT/g0/check.txt | tail -3; grep -E "correctness|^\|" $ROOT_OUT/g0/linear_stdout.txt | head -80
for f in $ROOT_OUT/g1/prof_*.txt; do echo "== $f"; grep -iE "layer|total|gemm|replay" $f | head -30; done
cd $ROOT_OUT && tar czf all.tgz g0 g1 && rm -rf g0 g1
