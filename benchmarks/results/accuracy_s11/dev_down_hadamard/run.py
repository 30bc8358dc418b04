"""Dev-split experiment: extra randomized Hadamard rotation of the routed experts' down_proj
INPUT dim (online transform of h = act(gate)*up at runtime), monkeypatched into the pipeline.

    python /tmp/dev3/run.py MODE NAME[,NAME...]
      MODE: base (pipeline as is) | rot (with the down-input rotation) | sanity

No file under /work/main is modified; everything is patched from here.
"""
import sys, json, time, collections, math, types
sys.path.insert(0, "/work/main")
import torch
torch.set_num_threads(1)
import torch.nn.functional as F
from pathlib import Path

import offline.pipeline as P
import offline.profile as PR
import offline.sensitivity as S
import offline.dequantize as DQ
from offline.evaluate import token_windows, perplexity_hf
from offline.hadamard import fwht_blocked, hadamard_signs, hadamard_matrix
from offline.rotation import rotate_down_inputs_, rotate_model_
from offline.scheme_map import uniform_map
from transformers.models.qwen3_moe import modeling_qwen3_moe as QM

SH = Path("/work/shared"); MODEL = SH / "reference-moe"; CAL = SH / "corpus" / "calib.txt"
WORK = Path("/tmp/dev3")
W = token_windows(MODEL, SH / "corpus" / "valid.txt", 512, None)[::20]

import os
DOWN_BLOCK, DOWN_SEED = 128, int(os.environ.get("DOWN_SEED", "1"))  # inter = 128: one full 128-Hadamard; seed != residual seed 0
TAG = "" if DOWN_SEED == 1 else f"-s{DOWN_SEED}"

# ---------------------------------------------------------------------------
# Patches. The rotation is "active" on an experts module iff it carries `_down_rot`
# = (block, signs); the pipeline-side global ACTIVE covers the helpers that get no module.

ACTIVE = {"on": False}


def _h(h, block_signs):
    block, signs = block_signs
    return fwht_blocked(h, block, signs)


_orig_experts_forward = QM.Qwen3MoeExperts.forward


def experts_forward(self, hidden_states, top_k_index, top_k_weights):
    rot = getattr(self, "_down_rot", None)
    if rot is None:
        return _orig_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    out = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):
        token_idx, slot = torch.where(top_k_index == e)
        if token_idx.numel() == 0:
            continue
        gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[e]).chunk(2, dim=-1)
        h = _h(self.act_fn(gate) * up, rot)
        out.index_add_(0, token_idx, (F.linear(h, self.down_proj[e]) * top_k_weights[token_idx, slot, None]).to(out.dtype))
    return out


def enable_down_rot(model):
    """rotate_down_inputs_ + mark every experts module for the online transform."""
    info = rotate_down_inputs_(model, block=DOWN_BLOCK, seed=DOWN_SEED)
    signs = hadamard_signs(info["size"], DOWN_SEED, device=next(model.parameters()).device)
    for layer in model.model.layers:
        ex = getattr(layer.mlp, "experts", None)
        if ex is not None:
            ex._down_rot = (DOWN_BLOCK, signs)
    return info


_orig_load_model = P._Pipeline._load_model


def load_model_rot(self):
    model, rotation = _orig_load_model(self)
    assert rotation is not None, "down rotation experiment assumes the residual rotation too"
    info = enable_down_rot(model)
    rotation = dict(rotation); rotation["online"] = list(rotation.get("online", [])) + [info]
    self.stages["rotate"] = "computed+down"
    ACTIVE["on"] = True
    return model, rotation


def recorder_call(self, module, args, kwargs):
    """profile._ExpertRecorder.__call__ with the online transform on h (down Hessians)."""
    hidden, top_k_index, top_k_weights = PR._routing_arguments(args, kwargs)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    self.num_tokens += hidden.shape[0]
    ids = top_k_index.reshape(hidden.shape[0], -1)
    weights = top_k_weights.reshape(hidden.shape[0], -1)
    valid = ids[(ids >= 0) & (ids < self.num_experts)]
    self.counts += torch.bincount(valid.cpu(), minlength=self.num_experts)
    rot = getattr(self.experts, "_down_rot", None)
    for expert in valid.unique().tolist():
        token, slot = torch.where(ids == expert)
        x = hidden[token].float()
        if self.role != "holdout":
            gate, up = F.linear(x, self.experts.gate_up_proj[expert].float()).chunk(2, dim=-1)
            h = self.experts.act_fn(gate) * up
            if rot is not None:
                h = _h(h, rot)
            if self.hessian_weights == "routing":
                r = weights[token, slot].float().unsqueeze(-1).to(x.device)
                self.gate_up[expert].add(x * r)
                self.down[expert].add(h * r)
            else:
                self.gate_up[expert].add(x)
                self.down[expert].add(h)
        if self.role != "fit":
            self._sample(expert, x, weights[token, slot].float())


_orig_expert_output = S.expert_output
_SIGNS = {}


def expert_output_rot(x, gate_up, down, act_fn):
    if not ACTIVE["on"]:
        return _orig_expert_output(x, gate_up, down, act_fn)
    n = down.shape[1]
    if n not in _SIGNS:
        _SIGNS[n] = hadamard_signs(n, DOWN_SEED)
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    h = fwht_blocked(act_fn(gate) * up, DOWN_BLOCK, _SIGNS[n].to(x.device))
    return F.linear(h, down)


_orig_dequantize = DQ.dequantize_checkpoint


def dequantize_fold(ckpt, out, dtype=torch.float32):
    """Dequantize, then fold the online down-input rotation back: W_down <- W_down Q^T
    (so the plain transformers forward computes (h Q) W^T = h (W Q^T)^T)."""
    from safetensors.torch import load_file, save_file
    out_dir = _orig_dequantize(ckpt, out, dtype)
    rot = json.loads((Path(ckpt) / "config.json").read_text())["quantization_config"].get("rotation", {})
    online = [o for o in rot.get("online", []) if o["activation"] == "experts.down_proj.input"]
    if not online:
        return out_dir
    (o,) = online
    q = hadamard_matrix(o["size"], o["seed"], dtype=torch.float64, block=o["block"])
    f = out_dir / "model.safetensors"
    t = load_file(str(f))
    n = 0
    for k, v in t.items():
        if ".mlp.experts." in k and k.endswith("down_proj.weight"):
            t[k] = (v.double() @ q.T).to(v.dtype); n += 1
    save_file(t, str(f), metadata={"format": "pt"})
    print(f"folded down-input rotation into {n} down weights", flush=True)
    return out_dir


def install(mode):
    QM.Qwen3MoeExperts.forward = experts_forward  # pass-through unless a module carries _down_rot
    DQ.dequantize_checkpoint = dequantize_fold     # no-op unless the checkpoint records the rotation
    if mode == "rot":
        P._Pipeline._load_model = load_model_rot
        PR._ExpertRecorder.__call__ = recorder_call   # also used by sequential.py's _record
        S.expert_output = expert_output_rot           # layer_sensitivity resolves it from the module


# ---------------------------------------------------------------------------

@torch.no_grad()
def ppl_model(model):
    nll, count = 0.0, 0
    for window in W:
        ids = torch.tensor([window])
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += len(window) - 1
    return math.exp(nll / count)


def sanity():
    from transformers import AutoModelForCausalLM
    install("rot")
    ACTIVE["on"] = False
    res = {}
    res["fp_perplexity_hf"] = perplexity_hf(MODEL, W).perplexity
    m = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32).eval()
    res["fp_inmem"] = ppl_model(m)
    rotate_model_(m, seed=0)
    res["resid_rot"] = ppl_model(m)
    # expert_output before the down rotation (reference for the sensitivity patch)
    ex = m.model.layers[3].mlp.experts
    x = torch.randn(64, ex.gate_up_proj.shape[2])
    y0 = S.expert_output(x, ex.gate_up_proj[5].float(), ex.down_proj[5].float(), ex.act_fn)
    info = enable_down_rot(m)
    res["resid+down_rot_with_online"] = ppl_model(m)
    ACTIVE["on"] = True
    y1 = S.expert_output(x, ex.gate_up_proj[5].float(), ex.down_proj[5].float(), ex.act_fn)
    res["expert_output_rel_diff"] = float((y1 - y0).norm() / y0.norm())
    # the profile hook: down Hessian of the rotated model must be Q^T H Q of the unrotated one
    ids = torch.tensor(W[:2])
    def hess(model):
        moe = PR.MoELayer("model.layers.3.mlp.experts", 3, model.model.layers[3].mlp.experts)
        rec = PR._ExpertRecorder(moe.prefix, moe.experts, 8, 0)
        h = moe.experts.register_forward_pre_hook(rec, with_kwargs=True)
        model(ids, use_cache=False); h.remove()
        return rec.finish().down_hessian
    H1 = hess(m)
    for layer in m.model.layers:
        del layer.mlp.experts._down_rot
    res["resid+down_rot_without_online"] = ppl_model(m)
    m2 = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32).eval()
    rotate_model_(m2, seed=0)
    H0 = hess(m2).double()
    q = hadamard_matrix(info["size"], DOWN_SEED, dtype=torch.float64, block=DOWN_BLOCK)
    res["down_hessian_QtHQ_rel_diff"] = float(((q.T @ H0 @ q) - H1.double()).norm() / H0.norm())
    # the fold used on exported checkpoints: W <- W Q^T, plain forward
    for layer in m.model.layers:
        d = layer.mlp.experts.down_proj
        d.data.copy_((d.data.double() @ q.T).float())
    res["resid+down_rot_folded_back"] = ppl_model(m)
    res["online_entry"] = info
    print(json.dumps(res, indent=1), flush=True)
    (WORK / "sanity.json").write_text(json.dumps(res, indent=1))


# ---------------------------------------------------------------------------

best = {"percdamp": 0.1, "refine_sweeps": 2}
fisher = {"budget_scope": "model", "layer_weights": "fisher"}
CONF = {
    "fp": None,
    "w8rtn": {"scheme_map": uniform_map("w8"), "method": "rtn"},  # export/fold path check
    "u-w2g128": {"scheme_map": uniform_map("w2g128"), **best},
    "L225": {"wbits": 2.25, "r": 1.0, **best},
    "F225": {"wbits": 2.25, "r": 1.0, **best, **fisher},
    "u-w3g128": {"scheme_map": uniform_map("w3g128")},
    "L325": {"wbits": 3.25, "r": 1.0},
}


def main(mode, names):
    install(mode)
    for n in names:
        o = CONF[n]; t0 = time.time(); row = {"mode": mode + (TAG if mode == "rot" else ""), "name": n}
        d = MODEL
        if o is not None:
            o = dict(o)
            r = P.quantize_mxmoe(MODEL, CAL, WORK / "out" / (mode + (TAG if mode == "rot" else "")) / n, calib_tokens=131072, seq_len=512,
                                 cache_dir=str(WORK / ("cache-" + mode + (TAG if mode == "rot" else ""))), **o)
            row["avg_bits"] = r.report["achieved_avg_bits"]; row["stages"] = r.stages
            row["quantize_s"] = round(time.time() - t0, 1)
            if "predicted_loss" in r.report: row["predicted_loss"] = r.report["predicted_loss"]
            d = r.out_dir
            c = collections.Counter()
            for L in r.report.get("layers", []):
                for e in L["experts"]:
                    c["gu:" + e["gate_up"]["scheme"]] += 1; c["dn:" + e["down"]["scheme"]] += 1
            row["picks"] = dict(sorted(c.items()))
            row["rotation"] = json.loads((d / "config.json").read_text())["quantization_config"]["rotation"]
        p = perplexity_hf(d, W)
        row.update(ppl=round(p.perplexity, 4), windows=p.windows, tokens=p.tokens, total_s=round(time.time() - t0, 1))
        print(json.dumps(row), flush=True)
        with open(WORK / "results.jsonl", "a") as f: f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "sanity":
        sanity()
    else:
        main(sys.argv[1], sys.argv[2].split(","))
