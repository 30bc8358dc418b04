import os
import sys
from pathlib import Path

# The Triton kernels run under the CPU interpreter in tests. It must be on before
# anything imports triton (some dependencies do), hence here rather than in
# test_kernels.py. vLLM subprocesses get it removed again (helpers.subprocess_env).
os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
