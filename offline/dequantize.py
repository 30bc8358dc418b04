"""Turn an MxMoE checkpoint back into a plain HF checkpoint (dequantized weights).

Used to evaluate a checkpoint through transformers (``mxmoe-eval``) and by the
tests that compare vLLM's output on the packed checkpoint with transformers on
exactly the weights the packed tensors encode.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_mxmoe.format import (
    WEIGHT_PACKED,
    WEIGHT_SCALE,
    WEIGHT_ZERO,
    QuantizedWeight,
    dequantize,
    read_quant_config,
)

from .model_spec import classify_name, tensor_names


def _scheme_of(module: str, qcfg):
    kind = classify_name(module + ".weight", qcfg.proj_names)
    if kind and kind[0] == "expert":
        layer = qcfg.experts[kind[1]]
        names = layer.down if kind[3] == "down" else layer.gate_up
        return qcfg.schemes[names[kind[2]]]
    return qcfg.linear_scheme(module)


def dequantize_checkpoint(ckpt: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    ckpt, out = Path(ckpt), Path(out)
    qcfg = read_quant_config(str(ckpt))
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    names = tensor_names(ckpt)
    handles = {f: safe_open(str(ckpt / f), "pt") for f in set(names.values())}

    def get(name: str) -> torch.Tensor:
        return handles[names[name]].get_tensor(name)

    for name in names:
        if name.endswith((WEIGHT_SCALE, WEIGHT_ZERO)):
            continue
        if name.endswith(WEIGHT_PACKED):
            module = name[: -len(WEIGHT_PACKED) - 1]
            scheme = _scheme_of(module, qcfg)
            zero_name = f"{module}.{WEIGHT_ZERO}"
            qw = QuantizedWeight(
                scheme, get(name), get(f"{module}.{WEIGHT_SCALE}"), get(zero_name) if zero_name in names else None
            )
            in_features = qw.packed.shape[1] if scheme.weight_is_fp8 else qw.packed.shape[1] * 32 // scheme.bits
            tensors[f"{module}.weight"] = dequantize(qw, in_features, dtype)
        else:
            tensor = get(name)
            tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with open(ckpt / "config.json") as f:
        cfg = json.load(f)
    cfg.pop("quantization_config", None)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    with open(out / "config.json", "w") as f:
        json.dump(cfg, f, indent=2)
    for path in ckpt.iterdir():
        if path.is_file() and not path.name.startswith("model") and path.name != "config.json":
            shutil.copy2(path, out / path.name)
    return out

