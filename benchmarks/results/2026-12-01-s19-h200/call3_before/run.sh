# session 19 call 2: the offline pipeline on the H200 (before batched GPTQ): reference MoE 3.25 bits + eval; 1-layer random Qwen1.5
set -x
cp .gpu-carry/refB/*.safetensors .gpu-carry/refB/model.safetensors.index.json /tmp/ref/ && ls /tmp/ref | wc -l
C=.gpu-carry/refB/calib.txt; T=.gpu-carry/refB/test.txt; export PYTHONPATH=. PYTHONUNBUFFERED=1
(timeout 420 /usr/bin/time -v python -c 'import sys;from offline.cli import quantize_main as m;sys.exit(m(sys.argv[1:]))' --model /tmp/rq1 --calib $C --wbits 3.25 --out /tmp/rq1-q > $OUT/rq1_quant.log 2>&1; echo rq1 rc $?) &
timeout 400 /usr/bin/time -v python -c 'import sys;from offline.cli import quantize_main as m;sys.exit(m(sys.argv[1:]))' --model /tmp/ref --calib $C --wbits 3.25 --out /tmp/g325 > $OUT/ref_quant.log 2>&1; echo ref rc $?
timeout 100 python -c 'import sys;from offline.evaluate import eval_main as m;sys.exit(m(sys.argv[1:]))' --model /tmp/g325 --text $T --seq-len 512 --max-windows 16 --backend transformers --json $OUT/ref_eval.json > $OUT/ref_eval.log 2>&1; echo eval rc $?
wait
for d in g325 rq1-q; do mkdir -p $OUT/$d; cp /tmp/$d/report.json /tmp/$d/config.json $OUT/$d/ 2>/dev/null; done
tail -c 400 $OUT/*_quant.log; cat $OUT/ref_eval.log | tail -2; cat $OUT/rq1_make.log | tail -1
grep -h "Maximum resident\|Elapsed (wall" $OUT/*_quant.log
python -c "import json;[print(d, json.load(open(f'$OUT/{d}/report.json')).get('stage_seconds'), json.load(open(f'$OUT/{d}/report.json')).get('peak_device_memory_gib')) for d in ('g325','rq1-q')]"
