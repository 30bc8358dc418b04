# s15 test rows with the wider clip search (max shrink 0.75, 30 steps), run through benchmarks/accuracy.py with a
# monkeypatch of offline.quant_grid.fit_grid_mse's defaults. $1: work dir, $2: results dir, $3: config names.
cd /work/main
python - "$@" <<'PY'
import sys
sys.path.insert(0, "/work/main")
from offline import quant_grid
quant_grid.fit_grid_mse.__defaults__ = (None, 30, 0.75)
import runpy
work, results, only = sys.argv[1:4]
sys.argv = ["benchmarks/accuracy.py", "--threads", "1", "--calib-tokens", "131072", "--work", work, "--results", results,
            "--only", only]
runpy.run_path("benchmarks/accuracy.py", run_name="__main__")
PY
