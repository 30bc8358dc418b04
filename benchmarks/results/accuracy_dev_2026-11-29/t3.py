from h import *
m = load_model(); sw = Swapper(m)
W = dev_windows(); print(len(W))
t=time.time(); print("fp", ppl(m, W), time.time()-t, flush=True)
fq3 = fq_all(m, "w3g128")
sw.apply({l: (["w3g128"]*32, ["w3g128"]*32) for l in range(8)}, {"w3g128": fq3}); print("w3g128", ppl(m, W), flush=True)
