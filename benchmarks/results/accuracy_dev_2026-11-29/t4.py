from h import *
m = load_model(); sw = Swapper(m)
W = dev_windows(20); print(len(W))
print("fp", ppl(m, W), flush=True)
for s in ["w3g128", "w2g128"]:
    for clip in ["minmax", "mse"]:
        fq = fq_all(m, s, clip=clip)
        sw.apply({l: ([s]*32, [s]*32) for l in range(8)}, {s: fq}); print(s, clip, ppl(m, W), flush=True)
