"""The fused-MoE method: every expert block in its own scheme, all experts in one layer.

Weights live in flat per-layer buffers (kernels/layout.py) exposed to vLLM's
loader as parameters named like the checkpoint tensors (``w13_weight_packed``
for gate/up, ``w2_weight_packed`` for down, with ``_weight_scale`` and
``_weight_zero_point``). Our own weight loader writes each per-expert tensor
into its expert's slice and records it, because vLLM leaves parameters it never
loads as uninitialised memory without complaint: after loading, every expected
tensor must have arrived exactly once.
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger

from . import compat
from .format import (
    WEIGHT_PACKED,
    WEIGHT_SCALE,
    WEIGHT_ZERO,
    CheckpointFormatError,
    ExpertLayerSchemes,
    MxMoEQuantConfig,
    check_tensor,
    tensor_specs,
)
from .kernels.layout import ExpertGemmWeights, make_dummy_weights_sane, to_kernel_order
from .kernels.reference import reference_fused_experts
from .sharding import down_shard_reason

# Under vLLM's logger tree, so that INFO lines show with vLLM's own (a plain __name__ logger's INFO is dropped).
logger = init_logger(f"vllm.{__name__}")

SUFFIXES = (WEIGHT_PACKED, WEIGHT_SCALE, WEIGHT_ZERO)
SHARDS = ("w1", "w3", "w2")  # vLLM's names for gate, up, down


class MxMoEFusedMoEMethod(compat.FusedMoEMethodBase):
    def __init__(self, checkpoint: MxMoEQuantConfig, schemes: ExpertLayerSchemes, moe, prefix: str):
        super().__init__(moe)
        self.checkpoint = checkpoint
        self.layer_schemes = schemes
        self.prefix = prefix
        self._gemm_weights_cache: tuple | None = None  # gemm_weights(): (where the tensors are, the weights)

    # -- weights -----------------------------------------------------------

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        global_ids = compat.local_expert_global_ids(layer, num_experts)
        num_global = len(self.layer_schemes.gate_up)
        if max(global_ids) >= num_global:
            raise CheckpointFormatError(
                f"quantization_config.experts[{self.prefix!r}] lists {num_global} experts, "
                f"but the model has expert {max(global_ids)}"
            )
        schemes = self.checkpoint.schemes
        gate_up = [schemes[self.layer_schemes.gate_up[g]] for g in global_ids]
        down = [schemes[self.layer_schemes.down[g]] for g in global_ids]
        inter, hidden = intermediate_size_per_partition, hidden_size
        _, tp_size = compat.moe_tp_rank_size(layer)
        for g, scheme in zip(global_ids, down):
            reason = down_shard_reason(scheme, hidden, inter * tp_size, tp_size)
            if reason:
                raise ValueError(
                    f"{self.prefix}.{g}.down: {reason}; with tensor parallel size {tp_size} each rank "
                    f"holds {inter} of the intermediate dim, which the group size must divide"
                )
        w13 = ExpertGemmWeights.allocate(gate_up, 2 * inter, hidden)
        w2 = ExpertGemmWeights.allocate(down, hidden, inter)
        layer.mxmoe_schemes = (gate_up, down)
        layer.mxmoe_global_ids = global_ids
        layer.mxmoe_dims = (hidden, inter)
        layer.mxmoe_act_dtype = params_dtype
        layer.mxmoe_key = f"{self.prefix}#{id(layer)}"
        _LAYERS[layer.mxmoe_key] = (self, layer)
        layer.mxmoe_loaded = set()
        loader = self._make_loader(layer)
        for stem, weights in (("w13", w13), ("w2", w2)):
            for suffix, tensor in zip(SUFFIXES, (weights.qweight, weights.scales, weights.zeros)):
                param = torch.nn.Parameter(tensor, requires_grad=False)
                param.weight_loader = loader
                layer.register_parameter(f"{stem}_{suffix}", param)
            layer.register_buffer(f"{stem}_mxmoe_meta", weights.meta, persistent=False)
        logger.info(
            "mxmoe %s: %d local experts, %.2f MiB of expert weights (%s)",
            self.prefix,
            num_experts,
            (w13.nbytes() + w2.nbytes()) / 2**20,
            _scheme_counts(gate_up, down),
        )

    def gemm_weights(self, layer: torch.nn.Module) -> tuple[ExpertGemmWeights, ExpertGemmWeights]:
        """The two GEMMs' weights, as views of the layer's (possibly moved) parameters. Kept (on this method
        object: one per layer) while those tensors stay where they are, so an eager forward (prefill chunks
        beyond the CUDA graphs) reuses what ExpertGemmWeights derives from the scheme mix."""
        tensors = (layer.w13_weight_packed.data, layer.w13_weight_scale.data, layer.w13_weight_zero_point.data,
                   layer.w13_mxmoe_meta, layer.w2_weight_packed.data, layer.w2_weight_scale.data,
                   layer.w2_weight_zero_point.data, layer.w2_mxmoe_meta)  # fmt: skip
        key = tuple((t.device, t.data_ptr(), t.shape) for t in tensors)
        cached = self._gemm_weights_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        gate_up, down = layer.mxmoe_schemes
        hidden, inter = layer.mxmoe_dims
        weights = (
            ExpertGemmWeights(2 * inter, hidden, gate_up, *tensors[:4]),
            ExpertGemmWeights(hidden, inter, down, *tensors[4:]),
        )
        self._gemm_weights_cache = (key, weights)
        return weights

    def _make_loader(self, layer: torch.nn.Module):
        def load(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
            local = compat.global_to_local_expert(layer, expert_id)
            if local == -1:  # another rank's expert
                return False if return_success else None
            self._load_expert_tensor(layer, loaded_weight, weight_name, shard_id, expert_id, local)
            return True if return_success else None

        load.supports_moe_loading = True
        return load

    def _load_expert_tensor(self, layer, loaded, weight_name, shard_id, global_id, local):
        suffix = next((s for s in SUFFIXES if weight_name.endswith(s)), None)
        proj = self.checkpoint.proj_names[SHARDS.index(shard_id)]
        name = f"{self.prefix}.{global_id}.{proj}.{suffix}"
        if suffix is None or shard_id not in SHARDS:
            raise CheckpointFormatError(f"unexpected expert tensor {weight_name} (shard {shard_id})")
        w13, w2 = self.gemm_weights(layer)
        weights = w2 if shard_id == "w2" else w13
        scheme = weights.schemes[local]
        tp_rank, tp_size = compat.moe_tp_rank_size(layer)
        hidden, inter = layer.mxmoe_dims
        full_n, full_k = (hidden, inter * tp_size) if shard_id == "w2" else (inter * tp_size, hidden)
        specs = tensor_specs(scheme, full_n, full_k)
        if suffix not in specs:
            raise CheckpointFormatError(
                f"tensor {name}: not expected for scheme {scheme.name} (it has no {suffix})"
            )
        check_tensor(name, loaded, specs[suffix])
        key = (local, shard_id, suffix)
        if key in layer.mxmoe_loaded:
            raise CheckpointFormatError(f"tensor {name}: loaded twice")
        views = {WEIGHT_PACKED: weights.packed_view, WEIGHT_SCALE: weights.scale_view, WEIGHT_ZERO: weights.zero_view}
        dest = views[suffix](local)
        if shard_id == "w2":
            # Down projections shard their input (intermediate) dim: whole columns
            # of words / groups, or all of a per-channel scale.
            cols = dest.shape[1]
            if loaded.shape[1] != cols:
                loaded = loaded.narrow(1, tp_rank * cols, cols)
        else:
            loaded = loaded.narrow(0, tp_rank * inter, inter)
            dest = dest.narrow(0, 0 if shard_id == "w1" else inter, inter)
        if suffix == WEIGHT_PACKED:  # sharded in format v1 (whole chunks), then reordered where it lives
            loaded = to_kernel_order(scheme, loaded.to(dest.device))
        dest.copy_(loaded)
        layer.mxmoe_loaded.add(key)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if compat.is_dummy_load():
            make_dummy_weights_sane(*self.gemm_weights(layer))
        else:
            self._check_complete(layer)
        layer.mxmoe_loaded = set()
        if layer.w13_weight_packed.is_cuda:
            self._compile_kernels(layer)

    def _compile_kernels(self, layer: torch.nn.Module) -> None:
        """Compile every kernel variant this layer can launch now, not on the first request of a new size."""
        from .kernels import warmup

        if not warmup.enabled():
            return
        w13, w2 = self.gemm_weights(layer)
        launches, seconds = warmup.warm_up_layer(
            w13, w2, compat.moe_top_k(layer), compat.max_batched_tokens(), layer.mxmoe_act_dtype,
            expert_map=compat.expert_map(layer), num_global_experts=len(self.layer_schemes.gate_up),
        )
        if launches:
            logger.info("mxmoe %s: compiled %d kernel variants in %.1f s (MXMOE_WARMUP=0 skips this)",
                        self.prefix, launches, seconds)

    def _check_complete(self, layer: torch.nn.Module) -> None:
        gate_up, down = layer.mxmoe_schemes
        missing = []
        for local, g in enumerate(layer.mxmoe_global_ids):
            for shard_id in SHARDS:
                scheme = down[local] if shard_id == "w2" else gate_up[local]
                for suffix in SUFFIXES:
                    if suffix == WEIGHT_ZERO and not scheme.has_zero_point:
                        continue
                    if (local, shard_id, suffix) not in layer.mxmoe_loaded:
                        proj = self.checkpoint.proj_names[SHARDS.index(shard_id)]
                        missing.append(f"{self.prefix}.{g}.{proj}.{suffix}")
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointFormatError(
                f"checkpoint is missing {len(missing)} expert tensor(s): {', '.join(missing[:5])}{more}"
            )

    # -- forward -----------------------------------------------------------

    def get_fused_moe_quant_config(self, layer):
        return None

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None, **_):
        # An opaque op: torch.compile (vLLM compiles the model on CPU too) must not
        # trace the per-expert loop or the kernels' launch code.
        return torch.ops.mxmoe.fused_experts(x, topk_weights, topk_ids, layer.mxmoe_key)

    def forward_eager(self, layer, x, topk_weights, topk_ids) -> torch.Tensor:
        w13, w2 = self.gemm_weights(layer)
        emap = compat.expert_map(layer)
        if x.is_cuda:
            from .kernels.fused_moe import mxmoe_fused_experts

            return mxmoe_fused_experts(x, w13, w2, topk_weights, topk_ids, expert_map=emap)
        return reference_fused_experts(x, w13, w2, topk_weights, topk_ids, expert_map=emap)


# Layers by key, so the custom op (whose arguments must be tensors and strings)
# can find its weights; vLLM keeps its layers alive for the engine's lifetime.
_LAYERS: dict[str, tuple[MxMoEFusedMoEMethod, torch.nn.Module]] = {}


@torch.library.custom_op("mxmoe::fused_experts", mutates_args=())
def _fused_experts_op(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_key: str) -> torch.Tensor:
    method, layer = _LAYERS[layer_key]
    return method.forward_eager(layer, x, topk_weights, topk_ids)


@_fused_experts_op.register_fake
def _(x, topk_weights, topk_ids, layer_key):
    return torch.empty_like(x)


def _scheme_counts(gate_up, down) -> str:
    counts: dict[str, int] = {}
    for s in list(gate_up) + list(down):
        counts[s.name] = counts.get(s.name, 0) + 1
    return ", ".join(f"{n}x{name}" for name, n in sorted(counts.items()))
