# Coordinate descent on GPTQ's codes (gptq.refine_codes), dev set; GPTQ damp 0.1, mse grids as t25/t26.
import time
from h import *
from offline.gptq import run_gptq, refine_codes
t0 = time.time()
m = load_model(); sw = Swapper(m)
W = dev_windows(20)

def ev(tag, alloc, fqs):
    sw.apply(alloc, fqs); p = ppl(m, W)
    print(f"{tag}: ppl {p:.4f} bits {avg_bits(alloc):.4f}", round(time.time() - t0), flush=True)

def fq_cd(scheme, sweeps, cd_damp, damp=0.1):
    path = CACHE / f"{scheme}-gptq-damp{damp}-mse-cd{sweeps}-{cd_damp}.pt"
    if path.exists(): return torch.load(path)
    sc = parse_scheme(scheme); fq = {}; before = after = 0.0
    for l in range(8):
        ex = experts_of(m, l); prof = STORE.load(f"model.layers.{l}.mlp.experts")
        out = []
        for Wts, Hs in ((ex.gate_up_proj, prof.gate_up_hessian), (ex.down_proj, prof.down_hessian)):
            blocks = []
            for e in range(32):
                Wf, H = Wts[e].float(), Hs[e]
                r = run_gptq(Wf, H, sc, percdamp=damp, clip="mse")
                r2 = refine_codes(Wf, H, r, sweeps, percdamp=cd_damp) if sweeps else r
                Hf = H.float()
                before += torch.einsum("nk,kl,nl->", Wf - r.fake_quantized, Hf, Wf - r.fake_quantized).item()
                after += torch.einsum("nk,kl,nl->", Wf - r2.fake_quantized, Hf, Wf - r2.fake_quantized).item()
                blocks.append(r2.fake_quantized)
            out.append(torch.stack(blocks))
        fq[l] = tuple(out)
    print(f"  {scheme} cd{sweeps} damp{cd_damp}: calib error {before:.4g} -> {after:.4g} ({100*(1-after/before):.1f}% less)", round(time.time() - t0), flush=True)
    torch.save(fq, path); return fq
S0 = ["w2", "w2g128", "w3g128", "w4g128", "w8"]
g = np.array([5.46935425, 4.47812487, 3.35590696, 2.81236357, 2.14959838, 1.44789964, 0.94763215, 0.6643933])
U2 = {l: (["w2g128"] * 32, ["w2g128"] * 32) for l in range(8)}
U3 = {l: (["w3g128"] * 32, ["w3g128"] * 32) for l in range(8)}
for sweeps, cd_damp in ((0, 0.1), (2, 0.1), (2, 0.01)):
    sw.reset()
    with torch.no_grad():
        fq = {s: fq_cd(s, sweeps if s != "w8" else 0, cd_damp) for s in S0}
        D = {s: deltas(m, fq[s]) for s in S0}
    ev(f"cd{sweeps} damp{cd_damp} uniform w2g128 (no cd: 20.156)", U2, fq)
    ev(f"cd{sweeps} damp{cd_damp} layer 2.25 (19.3226)", solve(D, S0, 2.25, "layer"), fq)
    ev(f"cd{sweeps} damp{cd_damp} model-fisher 2.25 (19.3701)", solve(D, S0, 2.25, "model", gains=g), fq)
    ev(f"cd{sweeps} damp{cd_damp} uniform w3g128 (18.0696)", U3, fq)
    ev(f"cd{sweeps} damp{cd_damp} layer 3.25 (18.0034)", solve(D, S0, 3.25, "layer"), fq)
print("done")
