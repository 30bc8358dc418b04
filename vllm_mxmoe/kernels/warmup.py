"""Compile every kernel variant a layer can launch before the engine serves.

Triton compiles a kernel the first time it meets a new set of constexprs
(tile config, split-K, which scheme branches, alignment variant). The tile
config follows the token count, so without this the first prefill of an
unseen size stalls for seconds while a kernel compiles (it showed up as a 2-3x
lower throughput in the first benchmark of each batch size). Here every
distinct launch signature over 1..max_tokens tokens runs once, at the smallest
token count that produces it, on random routing. Layers that share schemes and
shapes share compiled kernels, so only the first such layer pays; triton's disk
cache makes later engine starts fast.
"""

from __future__ import annotations

import functools
import os
import time

import torch

from . import align as align_mod
from .configs import GemmKey, config_for_key, num_sms
from .grouped_gemm import layer_kinds
from .layout import ExpertGemmWeights

# Signatures already compiled in this process (by layer key + signature).
_DONE: set = set()


def enabled() -> bool:
    return os.environ.get("MXMOE_WARMUP", "1") != "0"


def _align_variant(num_slots: int, num_experts: int, block_m: int) -> tuple:
    """What changes the alignment kernels' constexprs (one-program: the padded slot count)."""
    if align_mod.uses_one_program(num_slots, num_experts, block_m):
        return ("one", 1 << max(num_slots - 1, 0).bit_length())
    return ("multi",)


@functools.lru_cache(maxsize=64)
def signature_token_counts(
    max_tokens: int, topk: int, num_experts: int,
    gemm1: GemmKey, gemm2: GemmKey, sms: int,
) -> tuple[tuple[int, tuple], ...]:
    """(smallest token count, signature) for each distinct launch signature in 1..max_tokens.

    gemm1/gemm2 are fused_moe.layer_gemm_keys'; the signature is
    both GEMM configs and the alignment variant, which together fix every constexpr of the
    layer's kernels.
    """
    seen: dict[tuple, int] = {}
    for t in range(1, max_tokens + 1):
        cfg1 = config_for_key(gemm1, t, topk, num_experts, sms=sms)
        cfg2 = config_for_key(gemm2, t, topk, num_experts, sms=sms)
        sig = (cfg1, cfg2, _align_variant(t * topk, num_experts, cfg1.block_m))
        seen.setdefault(sig, t)
    return tuple((t, sig) for sig, t in seen.items())


def warm_up_layer(
    w13: ExpertGemmWeights, w2: ExpertGemmWeights, topk: int, max_tokens: int, dtype: torch.dtype,
    expert_map: torch.Tensor | None = None, num_global_experts: int | None = None,
) -> tuple[int, float]:
    """Run mxmoe_fused_experts once per launch signature not compiled yet; (launches, seconds)."""
    from .fused_moe import layer_gemm_keys, mxmoe_fused_experts

    device = w13.qweight.device
    e_global = num_global_experts or w13.num_experts
    layer_key = (layer_kinds(w13), layer_kinds(w2), dtype, w13.n, w13.k, w2.n, w2.k, w13.num_experts, e_global,
                 topk, expert_map is not None, w13.group_sizes(), w2.group_sizes())
    todo = [
        (t, sig) for t, sig in signature_token_counts(
            max_tokens, topk, w13.num_experts, *layer_gemm_keys(w13, w2), num_sms(device)
        ) if (layer_key, sig) not in _DONE
    ]
    t0 = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(0)
    for t, sig in todo:
        x = torch.randn(t, w13.k, device=device, dtype=dtype, generator=gen) * 0.1
        ids = torch.rand(t, e_global, device=device, generator=gen).topk(topk, dim=1).indices.to(torch.int32)
        weights = torch.full((t, topk), 1.0 / topk, device=device, dtype=torch.float32)
        mxmoe_fused_experts(x, w13, w2, weights, ids, expert_map=expert_map)
        _DONE.add((layer_key, sig))
    if todo and device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(todo), time.perf_counter() - t0


@functools.lru_cache(maxsize=64)
def linear_signature_token_counts(
    max_tokens: int, n: int, k: int, groups: tuple[int, ...], weight_only: bool, sms: int
) -> tuple[tuple[int, object], ...]:
    """(smallest token count, launch signature) for each distinct way a dense linear runs in
    1..max_tokens: the kernel's tile config, or "dequant" (weight-only blocks from DEQUANT_MIN_ROWS)."""
    from .dense_linear import DEQUANT_MIN_ROWS, linear_config

    seen: dict = {}
    for t in range(1, max_tokens + 1):
        if weight_only and t >= DEQUANT_MIN_ROWS:
            seen.setdefault("dequant", t)
            break
        seen.setdefault(linear_config(t, n, k, groups, sms), t)
    return tuple((t, sig) for sig, t in seen.items())


def warm_up_linear(weights: ExpertGemmWeights, max_tokens: int, dtype: torch.dtype,
                   has_bias: bool = False) -> tuple[int, float]:
    """Run kernels.dense_linear.quantized_linear once per launch signature not compiled yet; (launches, seconds)."""
    from .dense_linear import is_weight_only_int, quantized_linear

    device = weights.qweight.device
    weight_only = is_weight_only_int(weights)
    key = ("linear", layer_kinds(weights), dtype, weights.n, weights.k, weights.group_sizes(), has_bias)
    todo = [(t, sig) for t, sig in linear_signature_token_counts(
        max_tokens, weights.n, weights.k, weights.group_sizes(), weight_only, num_sms(device)) if (key, sig) not in _DONE]
    t0 = time.perf_counter()
    bias = torch.zeros(weights.n, device=device, dtype=dtype) if has_bias else None
    for t, sig in todo:
        quantized_linear(torch.randn(t, weights.k, device=device, dtype=dtype) * 0.1, weights, bias)
        _DONE.add((key, sig))
    if todo and device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(todo), time.perf_counter() - t0
