# session 17 call B (H200): direct launches of the compiled Triton kernels (vllm_mxmoe/kernels/launch.py).
# 1) kernel_check correctness, every case twice (the second pass launches through the kept compiled kernels);
# 2) host time per eager MoE layer, direct launches off / on, with vLLM's Marlin and bf16 ops.
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
R=$OUT; mkdir -p $R/kc $R/host
OUT=$R/kc timeout 260 python3 benchmarks/kernel_check.py --parts check --check-modes default --procs 14 > $R/kc/log.txt 2>&1
echo kc rc $?
for d in 0 1 0 1; do
  MXMOE_DIRECT_LAUNCH=$d timeout 100 python3 benchmarks/host_overhead.py --device cuda --shape qwen1.5-moe --assign mixed3.25 \
     --tokens 16,256,2048,8192 $([ $d = 1 ] && echo --baselines) >> $R/host/direct$d.txt 2>&1; echo host $d rc $?
done
grep -c " ok$" $R/kc/log.txt; grep -h "FAIL\|failed\|correctness:" $R/kc/log.txt | head -20
grep -h "^ *[a-z0-9.]* *all\|mixed3.25" $R/kc/log.txt | awk '$5==2' | head -5
cat $R/host/direct*.txt | grep -v "^#" | cut -c1-150
grep -h "Traceback\|Error" $R/*/*.txt | sort | uniq -c | head
cd $R && tar czf kB.tgz kc host && rm -rf kc host
