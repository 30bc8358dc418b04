from h import *
m = load_model(); sw = Swapper(m)
W = dev_windows(20)
base = math.log(17.930099592259584)
s = "w2g128"; fq = fq_all(m, s); D = get_deltas(m, s)
for l in range(8):
    sw.apply({l: ([s]*32, [s]*32)}, {s: fq})
    d = math.log(ppl(m, W)) - base
    print(l, "dNLL %.5f  sumDelta %.4g  gain %.4g" % (d, D[l].sum(), d / D[l].sum()), flush=True)
