from h import *
m = load_model(); sw = Swapper(m)
W = dev_windows(20)
S0 = ["w2","w2g128","w3g128","w4g128","w8"]
fqs = {s: fq_all(m, s, clip="mse") for s in S0}
Dd = {s: get_deltas(m, s, clip="mse") for s in S0}
sw.apply({l: (["w3g128"]*32, ["w3g128"]*32) for l in range(8)}, fqs); print("uniform w3g128 mse", ppl(m, W), flush=True)
g = np.array([5.46935425, 4.47812487, 3.35590696, 2.81236357, 2.14959838, 1.44789964, 0.94763215, 0.6643933])
for name, scope, gains in [("model", "model", None), ("layer", "layer", None), ("model-fisher", "model", g)]:
    a = solve(Dd, S0, 3.25, scope, gains=gains); sw.apply(a, fqs)
    print(name, "3.25 ppl %.4f" % ppl(m, W), [round(avg_bits({l: a[l]}), 2) for l in range(8)], flush=True)
sw.apply({l: (["w2g128"]*32, ["w2g128"]*32) for l in range(8)}, fqs); print("uniform w2g128 mse", ppl(m, W), flush=True)
for name, scope, gains in [("model", "model", None), ("layer", "layer", None), ("model-fisher", "model", g)]:
    a = solve(Dd, S0, 2.25, scope, gains=gains); sw.apply(a, fqs)
    print(name, "2.25 ppl %.4f" % ppl(m, W), [round(avg_bits({l: a[l]}), 2) for l in range(8)], flush=True)
