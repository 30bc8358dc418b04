import time
from h import *
t0 = time.time()
m = load_model(); sw = Swapper(m)
W = dev_windows(20)
print("windows", len(W), flush=True)
S0 = ["w2","w2g128","w3g128","w4g128","w8"]
EXTRA = ["w2g64","w2g32","w3","w3g64","w4"]
fqs, Dd = {}, {}
for s in S0 + EXTRA:
    fqs[s] = fq_all(m, s, clip="mse"); Dd[s] = get_deltas(m, s, clip="mse")
    print("fq", s, round(time.time()-t0), "sumD", Dd[s].sum(axis=(0,1)), flush=True)
g = np.array([5.46935425, 4.47812487, 3.35590696, 2.81236357, 2.14959838, 1.44789964, 0.94763215, 0.6643933])
SETS = {
 "S0": S0,
 "rich": ["w2","w2g64","w2g128","w3","w3g128","w4g128","w8"],
 "S0+w2g64": S0 + ["w2g64"],
 "S0+w3": S0 + ["w3"],
 "all": S0 + EXTRA,
}
def run(tag, sset, wbits, scope, gains=None):
    a = solve(Dd, SETS[sset], wbits, scope, gains=gains); sw.apply(a, fqs)
    p = ppl(m, W)
    print(f"{tag} {sset} {wbits} ppl {p:.4f} bits {avg_bits(a):.4f}", [round(avg_bits({l: a[l]}), 2) for l in range(8)], summary(a), round(time.time()-t0), flush=True)
for sset in ["S0", "rich", "all", "S0+w2g64", "S0+w3"]:
    run("layer", sset, 2.25, "layer")
    run("model-fisher", sset, 2.25, "model", g)
