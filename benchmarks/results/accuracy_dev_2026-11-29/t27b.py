import sys; sys.path.insert(0, "/tmp/dev")
from h import *
import offline.gptq as G
from offline.gptq import run_gptq, refit_scales, GPTQResult
def gptq_with_grid(W, H, sc, scale, zero, percdamp=0.1):
    weight = W.float(); h = G._checked_hessian(H, weight)
    dead = h.diagonal() == 0; h[dead, dead] = 1.0
    order = torch.argsort(h.diagonal(), descending=True)
    hinv = G._upper_cholesky_of_inverse(h[order][:, order], percdamp)
    grid = G._Grid(sc, sc.group(weight.shape[1]), scale.clone(), None if zero is None else zero.clone())
    q = G._gptq_pass(weight[:, order], hinv, order.tolist(), grid, 128, False)
    return GPTQResult(q[:, torch.argsort(order)], grid.scale, grid.zero, sc, used_rtn=False)
m = load_model()
for l in (0, 4):
    ex = experts_of(m, l); prof = STORE.load(f"model.layers.{l}.mlp.experts")
    sc = parse_scheme("w2g128"); errs = np.zeros(5)
    for e in range(0, 32, 4):
        for W, H in ((ex.gate_up_proj[e].float(), prof.gate_up_hessian[e]), (ex.down_proj[e].float(), prof.down_hessian[e])):
            Hf = H.float(); err = lambda f: torch.einsum("nk,kl,nl->", W - f, Hf, W - f).item()
            r = run_gptq(W, H, sc, percdamp=0.1, clip="mse"); errs[0] += err(r.fake_quantized)
            for it in range(1, 5):
                r = refit_scales(W, H, r); errs[it] += err(r.fake_quantized) if it % 2 else 0
                if it % 2 == 1:
                    r = gptq_with_grid(W, H, sc, r.scale, r.zero)
                else:
                    errs[it] += err(r.fake_quantized)
    print(l, "gptq, refit, gptq(refit grid), refit, gptq:", np.round(errs, 2), flush=True)
