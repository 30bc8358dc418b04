"""Dev harness: cached fake-quant weights per (layer, expert, unit, scheme); fast ppl of allocations."""
import sys, time, json, math
sys.path.insert(0, "/work/main")
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
from offline.rotation import rotate_model_
from offline.profile import ProfileStore
from offline.sensitivity import quantize_unit, expert_output, weighted_error
from offline.evaluate import token_windows
from vllm_mxmoe.schemes import parse_scheme

SH = Path("/work/shared")
MODEL = SH / "reference-moe"
STORE = ProfileStore("/tmp/mxmoe-accuracy/cache/profile-d31911cf2f5dd517")
CACHE = Path("/tmp/dev/fq"); CACHE.mkdir(exist_ok=True, parents=True)

def load_model():
    m = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32).eval()
    rotate_model_(m, seed=0)
    return m

def experts_of(m, l):
    return m.model.layers[l].mlp.experts

def fq_all(m, scheme, method="gptq", tag="", clip="minmax"):
    """dict (l)-> (gate_up [E,2I,H], down [E,H,I]) fake quantized with scheme."""
    path = CACHE / f"{scheme}-{method}{tag}{'' if clip=='minmax' else '-'+clip}.pt"
    if path.exists():
        return torch.load(path)
    out = {}
    s = parse_scheme(scheme)
    for l in range(8):
        ex = experts_of(m, l)
        prof = STORE.load(f"model.layers.{l}.mlp.experts")
        gu = torch.stack([quantize_unit(ex.gate_up_proj[e].float(), prof.gate_up_hessian[e], s, method, clip).fake_quantized for e in range(32)])
        dn = torch.stack([quantize_unit(ex.down_proj[e].float(), prof.down_hessian[e], s, method, clip).fake_quantized for e in range(32)])
        out[l] = (gu, dn)
    torch.save(out, path)
    return out

def deltas(m, fq):
    """Δ [L, E, 2] for one scheme's fake weights (as sensitivity.py)."""
    D = np.zeros((8, 32, 2))
    for l in range(8):
        ex = experts_of(m, l)
        prof = STORE.load(f"model.layers.{l}.mlp.experts")
        for e in range(32):
            x, w = prof.samples(e)
            if x.shape[0] == 0: continue
            gu, dn = ex.gate_up_proj[e].float(), ex.down_proj[e].float()
            ref = expert_output(x, gu, dn, ex.act_fn)
            sc = float(prof.counts[e]) / x.shape[0]
            D[l, e, 0] = sc * weighted_error(expert_output(x, fq[l][0][e], dn, ex.act_fn), ref, w)
            D[l, e, 1] = sc * weighted_error(expert_output(x, gu, fq[l][1][e], ex.act_fn), ref, w)
    return D

class Swapper:
    def __init__(self, m):
        self.m = m
        self.orig = {l: (experts_of(m, l).gate_up_proj.data.clone(), experts_of(m, l).down_proj.data.clone()) for l in range(8)}
    def reset(self):
        for l in range(8):
            ex = experts_of(self.m, l)
            ex.gate_up_proj.data.copy_(self.orig[l][0]); ex.down_proj.data.copy_(self.orig[l][1])
    def apply(self, alloc, fqs):
        """alloc: dict l -> (list gate_up scheme per expert, list down scheme) ; fqs: scheme -> fq dict"""
        self.reset()
        for l, (gu, dn) in alloc.items():
            ex = experts_of(self.m, l)
            for e in range(32):
                if gu[e] is not None: ex.gate_up_proj.data[e] = fqs[gu[e]][l][0][e]
                if dn[e] is not None: ex.down_proj.data[e] = fqs[dn[e]][l][1][e]

_W = {}
def windows(name="valid", n=40):
    key = (name, n)
    if key not in _W:
        _W[key] = token_windows(MODEL, SH / "corpus" / f"{name}.txt", 512, n)
    return _W[key]

@torch.no_grad()
def ppl(m, wins, bs=4):
    nll = cnt = 0
    for i in range(0, len(wins), bs):
        ids = torch.tensor(wins[i:i+bs])
        lg = m(ids, use_cache=False).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        cnt += ids[:, 1:].numel()
    return math.exp(nll / cnt)

def dev_windows(n_every=10):
    key = ("devspread", n_every)
    if key not in _W:
        allw = token_windows(MODEL, SH / "corpus" / "valid.txt", 512, None)
        _W[key] = allw[::n_every]
    return _W[key]

def report_alloc(path):
    r = json.load(open(path))
    return {int(L["prefix"].split(".")[2]): ([e["gate_up"]["scheme"] for e in L["experts"]], [e["down"]["scheme"] for e in L["experts"]]) for L in r["layers"]}

from offline.ilp import LayerProblem, allocate
DCACHE = Path("/tmp/dev/deltas"); DCACHE.mkdir(exist_ok=True)
def get_deltas(m, scheme, tag="", clip="minmax", method="gptq"):
    p = DCACHE / f"{scheme}{tag}-{clip}-{method}.npy"
    if p.exists(): return np.load(p)
    D = deltas(m, fq_all(m, scheme, method=method, tag=tag, clip=clip)); np.save(p, D); return D

def solve(Dd, schemes, wbits, scope="layer", gains=None, granularity="block"):
    """Dd: scheme -> Δ [L,E,2]; returns alloc dict and predicted loss."""
    L = np.stack([Dd[s] for s in schemes], axis=-1)  # [L,E,2,S]
    if gains is not None: L = L * np.asarray(gains)[:, None, None, None]
    alloc = {}
    if scope == "layer":
        for l in range(8):
            a = allocate(LayerProblem.from_shapes(schemes, 384, 128, L[l], np.zeros_like(L[l]), wbits), 1.0, granularity)
            alloc[l] = (list(a.gate_up), list(a.down))
    else:
        flat = L.reshape(-1, 2, len(schemes))
        a = allocate(LayerProblem.from_shapes(schemes, 384, 128, flat, np.zeros_like(flat), wbits), 1.0, granularity)
        for l in range(8):
            alloc[l] = (list(a.gate_up[l*32:(l+1)*32]), list(a.down[l*32:(l+1)*32]))
    return alloc

def avg_bits(alloc):
    from vllm_mxmoe.schemes import parse_scheme
    b = n = 0
    for l, (gu, dn) in alloc.items():
        for e in range(32):
            b += parse_scheme(gu[e]).storage_bits(256, 384) + parse_scheme(dn[e]).storage_bits(384, 128)
            n += 3 * 384 * 128
    return b / n

def summary(alloc):
    from collections import Counter
    c = Counter()
    for l, (gu, dn) in alloc.items():
        c.update("gu:" + s for s in gu); c.update("dn:" + s for s in dn)
    return dict(sorted(c.items()))
