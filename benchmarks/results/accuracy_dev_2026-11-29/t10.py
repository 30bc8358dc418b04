from h import *
from offline.calibration import load_calibration
m = load_model()
for p in m.parameters(): p.requires_grad_(False)
seqs = load_calibration(MODEL, SH/"corpus"/"calib.txt", 512, 8192)
acc = np.zeros(8); n = 0
grads = {}
def hook(l):
    def f(mod, gin, gout):
        grads[l] = gout[0].detach()
    return f
hs = [m.model.layers[l].mlp.register_full_backward_hook(hook(l)) for l in range(8)]
for b in seqs.split(4):
    emb = m.model.embed_tokens(b).detach().requires_grad_(True)
    out = m(inputs_embeds=emb, labels=b, use_cache=False)
    (out.loss * b[:, 1:].numel()).backward()
    for l in range(8): acc[l] += grads[l].double().pow(2).sum().item()
    n += b.numel()
fisher = acc / n
print("fisher per-layer mean ||g||^2:", fisher)
print("ratio to layer0:", fisher / fisher[0])
oracle = np.array([2.276e-07,1.119e-07,7.745e-08,1.01e-07,8.795e-08,6.056e-08,3.962e-08,3.692e-08])
print("oracle ratio:", oracle / oracle[0])
