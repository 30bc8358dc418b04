# session 19 call 10: a 6-layer random Qwen1.5-MoE quantized alone, after the device-resident profile samples and the
# checkpoint-dtype load (host memory)
. /tmp/vk/env.sh; export PYTHONPATH=.:$PYTHONPATH PYTHONUNBUFFERED=1
D=.gpu-carry/s19run; C=$D/calib.txt
Q="import sys;from offline.cli import quantize_main as m;sys.exit(m(sys.argv[1:]))"
python benchmarks/gpu_quantize_check.py random-model qwen1.5-moe-a2.7b /tmp/rq6 --layers 6 --tokenizer $D/cpu325 > $OUT/rq6_make.log 2>&1
timeout 400 /usr/bin/time -v python -c "$Q" --model /tmp/rq6 --calib $C --wbits 3.25 --out /tmp/rq6-q > $OUT/rq6_quant.log 2>&1; echo rq6 rc $?
cp /tmp/rq6-q/report.json $OUT/rq6_report.json
tail -1 $OUT/rq6_make.log
tr '\r' '\n' < $OUT/rq6_quant.log | grep -E "100%|Elapsed|^time on|Error|error|Maximum res" | awk '!s[substr($0,1,20)]++' | cut -c1-150
python -c "import json; r=json.load(open('$OUT/rq6_report.json')); print(r['stage_seconds'], r.get('peak_device_memory_gib'), r['achieved_avg_bits'])"
