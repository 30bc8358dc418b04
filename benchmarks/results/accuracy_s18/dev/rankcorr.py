"""s18 dev (python rankcorr.py SEED): per layer and unit, the Spearman correlation between the profile's and the
in-order Δ of the gain of a 3-bit block over w2, Δ(w2) - Δ(w3g128_sym) (what the 2.25-bit ILP ranks blocks by),
and the ratio of their sums (in order / profile). Reads the newest 7 sensitivity files of the seed's cache."""
import sys, glob, os
import numpy as np, torch
from scipy.stats import spearmanr
seed = sys.argv[1]
cache = f"/tmp/s18acc/cache_seed{seed}"
prof = {}
newest = sorted(glob.glob(f"{cache}/sensitivity-*.pt"), key=os.path.getmtime)[-7:]
for f in newest:
    x = torch.load(f); prof[x["scheme"]] = x["loss"]
S = ("w2", "w2g128", "w3g128", "w4g128", "w8", "w3g128_sym", "w4g128_sym")
ino = torch.load(f"/tmp/s18acc/inorder_loss_inorder-seed{seed}.pt")
for p in ino:
    c = np.stack([prof[s][p].numpy() for s in S], -1); d = ino[p].numpy()
    out = []
    for u in (0, 1):
        gc = c[:, u, 0] - c[:, u, 5]; gd = d[:, u, 0] - d[:, u, 5]
        out.append(f"{spearmanr(gc, gd)[0]:.3f}")
        out.append(f"gain ratio {gd.sum() / gc.sum():.2f}")
    print(p.split(".")[2], "gate_up rho", out[0], out[1], "| down rho", out[2], out[3])
