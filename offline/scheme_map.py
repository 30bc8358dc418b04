"""User-written scheme maps (``--scheme-map MAP.json``) resolved against a model.

A map gives defaults and per-layer overrides; a string means "every expert",
a list gives one scheme per expert::

    {
      "gate_up": "w4g128",                 # default for every MoE layer
      "down": "w4g128",
      "layers": {"model.layers.0.mlp.experts": {"gate_up": ["w4g128", "w2g128", ...],
                                                "down": "w8"}},
      "shared_experts": "w8",              # optional: all shared-expert linears
      "linears": {"model.layers.0.mlp.shared_expert.down_proj": "w4g128"}
    }
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_mxmoe.format import ExpertLayerSchemes
from vllm_mxmoe.schemes import UnknownSchemeError, parse_scheme

from .model_spec import MoEModelSpec

_KEYS = {"gate_up", "down", "layers", "shared_experts", "linears"}


class SchemeMapError(ValueError):
    pass


def uniform_map(scheme: str, shared_experts: str | None = None) -> dict:
    out: dict = {"gate_up": scheme, "down": scheme}
    if shared_experts:
        out["shared_experts"] = shared_experts
    return out


def load_scheme_map(path: str | Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise SchemeMapError(f"scheme map {path}: file not found") from None
    except json.JSONDecodeError as e:
        raise SchemeMapError(f"scheme map {path}: not valid JSON ({e})") from None


def _checked(name, where: str) -> str:
    try:
        parse_scheme(name)
    except UnknownSchemeError as e:
        raise SchemeMapError(f"{where}: {e}") from None
    return name


def _per_expert(value, count: int, where: str) -> list[str]:
    if isinstance(value, str):
        return [_checked(value, where)] * count
    if isinstance(value, list):
        if len(value) != count:
            raise SchemeMapError(f"{where}: lists {len(value)} schemes but the layer has {count} experts")
        return [_checked(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise SchemeMapError(f"{where}: expected a scheme name or a list of them, got {value!r}")


def resolve_scheme_map(raw: dict, spec: MoEModelSpec) -> tuple[dict[str, ExpertLayerSchemes], dict[str, str]]:
    """(experts per MoE layer, scheme per quantized linear) for this model."""
    if not isinstance(raw, dict):
        raise SchemeMapError("scheme map: expected a JSON object")
    unknown = set(raw) - _KEYS
    if unknown:
        raise SchemeMapError(f"scheme map: unknown keys {sorted(unknown)} (allowed: {sorted(_KEYS)})")
    layers = raw.get("layers", {})
    stray = set(layers) - set(spec.expert_layers)
    if stray:
        raise SchemeMapError(
            f"scheme map: layers {sorted(stray)} are not MoE layers of this model "
            f"(they are named like {next(iter(spec.expert_layers))})"
        )
    experts = {}
    for prefix, count in spec.expert_layers.items():
        layer = layers.get(prefix, {})
        picked = {}
        for unit in ("gate_up", "down"):
            value = layer.get(unit, raw.get(unit))
            if value is None:
                raise SchemeMapError(f"scheme map: no {unit!r} scheme for {prefix} (and no default)")
            picked[unit] = _per_expert(value, count, f"scheme map: {prefix}.{unit}")
        experts[prefix] = ExpertLayerSchemes(picked["gate_up"], picked["down"])
    linears = {}
    if raw.get("shared_experts"):
        for module in spec.shared_expert_linears:
            linears[module] = _checked(raw["shared_experts"], "scheme map: shared_experts")
    for module, name in raw.get("linears", {}).items():
        linears[module] = _checked(name, f"scheme map: linears[{module!r}]")
    return experts, linears
