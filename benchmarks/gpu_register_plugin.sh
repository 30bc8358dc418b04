#!/usr/bin/env bash
# On the GPU machine after ../shared/gpu-vllm (vLLM in /tmp/vk/site): make vLLM find the
# plugin without pip. `pip install -e . --no-build-isolation` there did not register the
# vllm.general_plugins entry point (2026-11-29); a dist-info beside vLLM does.
# Use: . /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
site=/tmp/vk/site
info="$site/vllm_mxmoe-0.1.0.dist-info"
mkdir -p "$info"
printf '[vllm.general_plugins]\nmxmoe = vllm_mxmoe:register\n' > "$info/entry_points.txt"
printf 'Metadata-Version: 2.1\nName: vllm-mxmoe\nVersion: 0.1.0\n' > "$info/METADATA"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
