import time, sys
import h
from h import *
from offline.pipeline import _Pipeline, QuantizeOptions
from offline.profile import find_moe_layers
from offline.model_spec import inspect_model
from offline.gptq import run_gptq
t0 = time.time()
# routing-weighted profile through the pipeline's own code (same seed/sample as the benchmark's)
opts = QuantizeOptions(wbits=2.25, calib_tokens=32768, seq_len=512, hessian_weights="routing",
                       cache_dir="/tmp/helper3/cache-w")
pipe = _Pipeline(MODEL, SH / "corpus" / "calib.txt", Path("/tmp/helper3/unused"), opts)
spec = inspect_model(MODEL)
seqs = pipe._calibration()
pm, _ = pipe._load_model()
store_w = pipe._profile(pm, find_moe_layers(pm, spec), seqs)
del pm
print("weighted profile", store_w.folder, pipe.stages, round(time.time() - t0), flush=True)
# sanity: the samples are the same as the old profile's
a, b = STORE.load("model.layers.3.mlp.experts"), store_w.load("model.layers.3.mlp.experts")
print("same samples:", torch.equal(a.sample_inputs, b.sample_inputs), "counts:", torch.equal(a.counts, b.counts), flush=True)

m = load_model(); sw = Swapper(m)
W = dev_windows(20)
S0 = ["w2", "w2g128", "w3g128", "w4g128", "w8"]
g = np.array([5.46935425, 4.47812487, 3.35590696, 2.81236357, 2.14959838, 1.44789964, 0.94763215, 0.6643933])
base_fq = {s: fq_all(m, s, clip="mse") for s in S0}
base_D = {s: get_deltas(m, s, clip="mse") for s in S0}
old_store = h.STORE
h.STORE = store_w
w_fq = {s: fq_all(m, s, clip="mse", tag="-rw") for s in S0}
h.STORE = old_store  # Δ on the same samples either way
w_D = {s: get_deltas(m, s, tag="-rw", clip="mse") for s in S0}
print("fq weighted done", round(time.time() - t0), {s: w_D[s].sum() / base_D[s].sum() for s in S0}, flush=True)

def ev(tag, alloc, fqs):
    sw.apply(alloc, fqs); p = ppl(m, W)
    print(f"{tag}: ppl {p:.4f} bits {avg_bits(alloc):.4f}", round(time.time() - t0), flush=True)
for s in ("w2g128", "w3g128"):
    ev(f"weighted uniform {s}", {l: ([s] * 32, [s] * 32) for l in range(8)}, w_fq)
ev("weighted layer 2.25", solve(w_D, S0, 2.25, "layer"), w_fq)
ev("weighted model-fisher 2.25", solve(w_D, S0, 2.25, "model", gains=g), w_fq)
ev("weighted layer 3.25", solve(w_D, S0, 3.25, "layer"), w_fq)
ev("weighted model-fisher 3.25", solve(w_D, S0, 3.25, "model", gains=g), w_fq)

# Hessian damping 0.1 instead of 0.01 (plain Hessians)
def fq_damp(scheme, damp):
    path = CACHE / f"{scheme}-gptq-damp{damp}-mse.pt"
    if path.exists(): return torch.load(path)
    s = parse_scheme(scheme); out = {}
    for l in range(8):
        ex = experts_of(m, l); prof = STORE.load(f"model.layers.{l}.mlp.experts")
        gu = torch.stack([run_gptq(ex.gate_up_proj[e].float(), prof.gate_up_hessian[e], s, percdamp=damp, clip="mse").fake_quantized for e in range(32)])
        dn = torch.stack([run_gptq(ex.down_proj[e].float(), prof.down_hessian[e], s, percdamp=damp, clip="mse").fake_quantized for e in range(32)])
        out[l] = (gu, dn)
    torch.save(out, path); return out
d_fq = {s: fq_damp(s, 0.1) for s in ("w2", "w2g128", "w3g128")}
d_fq.update({s: base_fq[s] for s in ("w4g128", "w8")})
ev("damp0.1 uniform w2g128", {l: (["w2g128"] * 32, ["w2g128"] * 32) for l in range(8)}, d_fq)
d_D = {s: deltas(m, d_fq[s]) for s in S0}
ev("damp0.1 layer 2.25", solve(d_D, S0, 2.25, "layer"), d_fq)
