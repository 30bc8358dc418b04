from h import *
import sys
m = load_model(); sw = Swapper(m)
W = dev_windows(20)
S0 = ["w2","w2g128","w3g128","w4g128","w8"]
S1 = S0 + ["w2g64","w3g64","w3","w4","w4g64","w2g32","w3g32"]
wb = float(sys.argv[1]) if len(sys.argv) > 1 else 3.25
Dd = {s: get_deltas(m, s) for s in S1}
fqs = {s: fq_all(m, s) for s in S1}
for name, S, scope in [("S0-layer", S0, "layer"), ("S1-layer", S1, "layer"), ("S0-global", S0, "model"), ("S1-global", S1, "model")]:
    a = solve(Dd, S, wb, scope)
    pred = sum(Dd[a[l][0][e]][l, e, 0] + Dd[a[l][1][e]][l, e, 1] for l in range(8) for e in range(32))
    sw.apply(a, fqs)
    print(name, wb, "bits %.4f" % avg_bits(a), "predΣΔ %.4g" % pred, "ppl %.4f" % ppl(m, W), summary(a), flush=True)
