# session 19 call 9: the CPU-made 3.25-bit reference checkpoint evaluated on the GPU; a 6-layer random Qwen1.5-MoE quantized alone
. /tmp/vk/env.sh; export PYTHONPATH=.:$PYTHONPATH PYTHONUNBUFFERED=1
D=.gpu-carry/s19run; C=$D/calib.txt; T=$D/test.txt
Q="import sys;from offline.cli import quantize_main as m;sys.exit(m(sys.argv[1:]))"
E="import sys;from offline.evaluate import eval_main as m;sys.exit(m(sys.argv[1:]))"
timeout 60 python -c "$E" --model $D/cpu325 --text $T --seq-len 512 --max-windows 16 --backend transformers > $OUT/cpu_ckpt_eval_on_gpu.log 2>&1; echo eval rc $?
python benchmarks/gpu_quantize_check.py random-model qwen1.5-moe-a2.7b /tmp/rq6 --layers 6 --tokenizer $D/cpu325 > $OUT/rq6_make.log 2>&1
timeout 420 /usr/bin/time -v python -c "$Q" --model /tmp/rq6 --calib $C --wbits 3.25 --out /tmp/rq6-q > $OUT/rq6_quant.log 2>&1; echo rq6 rc $?
cp /tmp/rq6-q/report.json $OUT/rq6_report.json
tail -1 $OUT/cpu_ckpt_eval_on_gpu.log; tail -1 $OUT/rq6_make.log
tr '\r' '\n' < $OUT/rq6_quant.log | grep -E "100%|Elapsed|^time on|Error|error|Maximum res" | awk '!s[substr($0,1,20)]++' | cut -c1-150
timeout 100 python .ab/s19/prof_profile.py /tmp/rq6 $C 32768 > $OUT/prof_profile_rq6.log 2>&1; echo prof rc $?
grep -v "it/s" $OUT/prof_profile_rq6.log | head -36
