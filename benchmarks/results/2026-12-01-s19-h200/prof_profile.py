"""cProfile of offline.profile.profile_model on the device (which Python calls its time goes to)."""
import cProfile, pstats, sys, time, tempfile
from pathlib import Path
import torch
from offline.pipeline import _Pipeline, QuantizeOptions
from offline.profile import find_moe_layers, profile_model, ProfileStore
from offline.model_spec import inspect_model

model_dir, calib, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
opts = QuantizeOptions(wbits=3.25, calib_tokens=tokens)
p = _Pipeline(Path(model_dir), Path(calib), Path(tempfile.mkdtemp()), opts)
p.spec = inspect_model(Path(model_dir))
seqs = p._calibration()
model, _ = p._load_model()
layers = find_moe_layers(model, p.spec)[:2]
store = ProfileStore(Path(tempfile.mkdtemp()) / "prof")
t = time.perf_counter()
pr = cProfile.Profile(); pr.enable()
profile_model(model, layers, seqs, store)
torch.cuda.synchronize() if torch.cuda.is_available() else None
pr.disable()
print(f"profile of 2 layers, {tokens} tokens: {time.perf_counter() - t:.1f} s")
pstats.Stats(pr).sort_stats("tottime").print_stats(25)
