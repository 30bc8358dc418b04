# Dampening past 0.1 (share of the mean Hessian diagonal): 0.3 and 1.0, every candidate scheme, dev set.
import time
from h import *
from offline.gptq import run_gptq
t0 = time.time()
m = load_model(); sw = Swapper(m)
W = dev_windows(20)

def ev(tag, alloc, fqs):
    sw.apply(alloc, fqs); p = ppl(m, W)
    print(f"{tag}: ppl {p:.4f} bits {avg_bits(alloc):.4f}", round(time.time() - t0), flush=True)

def fq_damp_s(scheme, damp):
    path = CACHE / f"{scheme}-gptq-damp{damp}-mse-fixed.pt"
    if path.exists(): return torch.load(path)
    sc = parse_scheme(scheme); fq = {}
    for l in range(8):
        ex = experts_of(m, l); prof = STORE.load(f"model.layers.{l}.mlp.experts")
        fq[l] = (torch.stack([run_gptq(ex.gate_up_proj[e].float(), prof.gate_up_hessian[e], sc, percdamp=damp, clip="mse").fake_quantized for e in range(32)]),
                 torch.stack([run_gptq(ex.down_proj[e].float(), prof.down_hessian[e], sc, percdamp=damp, clip="mse").fake_quantized for e in range(32)]))
    torch.save(fq, path); return fq
S0 = ["w2", "w2g128", "w3g128", "w4g128", "w8"]
g = np.array([5.46935425, 4.47812487, 3.35590696, 2.81236357, 2.14959838, 1.44789964, 0.94763215, 0.6643933])
U2 = {l: (["w2g128"] * 32, ["w2g128"] * 32) for l in range(8)}
U3 = {l: (["w3g128"] * 32, ["w3g128"] * 32) for l in range(8)}
for damp in (0.3, 1.0):
    sw.reset()
    with torch.no_grad():
        fq = {s: fq_damp_s(s, damp) for s in S0}
        D = {s: deltas(m, fq[s]) for s in S0}
    ev(f"damp{damp} uniform w2g128 (0.1: 20.156, 0.01: 20.4699)", U2, fq)
    ev(f"damp{damp} layer 2.25 (0.1: 19.3226)", solve(D, S0, 2.25, "layer"), fq)
    ev(f"damp{damp} model-fisher 2.25 (0.1: 19.3701)", solve(D, S0, 2.25, "model", gains=g), fq)
    ev(f"damp{damp} uniform w3g128 (0.1: 18.0696)", U3, fq)
    ev(f"damp{damp} layer 3.25 (0.1: 18.0034)", solve(D, S0, 3.25, "layer"), fq)
