import time
from h import *
t0 = time.time()
m = load_model(); sw = Swapper(m)
W = dev_windows(20)
S0 = ["w2","w2g128","w3g128","w4g128","w8"]
EXTRA = ["w2g64","w2g32","w3","w3g64","w4"]
fqs = {s: fq_all(m, s, clip="mse") for s in S0 + EXTRA}
Dd = {s: get_deltas(m, s, clip="mse") for s in S0 + EXTRA}
g = np.array([5.46935425, 4.47812487, 3.35590696, 2.81236357, 2.14959838, 1.44789964, 0.94763215, 0.6643933])
SETS = {"S0": S0, "rich": ["w2","w2g64","w2g128","w3","w3g128","w4g128","w8"], "all": S0 + EXTRA}
for wbits in (3.25,):
    for sset in SETS:
        for scope, gains in (("layer", None), ("model", g)):
            a = solve(Dd, SETS[sset], wbits, scope, gains=gains); sw.apply(a, fqs)
            print(f"{scope} {sset} {wbits} ppl {ppl(m, W):.4f} bits {avg_bits(a):.4f}", summary(a), round(time.time()-t0), flush=True)
