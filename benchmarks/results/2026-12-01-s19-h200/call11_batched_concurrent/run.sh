# session 19: the offline pipeline on the H200 with batched GPTQ: reference MoE 3.25 bits (+ eval) and a 2-layer random
# Qwen1.5-MoE in parallel; then a cProfile of the profile stage
cp .gpu-carry/refB/*.safetensors .gpu-carry/refB/model.safetensors.index.json /tmp/ref/; ls /tmp/ref | wc -l
. /tmp/vk/env.sh; export PYTHONPATH=.:$PYTHONPATH PYTHONUNBUFFERED=1
C=.gpu-carry/refB/calib.txt; T=.gpu-carry/refB/test.txt
Q="import sys;from offline.cli import quantize_main as m;sys.exit(m(sys.argv[1:]))"
E="import sys;from offline.evaluate import eval_main as m;sys.exit(m(sys.argv[1:]))"
(python benchmarks/gpu_quantize_check.py random-model qwen1.5-moe-a2.7b /tmp/rq2 --layers 2 --tokenizer /tmp/ref > $OUT/rq2_make.log 2>&1;
 timeout 400 /usr/bin/time -v python -c "$Q" --model /tmp/rq2 --calib $C --wbits 3.25 --out /tmp/rq2-q > $OUT/rq2_quant.log 2>&1; echo rq2 rc $?) &
timeout 330 /usr/bin/time -v python -c "$Q" --model /tmp/ref --calib $C --wbits 3.25 --out /tmp/g325 > $OUT/ref_quant.log 2>&1; echo ref rc $?
timeout 60 python -c "$E" --model /tmp/g325 --text $T --seq-len 512 --max-windows 16 --backend transformers --json $OUT/ref_eval.json > $OUT/ref_eval.log 2>&1; echo eval rc $?
wait
timeout 90 python .ab/s19/prof_profile.py /tmp/ref $C 32768 > $OUT/prof_profile.log 2>&1; echo prof rc $?
for d in g325 rq2-q; do mkdir -p $OUT/$d; cp /tmp/$d/report.json /tmp/$d/config.json $OUT/$d/ 2>/dev/null; done
tail -2 $OUT/ref_eval.log; tail -1 $OUT/rq2_make.log
for f in $OUT/*_quant.log; do echo $f; tr '\r' '\n' < $f | grep -E "100%|Elapsed|^time on|Error|error" | awk '!s[substr($0,1,20)]++' | cut -c1-150; done
head -40 $OUT/prof_profile.log | grep -v "it/s"
