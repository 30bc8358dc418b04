from h import *
import re
m = load_model(); sw = Swapper(m)
W = dev_windows(20)
S0 = ["w2","w2g128","w3g128","w4g128","w8"]
Dd = {s: get_deltas(m, s) for s in S0}
fqs = {s: fq_all(m, s) for s in S0}
gains = {}
for line in open("t8.log"):
    mm = re.match(r"(\d) dNLL .* gain (\S+)", line)
    if mm: gains[int(mm[1])] = float(mm[2])
g = np.array([gains[l] for l in range(8)]); print("gains", g)
for wb in (3.25, 2.25):
    a = solve(Dd, S0, wb, "model", gains=g)
    sw.apply(a, fqs)
    print("S0-global-gains", wb, "bits %.4f" % avg_bits(a), "ppl %.4f" % ppl(m, W), flush=True)
    print("  per-layer bits", [round(avg_bits({l: a[l]}), 3) for l in range(8)], flush=True)
    a = solve(Dd, S0, wb, "model")
    print("  raw-global per-layer bits", [round(avg_bits({l: a[l]}), 3) for l in range(8)], flush=True)
