# session 8 call 2 (x2): dense linears, both paths checked and timed vs cuBLAS bf16; GPU0 w4g128,w3g128; GPU1 w2g128,w8
export PYTHONUNBUFFERED=1 PYTHONPATH=.
ROOT_OUT=$OUT; mkdir -p $ROOT_OUT/g0 $ROOT_OUT/g1
( export CUDA_VISIBLE_DEVICES=0 OUT=$ROOT_OUT/g0
  timeout 400 python3 benchmarks/linear_check.py --schemes w4g128,w3g128 --tokens 1,16,32,64,128,256,1024,8192 > $OUT/linear_stdout.txt 2>&1; echo linear0 rc $? ) &
( export CUDA_VISIBLE_DEVICES=1 OUT=$ROOT_OUT/g1
  timeout 400 python3 benchmarks/linear_check.py --schemes w2g128,w8 --tokens 1,16,32,64,128,256,1024,8192 > $OUT/linear_stdout.txt 2>&1; echo linear1 rc $? ) &
wait
for g in g0 g1; do grep -E "correctness|FAIL|nan|Error" $ROOT_OUT/$g/linear_stdout.txt | head -5; grep -E "^\| [a-z]" $ROOT_OUT/$g/linear_stdout.txt | cut -d'|' -f2-9; done
cd $ROOT_OUT && tar czf all.tgz g0 g1 && rm -rf g0 g1
