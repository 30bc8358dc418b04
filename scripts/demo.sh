#!/usr/bin/env bash
# Fresh machine -> quantized reference MoE served by vLLM -> one real answer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 scripts/demo.py "$@"
