# session 17 call D (H200): the reference MoE quantized with the new default quantizer (GPTQ in model order, fp target,
# dampening 0.3; session 16's whole-pipeline 3.25-bit checkpoint, r=1) on the GPU: vLLM offline (prompt logprobs,
# greedy text), then `vllm serve --quantization mxmoe` over HTTP; 16 windows of test.txt, CPU figure 17.4617.
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
R=$OUT; mkdir -p $R/acc $R/http
OUT=$R/acc timeout 280 python3 benchmarks/gpu_serving_check.py accuracy .gpu-carry/fp325/ckpt .gpu-carry/fp325/windows.json > $R/acc/log.txt 2>&1; echo acc rc $?
OUT=$R/http timeout 280 python3 benchmarks/gpu_serving_check.py http .gpu-carry/fp325/ckpt .gpu-carry/fp325/windows.json > $R/http/log.txt 2>&1; echo http rc $?
grep -h "^RESULT" $R/*/log.txt | cut -c1-900
grep -h "Traceback\|Error" $R/*/log.txt | sort | uniq -c | head
cd $R && tar czf kD.tgz acc http && rm -rf acc http
