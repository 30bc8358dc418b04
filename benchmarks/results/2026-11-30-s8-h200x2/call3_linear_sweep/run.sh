# session 8 call 3 (x2): dense-linear tile sweep at 32-256 rows (swap-AB, asm dequant, split-K), w4g128 and w2g128
export PYTHONUNBUFFERED=1 PYTHONPATH=.
ROOT_OUT=$OUT; mkdir -p $ROOT_OUT/g0 $ROOT_OUT/g1
( export CUDA_VISIBLE_DEVICES=0 OUT=$ROOT_OUT/g0
  timeout 420 python3 benchmarks/linear_check.py --sweep --shapes qwen3-30b-a3b.qkv,qwen3-30b-a3b.o --schemes w4g128 --tokens 32,64,128,256 > $OUT/sweep_stdout.txt 2>&1; echo sweep0 rc $? ) &
( export CUDA_VISIBLE_DEVICES=1 OUT=$ROOT_OUT/g1
  timeout 420 python3 benchmarks/linear_check.py --sweep --shapes qwen1.5-moe.shared_gate_up,qwen1.5-moe.shared_down --schemes w4g128 --tokens 32,64,128,256 > $OUT/sweep_stdout.txt 2>&1; echo sweep1 rc $? ) &
wait
for g in g0 g1; do grep -E "^sweep|Error" $ROOT_OUT/$g/sweep_stdout.txt | sed 's/^sweep //' | cut -c1-140; done
cd $ROOT_OUT && tar czf all.tgz g0 g1 && rm -rf g0 g1
