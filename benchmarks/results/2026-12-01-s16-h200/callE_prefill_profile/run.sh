# session 16 call E (H200), code 91587af + serving_profile --fresh. Qwen1.5-MoE-A2.7B (spread gates), batch 16, fresh
# prompts, one output token: the 2048-token prefill step profiled (kernel time per name, GPU idle), Marlin then mixed.
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
R=$OUT
OUT=$R timeout 330 python3 benchmarks/serving_profile.py --config qwen1.5-moe-a2.7b --variants gptq4_marlin,mxmoe_mixed325 \
   --batch 16 --tokens 1 --fresh --trace --spread-routers > $R/log.txt 2>&1; echo prof rc $?
grep "^#\|^ *[0-9]" $R/log.txt | cut -c1-150 | head -90
cd $R && tar czf kE.tgz *.txt *.json 2>/dev/null; ls
