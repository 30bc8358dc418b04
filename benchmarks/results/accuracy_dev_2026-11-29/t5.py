# additivity: per expert, measured Δ with gate_up AND down quantized vs sum; and whole-layer vs sum over experts
from h import *
m = load_model()
for s in ["w3g128", "w2g128"]:
    fq = fq_all(m, s)
    D = get_deltas(m, s)
    tot_sum = tot_both = 0
    for l in range(8):
        ex = experts_of(m, l); prof = STORE.load(f"model.layers.{l}.mlp.experts")
        sb = ss = 0
        for e in range(32):
            x, w = prof.samples(e)
            if x.shape[0] == 0: continue
            ref = expert_output(x, ex.gate_up_proj[e], ex.down_proj[e], ex.act_fn)
            sc = float(prof.counts[e]) / x.shape[0]
            sb += sc * weighted_error(expert_output(x, fq[l][0][e], fq[l][1][e], ex.act_fn), ref, w)
            ss += D[l, e].sum()
        print(s, l, "both/sum(gu,dn) = %.3f" % (sb/ss))

# whole-layer: mlp-output error with all experts of layer l quantized, vs Σ_e Δ (scaled to the token count)
from offline.calibration import load_calibration
seqs = load_calibration(MODEL, SH/"corpus"/"calib.txt", 512, 4096)  # 8 seqs
meta = STORE.meta(); N = meta["num_tokens"]
sw = Swapper(m)
outs = {}
def hook(l):
    def f(mod, a, o):
        outs[l] = (o[0] if isinstance(o, tuple) else o).detach().clone()
    return f
hs = [m.model.layers[l].mlp.register_forward_hook(hook(l)) for l in range(8)]
with torch.no_grad():
    m(seqs, use_cache=False); ref = dict(outs)
for s in ["w3g128", "w2g128"]:
    fq = fq_all(m, s); D = get_deltas(m, s)
    for l in range(8):
        sw.apply({l: ([s]*32, [s]*32)}, {s: fq})
        with torch.no_grad(): m(seqs, use_cache=False)
        meas = (outs[l] - ref[l]).double().pow(2).sum().item()
        print(s, l, "layer measured/Σ = %.3f" % (meas / (D[l].sum() * seqs.numel() / N)), flush=True)
sw.reset()
