"""Write an MxMoE checkpoint (format v1) from an HF MoE checkpoint and an allocation.

Streams the source shards tensor by tensor: expert and listed linear weights
are replaced by their packed tensors, everything else is copied unchanged.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from vllm_mxmoe.format import ExpertLayerSchemes, MxMoEQuantConfig, QuantizedWeight
from vllm_mxmoe.schemes import Scheme, parse_scheme

from .model_spec import MoEModelSpec, tensor_names

# (tensor name without ".weight", float weight [N, K], scheme) -> stored tensors
BlockQuantizer = Callable[[str, torch.Tensor, Scheme], QuantizedWeight]

SHARD_BYTES = 2 * 2**30
DEFAULT_IGNORE = ["lm_head", "re:.*\\.self_attn\\..*", "re:.*\\.mlp\\.gate$", "re:.*shared_expert_gate$"]


def build_quant_config(
    spec: MoEModelSpec,
    experts: dict[str, ExpertLayerSchemes],
    linears: dict[str, str],
    rotation: dict | None = None,
) -> MxMoEQuantConfig:
    names = {n for layer in experts.values() for n in layer.gate_up + layer.down} | set(linears.values())
    return MxMoEQuantConfig(
        schemes={n: parse_scheme(n) for n in sorted(names)},
        experts=experts,
        linears=dict(linears),
        rotation=rotation or {"kind": "none"},
        ignore=list(DEFAULT_IGNORE),
        proj_names=spec.proj_names,
    )


def _scheme_for(name: str, spec: MoEModelSpec, qcfg: MxMoEQuantConfig) -> Scheme | None:
    kind = spec.classify(name)
    if kind is None:
        return None
    if kind[0] == "expert":
        _, prefix, e, role = kind
        layer = qcfg.experts.get(prefix)
        if layer is None:
            return None
        return qcfg.schemes[layer.down[e] if role == "down" else layer.gate_up[e]]
    return qcfg.linear_scheme(kind[1])


def export_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    spec: MoEModelSpec,
    qcfg: MxMoEQuantConfig,
    quantize_block: BlockQuantizer,
    source_tensors: Callable[[str], torch.Tensor] | None = None,
    extra_config: dict | None = None,
) -> Path:
    """Quantize and write. ``source_tensors(name)`` overrides where weights come
    from (e.g. a rotated model); by default they are read from ``model_dir``."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = tensor_names(model_dir)
    by_file: dict[str, list[str]] = {}
    for name, file in names.items():
        by_file.setdefault(file, []).append(name)

    writer = _ShardWriter(out_dir)
    with tqdm(total=len(names), desc="export", unit="tensor") as bar:
        for file, file_names in sorted(by_file.items()):
            with safe_open(str(model_dir / file), "pt") as src:
                for name in file_names:
                    tensor = source_tensors(name) if source_tensors else src.get_tensor(name)
                    scheme = _scheme_for(name, spec, qcfg)
                    if scheme is None:
                        writer.add(name, tensor)
                    else:
                        module = name[: -len(".weight")]
                        qw = quantize_block(module, tensor.float(), scheme)
                        for suffix, t in qw.tensors().items():
                            writer.add(f"{module}.{suffix}", t.contiguous())
                    bar.update()
    writer.close()
    _write_config(model_dir, out_dir, qcfg, extra_config)
    _copy_side_files(model_dir, out_dir)
    return out_dir


def _write_config(model_dir: Path, out_dir: Path, qcfg: MxMoEQuantConfig, extra: dict | None) -> None:
    with open(model_dir / "config.json") as f:
        cfg = json.load(f)
    cfg.update(extra or {})
    cfg["quantization_config"] = qcfg.to_dict()
    with open(out_dir / "config.json", "w") as f:
        json.dump(cfg, f, indent=2)


def _copy_side_files(model_dir: Path, out_dir: Path) -> None:
    """Tokenizer, generation config and the like travel unchanged."""
    for path in model_dir.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and path.name not in (
            "config.json",
            "model.safetensors.index.json",
        ):
            shutil.copy2(path, out_dir / path.name)


class _ShardWriter:
    """Collects tensors and writes safetensors shards of at most SHARD_BYTES."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, torch.Tensor] | list[str]] = []
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > SHARD_BYTES:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        index = len(self.shards)
        tmp_name = f"model-{index:05d}.safetensors.tmp"
        save_file(self.pending, str(self.out_dir / tmp_name), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        for old in self.out_dir.glob("*.safetensors"):
            old.unlink()  # a previous export into the same folder
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.out_dir / f"model-{i:05d}.safetensors.tmp").rename(self.out_dir / final)
            for name in names:
                self.weight_map[name] = final
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
        with open(self.out_dir / "model.safetensors.index.json", "w") as f:
            json.dump(index, f, indent=2)
