"""Checkpoint format v1: tensor names, packing, and the quantization_config schema.

Shared by the runtime and the offline exporter. One linear block of one expert
(``...experts.{e}.gate_proj`` and so on) is stored as compressed-tensors names it:

* ``weight_packed``      int32 [out, in * bits / 32]; fp8 schemes: float8_e4m3fn [out, in]
* ``weight_scale``       float16 [out, in / group]
* ``weight_zero_point``  float16 [out, in / group] (asymmetric schemes only; integer values)

A weight is ``(q - zero) * scale``. Packing runs along the input dimension, so a
slice of whole 32-element chunks along the input is a slice of whole words,
which is what tensor parallelism needs for down projections:

* 2, 4, 8 bits: compressed-tensors' order: word j holds elements
  ``j*f .. j*f+f-1`` (f = 32 / bits), element i of the word at bits ``i*bits``.
* 3 bits: each chunk of 32 elements takes three words: the low two bits of
  elements 0-15 (2-bit order), of elements 16-31, then bit 2 of all 32.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .schemes import Scheme, UnknownSchemeError, parse_scheme

FORMAT_VERSION = 1
QUANT_METHOD = "mxmoe"
SCALE_DTYPE = torch.float16
PACKED_DTYPE = torch.int32
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0

WEIGHT_PACKED = "weight_packed"
WEIGHT_SCALE = "weight_scale"
WEIGHT_ZERO = "weight_zero_point"

# Checkpoint name of (gate, up, down) per architecture family; vLLM maps these
# onto its fused w13 / w2 parameters.
PROJ_NAMES = {"default": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}


class CheckpointFormatError(ValueError):
    """A checkpoint does not follow format v1; the message names the culprit."""


# ---------------------------------------------------------------------------
# Packing


def _pack_words(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack [N, K] codes in [0, 2**bits) into int32 words with compressed-tensors."""
    # Imported here: only exporters pack, and kernels must import this module without it.
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    signed = (q.to(torch.int32) - (1 << (bits - 1))).to(torch.int8)  # its input convention
    return pack_to_int32(signed, bits)


def _unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    per_word = 32 // bits
    n, w = words.shape
    shifts = torch.arange(per_word, dtype=torch.int32, device=words.device) * bits
    vals = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return vals.reshape(n, w * per_word)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes [N, K] (K a multiple of 32) into int32 [N, K*bits/32]."""
    n, k = q.shape
    if k % 32:
        raise ValueError(f"pack: in_features={k} is not a multiple of 32")
    if bits in (2, 4, 8):
        return _pack_words(q, bits)
    if bits == 3:
        chunks = q.reshape(n, k // 32, 32).to(torch.int64)
        low = _pack_words((chunks & 3).reshape(n, -1), 2).reshape(n, k // 32, 2)
        high = _pack_words((chunks >> 2).reshape(n, -1), 1).reshape(n, k // 32, 1)
        return torch.cat([low, high], dim=2).reshape(n, k // 32 * 3)
    raise ValueError(f"pack: unsupported bit width {bits}")


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack: int32 [N, K*bits/32] -> int32 codes [N, K]."""
    n, w = packed.shape
    if bits in (2, 4, 8):
        return _unpack_words(packed, bits)
    if bits == 3:
        words = packed.reshape(n, w // 3, 3)
        low = _unpack_words(words[:, :, :2].reshape(n, -1), 2).reshape(n, w // 3, 32)
        high = _unpack_words(words[:, :, 2:].reshape(n, -1), 1).reshape(n, w // 3, 32)
        return (low | (high << 2)).reshape(n, w // 3 * 32)
    raise ValueError(f"unpack: unsupported bit width {bits}")


# ---------------------------------------------------------------------------
# Tensors of one quantized block


@dataclass
class QuantizedWeight:
    """The stored tensors of one [out, in] weight in one scheme."""

    scheme: Scheme
    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {WEIGHT_PACKED: self.packed, WEIGHT_SCALE: self.scale}
        if self.zero is not None:
            out[WEIGHT_ZERO] = self.zero
        return out


def tensor_specs(scheme: Scheme, out_features: int, in_features: int) -> dict[str, tuple]:
    """Expected (shape, dtype) of each stored tensor of one block."""
    groups = scheme.num_groups(in_features)
    if scheme.weight_is_fp8:
        packed = ((out_features, in_features), FP8_DTYPE)
    else:
        packed = ((out_features, in_features * scheme.bits // 32), PACKED_DTYPE)
    specs = {WEIGHT_PACKED: packed, WEIGHT_SCALE: ((out_features, groups), SCALE_DTYPE)}
    if scheme.has_zero_point:
        specs[WEIGHT_ZERO] = ((out_features, groups), SCALE_DTYPE)
    return specs


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme) -> QuantizedWeight:
    """Round a float weight [N, K] onto the grid given by scale/zero [N, K/group]."""
    n, k = w.shape
    scheme.check_shape(n, k)
    scale16 = scale.to(SCALE_DTYPE)
    if scheme.weight_is_fp8:
        q = (w.float() / scale16.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return QuantizedWeight(scheme, q, scale16, None)
    g = scheme.group(k)
    s = scale16.float().repeat_interleave(g, dim=1)
    if scheme.symmetric:
        offset = 1 << (scheme.bits - 1)  # codes are unsigned: q = round(w/s) + 2^(b-1)
        q = torch.round(w.float() / s) + offset
        zero16 = None
    else:
        zero16 = zero.to(SCALE_DTYPE)
        q = torch.round(w.float() / s) + zero16.float().repeat_interleave(g, dim=1)
    q = q.clamp(0, scheme.qmax).to(torch.int32)
    return QuantizedWeight(scheme, pack(q, scheme.bits), scale16, zero16)


def dequantize(qw: QuantizedWeight, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float weight [N, K] from stored tensors; the reference every kernel is checked against."""
    scheme = qw.scheme
    if scheme.weight_is_fp8:
        return (qw.packed.float() * qw.scale.float()).to(dtype)
    g = scheme.group(in_features)
    q = unpack(qw.packed, scheme.bits).float()
    if scheme.symmetric:
        q = q - (1 << (scheme.bits - 1))
    else:
        q = q - qw.zero.float().repeat_interleave(g, dim=1)
    return (q * qw.scale.float().repeat_interleave(g, dim=1)).to(dtype)


# ---------------------------------------------------------------------------
# quantization_config


@dataclass
class ExpertLayerSchemes:
    """Scheme names of one MoE layer: per expert, gate+up share one, down its own."""

    gate_up: list[str]
    down: list[str]


@dataclass
class MxMoEQuantConfig:
    """The parsed ``quantization_config`` of an MxMoE checkpoint."""

    schemes: dict[str, Scheme]
    experts: dict[str, ExpertLayerSchemes]  # key: experts module prefix, e.g. model.layers.3.mlp.experts
    linears: dict[str, str] = field(default_factory=dict)  # module name -> scheme (shared experts, ...)
    rotation: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    ignore: list[str] = field(default_factory=list)
    proj_names: tuple[str, str, str] = PROJ_NAMES["default"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "schemes": {
                name: {"bits": s.bits, "group_size": s.group_size, "symmetric": s.symmetric, "act": s.act}
                for name, s in sorted(self.schemes.items())
            },
            "experts": {k: {"gate_up": v.gate_up, "down": v.down} for k, v in self.experts.items()},
            "linears": dict(self.linears),
            "proj_names": list(self.proj_names),
            "rotation": self.rotation,
            "ignore": list(self.ignore),
        }

    @classmethod
    def from_dict(cls, cfg: Any) -> "MxMoEQuantConfig":
        return parse_quant_config(cfg)

    def expert_schemes(self, prefix: str) -> ExpertLayerSchemes | None:
        return self.experts.get(prefix)

    def linear_scheme(self, prefix: str) -> Scheme | None:
        name = self.linears.get(prefix)
        return None if name is None else self.schemes[name]

    def is_ignored(self, prefix: str) -> bool:
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], prefix):
                    return True
            elif prefix == pattern or prefix.endswith("." + pattern):
                return True
        return False

    def used_scheme_names(self) -> set[str]:
        used = set(self.linears.values())
        for layer in self.experts.values():
            used.update(layer.gate_up)
            used.update(layer.down)
        return used


def _require(cfg: dict, key: str, kind: type, where: str = "quantization_config"):
    if key not in cfg:
        raise CheckpointFormatError(f"{where}: missing key {key!r}")
    value = cfg[key]
    if not isinstance(value, kind):
        raise CheckpointFormatError(f"{where}[{key!r}]: expected {kind.__name__}, got {type(value).__name__}")
    return value


def parse_quant_config(cfg: Any) -> MxMoEQuantConfig:
    """Validate a quantization_config dict; every error names the offending entry."""
    if not isinstance(cfg, dict):
        raise CheckpointFormatError(f"quantization_config must be a JSON object, got {type(cfg).__name__}")
    method = cfg.get("quant_method")
    if method != QUANT_METHOD:
        raise CheckpointFormatError(f"quantization_config: quant_method is {method!r}, expected {QUANT_METHOD!r}")
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointFormatError(
            f"quantization_config: format_version {version!r} is not supported (this build reads {FORMAT_VERSION})"
        )
    schemes: dict[str, Scheme] = {}
    for name, spec in _require(cfg, "schemes", dict).items():
        try:
            scheme = parse_scheme(name)
        except UnknownSchemeError as e:
            raise CheckpointFormatError(f"quantization_config.schemes: {e}") from None
        if not isinstance(spec, dict):
            raise CheckpointFormatError(f"quantization_config.schemes[{name!r}]: expected an object")
        actual = {"bits": scheme.bits, "group_size": scheme.group_size, "symmetric": scheme.symmetric, "act": scheme.act}
        wrong = {k: v for k, v in spec.items() if k in actual and v != actual[k]}
        if wrong:  # the name is the truth; a contradicting declaration means a corrupt config
            raise CheckpointFormatError(
                f"quantization_config.schemes[{name!r}]: declared {wrong} but the name means {actual}"
            )
        schemes[name] = scheme

    def known(name: Any, where: str) -> str:
        if name not in schemes:
            raise CheckpointFormatError(
                f"{where}: unknown scheme {name!r} (declared schemes: {sorted(schemes)})"
            )
        return name

    experts: dict[str, ExpertLayerSchemes] = {}
    for prefix, layer in _require(cfg, "experts", dict).items():
        where = f"quantization_config.experts[{prefix!r}]"
        if not isinstance(layer, dict):
            raise CheckpointFormatError(f"{where}: expected an object with 'gate_up' and 'down'")
        gate_up = _require(layer, "gate_up", list, where)
        down = _require(layer, "down", list, where)
        if len(gate_up) != len(down):
            raise CheckpointFormatError(
                f"{where}: gate_up lists {len(gate_up)} experts but down lists {len(down)}"
            )
        experts[prefix] = ExpertLayerSchemes(
            [known(n, f"{where}.gate_up[{e}]") for e, n in enumerate(gate_up)],
            [known(n, f"{where}.down[{e}]") for e, n in enumerate(down)],
        )
    linears = {
        name: known(s, f"quantization_config.linears[{name!r}]")
        for name, s in cfg.get("linears", {}).items()
    }
    proj_names = tuple(cfg.get("proj_names", PROJ_NAMES["default"]))
    if len(proj_names) != 3:
        raise CheckpointFormatError("quantization_config.proj_names: expected [gate, up, down] names")
    rotation = cfg.get("rotation", {"kind": "none"})
    if rotation.get("kind", "none") not in ("none", "hadamard"):
        raise CheckpointFormatError(f"quantization_config.rotation: unknown kind {rotation.get('kind')!r}")
    return MxMoEQuantConfig(
        schemes=schemes,
        experts=experts,
        linears=linears,
        rotation=rotation,
        ignore=list(cfg.get("ignore", [])),
        proj_names=proj_names,  # type: ignore[arg-type]
    )


def read_quant_config(model_dir: str) -> MxMoEQuantConfig:
    path = f"{model_dir}/config.json"
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{path}: not valid JSON ({e})") from None
    if "quantization_config" not in cfg:
        raise CheckpointFormatError(f"{path}: no quantization_config (not an MxMoE checkpoint)")
    return parse_quant_config(cfg["quantization_config"])


def check_tensor(name: str, tensor: torch.Tensor, spec: tuple) -> None:
    """Raise CheckpointFormatError naming `name` if tensor does not match (shape, dtype)."""
    shape, dtype = spec
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
        raise CheckpointFormatError(
            f"tensor {name}: expected shape {tuple(shape)} dtype {dtype}, "
            f"got shape {tuple(tensor.shape)} dtype {tensor.dtype}"
        )
