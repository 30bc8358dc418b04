import time
from h import *
from offline.gptq import _checked_hessian, _upper_cholesky_of_inverse, _Grid, _gptq_pass, DEFAULT_BLOCK_SIZE, run_gptq
from offline.quant_grid import _storable_scale
t0 = time.time()
m = load_model(); sw = Swapper(m)
W = dev_windows(20)
SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)

def gptq_rowclip(w, H, scheme, percdamp=0.01):
    """GPTQ with each row's grid chosen among the mse grid scaled by SHRINKS, by GPTQ's own loss."""
    weight = w.float()
    h = _checked_hessian(H, weight)
    if not (h.diagonal() > 0).any():
        return run_gptq(w, H, scheme, clip="mse").fake_quantized, None
    dead = h.diagonal() == 0; h[dead, dead] = 1.0
    imp = h.diagonal().float()
    order = torch.argsort(h.diagonal(), descending=True)
    hinv = _upper_cholesky_of_inverse(h[order][:, order], percdamp)
    base = _Grid.fitted(weight, scheme, imp, "mse")
    hf = h.float()
    best_q, best_loss, choice = None, None, None
    for i, p in enumerate(SHRINKS):
        g = _Grid(scheme, base.group, _storable_scale(base.scale.float() * p), base.zero)
        q = _gptq_pass(weight[:, order], hinv, order.tolist(), g, DEFAULT_BLOCK_SIZE, False)[:, torch.argsort(order)]
        d = q - weight
        loss = ((d @ hf) * d).sum(1)
        if best_q is None:
            best_q, best_loss, choice = q, loss, torch.zeros_like(loss, dtype=torch.long)
        else:
            better = loss < best_loss
            best_q[better], best_loss[better], choice[better] = q[better], loss[better], i
    return best_q, choice

def fq_rowclip(scheme):
    path = CACHE / f"{scheme}-gptq-rowclip-mse.pt"
    if path.exists(): return torch.load(path)
    s = parse_scheme(scheme); out = {}; hist = torch.zeros(len(SHRINKS))
    for l in range(8):
        ex = experts_of(m, l); prof = STORE.load(f"model.layers.{l}.mlp.experts")
        gu, dn = [], []
        for e in range(32):
            q, c = gptq_rowclip(ex.gate_up_proj[e], prof.gate_up_hessian[e], s); gu.append(q)
            if c is not None: hist += torch.bincount(c, minlength=len(SHRINKS))
            q, c = gptq_rowclip(ex.down_proj[e], prof.down_hessian[e], s); dn.append(q)
            if c is not None: hist += torch.bincount(c, minlength=len(SHRINKS))
        out[l] = (torch.stack(gu), torch.stack(dn))
    print(scheme, "shrink choices", dict(zip(SHRINKS, hist.tolist())), flush=True)
    torch.save(out, path); return out

def ev(tag, alloc, fqs):
    sw.apply(alloc, fqs); p = ppl(m, W)
    print(f"{tag}: ppl {p:.4f} bits {avg_bits(alloc):.4f}", round(time.time() - t0), flush=True)

# damping below the default, uniform w2g128 (default 0.01: 20.4699)
for damp in (0.001,):
    s = parse_scheme("w2g128"); fq = {}
    for l in range(8):
        ex = experts_of(m, l); prof = STORE.load(f"model.layers.{l}.mlp.experts")
        fq[l] = (torch.stack([run_gptq(ex.gate_up_proj[e].float(), prof.gate_up_hessian[e], s, percdamp=damp, clip="mse").fake_quantized for e in range(32)]),
                 torch.stack([run_gptq(ex.down_proj[e].float(), prof.down_hessian[e], s, percdamp=damp, clip="mse").fake_quantized for e in range(32)]))
    ev(f"damp{damp} uniform w2g128", {l: (["w2g128"] * 32, ["w2g128"] * 32) for l in range(8)}, {"w2g128": fq})

rc = {"w2g128": fq_rowclip("w2g128")}
ev("rowclip uniform w2g128 (mse: 20.4699)", {l: (["w2g128"] * 32, ["w2g128"] * 32) for l in range(8)}, rc)
