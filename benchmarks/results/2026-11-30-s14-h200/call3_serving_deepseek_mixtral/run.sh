# session 14 call 3 (H200 x2). GPU0: DeepSeek-V2-Lite served with spread router gates (Marlin, mixed 3.25, w4g128).
# GPU1: Mixtral w4g128 against Marlin after the long-K split rule; the rule at 32/64 tokens; DeepSeek routing with and
# without spread gates (recorded); Qwen3 batch-256 traces with idle gaps (Marlin, mixed 3.25).
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
R=$OUT; mkdir -p $R/g0 $R/g1/base $R/g1/probe $R/g1/rt $R/g1/idle
( export CUDA_VISIBLE_DEVICES=0 OUT=$R/g0
  timeout 570 python3 benchmarks/gpu_serving_check.py all x x --config deepseek-v2-lite --skip-accuracy --latency-batches 1 \
     --variants gptq4_marlin,mxmoe_mixed325,mxmoe_w4g128 --spread-routers > $OUT/serving_ds.txt 2>&1; echo serving_ds rc $? ) &
J0=$!
( export CUDA_VISIBLE_DEVICES=1
  OUT=$R/g1/base timeout 170 python3 benchmarks/baselines.py --shapes mixtral-8x7b --ours w4g128 --tokens 1,2,4,16,64 \
     --budget-s 140 --procs 8 > $R/g1/base/log.txt 2>&1; echo base rc $?
  OUT=$R/g1/probe timeout 60 python3 benchmarks/decode_probe.py --shape mixtral-8x7b --assign w4g128 --tokens 32,64 --zipf-s 1 \
     --overrides sk1:split_k=1 sk2:split_k=2 sk4:split_k=4 > $R/g1/probe/log.txt 2>&1; echo probe rc $?
  timeout 110 python3 benchmarks/serving_profile.py --config deepseek-v2-lite --variants mxmoe_w4g128 --batch 64 --tokens 6 \
     --spread-routers --record-routing /tmp/ds_spread.pt > $R/g1/rt/spread.txt 2>&1; echo rec_spread rc $?
  OUT=$R/g1/idle timeout 200 python3 benchmarks/serving_profile.py --config qwen3-30b-a3b --variants gptq4_marlin,mxmoe_mixed325 --batch 256 \
     --tokens 32 --trace > $R/g1/idle/log.txt 2>&1; echo idle rc $?
  timeout 90 python3 benchmarks/serving_profile.py --config deepseek-v2-lite --variants mxmoe_w4g128 --batch 64 --tokens 6 \
     --record-routing /tmp/ds_plain.pt > $R/g1/rt/plain.txt 2>&1; echo rec_plain rc $?
) &
J1=$!
wait $J0 $J1
python3 - <<'PY' > $R/g1/rt/summary.txt 2>&1
import collections, torch
for tag in ("spread", "plain"):
    try:
        s = torch.load(f"/tmp/ds_{tag}.pt")
    except Exception as e:
        print(tag, "missing", e); continue
    per = collections.defaultdict(set); ws = []
    for key, ids, w in s:
        per[key].update(ids.flatten().tolist()); ws.append(w.flatten())
    w = torch.cat(ws)
    print(f"{tag}: {len(s)} samples, {len(per)} layers, distinct experts per layer min/max "
          f"{min(map(len, per.values()))}/{max(map(len, per.values()))}; topk weights min {w.min():.6f} "
          f"max {w.max():.6f} distinct {w.unique().numel()} (1/64 = {1/64:.6f})")
PY
cat $R/g1/rt/summary.txt
grep -h "RESULT\|Error\|error\|spread_routers" $R/g0/serving_ds.txt | grep -v "^INFO" | cut -c1-250 | tail -30
grep -v "^warm" $R/g1/base/baselines.txt 2>/dev/null | cut -c1-200; grep -v "^device" $R/g1/probe/log.txt | cut -c1-140
grep -h "^#" $R/g1/idle/serving_profile_*.txt 2>/dev/null | cut -c1-220; grep -h "Traceback\|Error" $R/g1/*/*.txt | head
cd $R && tar czf k3.tgz g0 g1 && rm -rf g0 g1
