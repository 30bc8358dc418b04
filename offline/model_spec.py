"""Which tensors of an HF MoE checkpoint are experts, shared experts, or neither.

Works on checkpoint tensor names (what vLLM loads), not on a transformers
module tree, so the exporter never has to instantiate the model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from vllm_mxmoe.format import PROJ_NAMES

SUPPORTED_MODEL_TYPES = {
    "qwen2_moe": "default",
    "qwen3_moe": "default",
    "olmoe": "default",
    "deepseek_v2": "default",
    "deepseek_v3": "default",
    "mixtral": "mixtral",
}

_EXPERT_RE = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>[a-z0-9_]+)\.weight$")
_SHARED_RE = re.compile(r"^(?P<module>.+\.shared_experts?\.(?:gate_proj|up_proj|down_proj))\.weight$")


class ModelSpecError(ValueError):
    pass


@dataclass
class MoEModelSpec:
    model_type: str
    proj_names: tuple[str, str, str]  # checkpoint names of gate, up, down
    hidden_size: int
    expert_intermediate_size: int
    # experts prefix -> number of experts found in the checkpoint
    expert_layers: dict[str, int] = field(default_factory=dict)
    shared_expert_linears: list[str] = field(default_factory=list)

    def classify(self, tensor_name: str):
        return classify_name(tensor_name, self.proj_names)


def classify_name(tensor_name: str, proj_names: tuple[str, str, str]):
    """('expert', prefix, e, role) with role in gate/up/down, ('linear', module), or None."""
    m = _EXPERT_RE.match(tensor_name)
    if m and m["proj"] in proj_names:
        role = ("gate", "up", "down")[proj_names.index(m["proj"])]
        return ("expert", m["prefix"], int(m["expert"]), role)
    m = _SHARED_RE.match(tensor_name)
    if m:
        return ("linear", m["module"])
    return None


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelSpecError(f"{model_dir}: no config.json (is this a Hugging Face model folder?)")
    with open(path) as f:
        return json.load(f)


def tensor_names(model_dir: str | Path) -> dict[str, str]:
    """Tensor name -> shard file, from the index or the single safetensors file."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise ModelSpecError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def _expert_intermediate_size(cfg: dict) -> int:
    for key in ("moe_intermediate_size", "intermediate_size"):
        if key in cfg:
            return int(cfg[key])
    raise ModelSpecError("config.json has no moe_intermediate_size / intermediate_size")


def inspect_model(model_dir: str | Path) -> MoEModelSpec:
    """Find the MoE layers of a checkpoint; raise ModelSpecError if it has none."""
    cfg = read_config(model_dir)
    model_type = cfg.get("model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelSpecError(
            f"{model_dir}: model_type {model_type!r} is not supported; "
            f"supported MoE architectures: {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    spec = MoEModelSpec(
        model_type=model_type,
        proj_names=PROJ_NAMES[SUPPORTED_MODEL_TYPES[model_type]],
        hidden_size=int(cfg["hidden_size"]),
        expert_intermediate_size=_expert_intermediate_size(cfg),
    )
    layers: dict[str, set[int]] = {}
    shared = set()
    for name in tensor_names(model_dir):
        kind = spec.classify(name)
        if kind is None:
            continue
        if kind[0] == "expert":
            layers.setdefault(kind[1], set()).add(kind[2])
        else:
            shared.add(kind[1])
    if not layers:
        raise ModelSpecError(f"{model_dir}: no MoE expert weights found (is this a Mixture-of-Experts model?)")
    for prefix, experts in layers.items():
        if experts != set(range(len(experts))):
            raise ModelSpecError(f"{model_dir}: {prefix} has non-contiguous expert ids {sorted(experts)}")
    spec.expert_layers = {p: len(e) for p, e in sorted(layers.items(), key=lambda kv: _natural_key(kv[0]))}
    spec.shared_expert_linears = sorted(shared, key=_natural_key)
    return spec


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
