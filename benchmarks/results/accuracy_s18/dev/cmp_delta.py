"""s18 dev: per MoE layer, the in-order Δ (inorder.py) against the profile's cached Δ, and how many blocks changed
scheme. Usage: python cmp_delta.py SEED (after inorder.py control-seedSEED and inorder-seedSEED)"""
import sys, json
sys.path.insert(0, "/work/main")
import numpy as np, torch
torch.set_num_threads(1)
from pathlib import Path
sys.path.insert(0, "/work/main/benchmarks/results/accuracy_s18/dev")
import inorder as I
from offline import pipeline as P
from offline.model_spec import inspect_model
from offline.profile import find_moe_layers
seed = int(sys.argv[1])
o = P.QuantizeOptions(**I.BEST225, seed=seed, cache_dir=f"/tmp/s18acc/cache_seed{seed}")
p = P._Pipeline(I.MODEL, I.CAL, Path("/tmp/s18acc/x"), o); p.spec = inspect_model(I.MODEL)
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(str(I.MODEL), dtype=torch.float32)
ml = find_moe_layers(model, p.spec)
store = P.ProfileStore(p.cache / f"profile-{p._profile_key()}")
assert store.exists()
cached = p._sensitivity(ml, store, lambda: (_ for _ in ()).throw(RuntimeError("Δ not cached")))
ino = {k: v.numpy() for k, v in torch.load(f"/tmp/s18acc/inorder_loss_inorder-seed{seed}.pt").items()}
a = I.allocation(json.load(open(f"/tmp/s18acc/out/control-seed{seed}/report.json")))
b = I.allocation(json.load(open(f"/tmp/s18acc/out/inorder-seed{seed}/report.json")))
for m in ml:
    c, d = cached[m.prefix], ino[m.prefix]
    ch = [sum(x != y for x, y in zip(a[m.prefix][u], b[m.prefix][u])) for u in (0, 1)]
    bits = {}
    for u in (0, 1):
        for s in b[m.prefix][u]: bits[s] = bits.get(s, 0) + 1
    print(m.index, f"maxreldiff {np.abs(c - d).max() / np.abs(c).max():.3g}",
          f"sum cached w2g128 {c[..., 1].sum():.4g} inorder {d[..., 1].sum():.4g}",
          f"ratio(w4g128) {d[..., 3].sum() / c[..., 3].sum():.3f} ratio(w2) {d[..., 0].sum() / c[..., 0].sum():.3f}",
          "changed gate_up/down", ch, json.dumps(dict(sorted(bits.items()))))
