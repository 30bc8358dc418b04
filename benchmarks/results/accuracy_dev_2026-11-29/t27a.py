import sys; sys.path.insert(0, "/tmp/dev")
from h import *
from offline.gptq import run_gptq, refit_scales
m = load_model()
for l in (0, 4, 7):
    ex = experts_of(m, l); prof = STORE.load(f"model.layers.{l}.mlp.experts")
    for sch in ("w2g128", "w2", "w3g128"):
        sc = parse_scheme(sch); a = b = 0.0
        for e in range(0, 32, 4):
            for W, H in ((ex.gate_up_proj[e].float(), prof.gate_up_hessian[e]), (ex.down_proj[e].float(), prof.down_hessian[e])):
                r = run_gptq(W, H, sc, percdamp=0.1, clip="mse"); r2 = refit_scales(W, H, r)
                Hf = H.float()
                a += torch.einsum("nk,kl,nl->", W - r.fake_quantized, Hf, W - r.fake_quantized).item()
                b += torch.einsum("nk,kl,nl->", W - r2.fake_quantized, Hf, W - r2.fake_quantized).item()
        print(l, sch, f"{a:.4g} -> {b:.4g} ({100*(1-b/a):.1f}% less)", flush=True)
