import time
import h
from h import *
from offline.pipeline import _Pipeline, QuantizeOptions
from offline.profile import find_moe_layers
from offline.model_spec import inspect_model
t0 = time.time()
# holdout profile: GPTQ Hessians from 75% of the calibration sequences, Δ samples from the other 25%
opts = QuantizeOptions(wbits=2.25, calib_tokens=32768, seq_len=512, holdout=0.25, cache_dir="/tmp/mxmoe-accuracy/cache")
pipe = _Pipeline(MODEL, SH / "corpus" / "calib.txt", Path("/tmp/helper3/unused"), opts)
spec = inspect_model(MODEL)
seqs = pipe._calibration()
pm, _ = pipe._load_model()
store_h = pipe._profile(pm, find_moe_layers(pm, spec), seqs)
del pm
print("holdout profile", store_h.folder, pipe.stages, round(time.time() - t0), flush=True)
h.STORE = store_h
m = load_model(); sw = Swapper(m)
W = dev_windows(20)
S0 = ["w2", "w2g128", "w3g128", "w4g128", "w8"]
RICH = ["w2", "w2g64", "w2g128", "w3", "w3g128", "w4g128", "w8"]
g = np.array([5.46935425, 4.47812487, 3.35590696, 2.81236357, 2.14959838, 1.44789964, 0.94763215, 0.6643933])
fqs = {s: fq_all(m, s, clip="mse", tag="-ho") for s in RICH}
Dd = {s: get_deltas(m, s, tag="-ho", clip="mse") for s in RICH}
print("fq done", round(time.time() - t0), flush=True)
def ev(tag, alloc):
    sw.apply(alloc, fqs); p = ppl(m, W)
    print(f"{tag}: ppl {p:.4f} bits {avg_bits(alloc):.4f}", round(time.time() - t0), flush=True)
ev("holdout uniform w2g128 (full: 20.4699)", {l: (["w2g128"] * 32, ["w2g128"] * 32) for l in range(8)})
for wbits in (2.25, 3.25):
    for name, sset in (("S0", S0), ("rich", RICH)):
        ev(f"holdout layer {name} {wbits}", solve(Dd, sset, wbits, "layer"))
        ev(f"holdout model-fisher {name} {wbits}", solve(Dd, sset, wbits, "model", gains=g))
