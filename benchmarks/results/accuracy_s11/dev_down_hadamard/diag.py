"""Diagnostic: down-only output error Σ w² ||Δy||² of the exported u-w2g128 down weights, with vs
without the down-input rotation, on dev tokens (not seen by GPTQ) and on calibration tokens.
gate_up stays float; only down is the checkpoint's dequantized weight."""
import sys, json, tempfile
sys.path.insert(0, "/work/main")
import torch
torch.set_num_threads(1)
import torch.nn.functional as F
from pathlib import Path
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from offline.dequantize import dequantize_checkpoint
from offline.evaluate import token_windows
from offline.calibration import load_calibration
from offline.hadamard import fwht_blocked, hadamard_signs
from offline.rotation import rotate_model_

SH = Path("/work/shared"); MODEL = SH / "reference-moe"
name = sys.argv[1] if len(sys.argv) > 1 else "u-w2g128"
dev = torch.tensor(token_windows(MODEL, SH / "corpus" / "valid.txt", 512, None)[::20][:16])
cal = load_calibration(MODEL, SH / "corpus" / "calib.txt", 512, 131072, 2048)[::16][:16]

m = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32).eval()
rotate_model_(m, seed=0)
downs = {}
with tempfile.TemporaryDirectory() as tmp:
    for mode in ("base", "rot"):
        d = dequantize_checkpoint(Path(f"/tmp/dev3/out/{mode}/{name}"), Path(tmp) / mode)
        downs[mode] = {k: v for k, v in load_file(str(d / "model.safetensors")).items() if "down_proj" in k and ".experts." in k}
seed = json.loads(Path(f"/tmp/dev3/out/rot/{name}/config.json").read_text())["quantization_config"]["rotation"]["online"][0]["seed"]
signs = hadamard_signs(128, seed)

caught = {}
def hook(i):
    def f(mod, args, kwargs):
        caught.setdefault(i, []).append([a.detach() for a in args[:3]])
    return f

res = {}
for split, ids in (("dev", dev), ("calib", cal)):
    caught.clear()
    hs = [L.mlp.experts.register_forward_pre_hook(hook(i), with_kwargs=True) for i, L in enumerate(m.model.layers)]
    with torch.no_grad():
        for b in ids.split(4):
            m(b, use_cache=False)
    for h in hs: h.remove()
    TOK = []
    tot = {"base": 0.0, "rot": 0.0, "ref": 0.0}
    per_layer = []
    with torch.no_grad():
        for i, L in enumerate(m.model.layers):
            ex = L.mlp.experts
            lt = {"base": 0.0, "rot": 0.0}
            for hid, idx, wts in caught[i]:
                hid = hid.reshape(-1, hid.shape[-1]); idx = idx.reshape(hid.shape[0], -1); wts = wts.reshape(hid.shape[0], -1)
                for e in range(ex.num_experts):
                    t, s = torch.where(idx == e)
                    if t.numel() == 0: continue
                    g, u = F.linear(hid[t], ex.gate_up_proj[e]).chunk(2, -1)
                    h = ex.act_fn(g) * u
                    y = F.linear(h, ex.down_proj[e])
                    w2 = wts[t, s].double() ** 2
                    k = f"model.layers.{i}.mlp.experts.{e}.down_proj.weight"
                    yb = F.linear(h, downs["base"][k])
                    yr = F.linear(fwht_blocked(h, 128, signs), downs["rot"][k])
                    eb = (w2 * (yb - y).double().pow(2).sum(-1)); er = (w2 * (yr - y).double().pow(2).sum(-1))
                    TOK.append(torch.stack([h.abs().amax(-1).double(), eb, er], -1))
                    lt["base"] += float((w2 * (yb - y).double().pow(2).sum(-1)).sum())
                    lt["rot"] += float((w2 * (yr - y).double().pow(2).sum(-1)).sum())
                    tot["ref"] += float((w2 * y.double().pow(2).sum(-1)).sum())
            per_layer.append(round(lt["rot"] / lt["base"], 3))
            tot["base"] += lt["base"]; tot["rot"] += lt["rot"]
    T = torch.cat(TOK); order = T[:, 0].argsort(descending=True); n = len(order)
    bins = {}
    for lo, hi in ((0, 0.001), (0.001, 0.01), (0.01, 0.1), (0.1, 1.0)):
        sel = T[order[int(lo * n):int(hi * n)]]
        bins[f"top{lo}-{hi} by max|h|"] = {"share_of_base_err": round(float(sel[:, 1].sum() / T[:, 1].sum()), 3),
                                             "rot/base": round(float(sel[:, 2].sum() / sel[:, 1].sum()), 3)}
    res_bins = bins
    res[split] = {"bins": res_bins, "base_err": tot["base"], "rot_err": tot["rot"], "rot/base": tot["rot"] / tot["base"],
                  "base_rel": tot["base"] / tot["ref"], "per_layer_rot/base": per_layer}
    print(split, json.dumps(res[split]), flush=True)
Path(f"/tmp/dev3/diag-{name}.json").write_text(json.dumps(res, indent=1))
