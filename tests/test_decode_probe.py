"""benchmarks/decode_probe.py on the CPU interpreter: the script runs, and a config override (two K
tiles per loop iteration) computes the same GEMM as the shipped config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_decode_probe_cpu_smoke(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OUT=str(tmp_path), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "benchmarks/decode_probe.py"), "--cpu-smoke", "--assign", "w4g128,mixed3.25",
           "--tokens", "9", "--overrides", "u2:k_unroll=2,num_stages=3"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    table = (tmp_path / "decode_probe.txt").read_text()
    shipped = [line for line in table.splitlines() if re.search(r" (gate_up|down) +m16 ", line)]
    assert len(shipped) == 4, table  # two layers x two GEMMs
    diffs = [float(d) for d in re.findall(r"diff ([0-9.e+-]+)\)", table)]
    assert len(diffs) == 4 and max(diffs) < 1e-3, table
