"""The whole mixed-precision MoE layer on the GPU, same semantics as reference_fused_experts.

    align (1 kernel for few slots, else 3 + a memset) -> [fp8 quant of x] -> GEMM1 gate_up (one launch, all experts)
    -> silu(gate) * up [+ fp8 quant] (sums split-K partials) -> GEMM2 down x topk weight
    -> sum over topk (and split-K partials)

silu(gate) * up runs in GEMM1's epilogue (one launch less, and gate_up never stored) unless GEMM1 is
split along K, runs through csrc/, or GEMM2 needs the activations' per-token fp8 copy (each needs the
whole row); MXMOE_FUSED_SILU=0 turns the fusion off (for A/B timing).

No host synchronisation: every shape and launch parameter comes from tensor
shapes and the (host-side) scheme lists, never from routing data.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import csrc_ext
from .act_quant import quantize_fp8_per_token, silu_and_mul
from .align import align_routing
from .configs import GemmConfig, GemmKey, cdiv, config_for_key, next_pow2
from .grouped_gemm import all_int4_fragment, all_w8a8fp8, grouped_gemm, has_3bit_blocks, needs_fp8_activations
from .layout import ExpertGemmWeights

FUSED_SILU_DEFAULT = os.environ.get("MXMOE_FUSED_SILU", "1") != "0"


@triton.jit
def _moe_sum_kernel(
    part_ptr, slot_expert_ptr, out_ptr, N, split_stride,
    TOPK: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[t] = sum over topk slots (local ones only) and split-K partials of part[s, t*topk + j]."""
    token = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    # Unrolled, so that all TOPK x SPLIT_K loads are in flight at once: with a loop each waited on the
    # last, which made this small kernel latency bound at decode.
    for j in tl.static_range(TOPK):
        slot = token * TOPK + j
        # Slots of other ranks' experts were never written by GEMM2: skip them.
        cols = tl.where(tl.load(slot_expert_ptr + slot) >= 0, N, 0)
        for s in tl.static_range(SPLIT_K):
            row = part_ptr + s * split_stride + slot.to(tl.int64) * N
            acc += tl.load(row + offs_n, mask=offs_n < cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * N + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def moe_sum(partials: torch.Tensor, slot_expert: torch.Tensor, topk: int, out: torch.Tensor) -> torch.Tensor:
    splits, slots, n = partials.shape
    tokens = slots // topk
    if tokens:
        block_n = min(1024, next_pow2(n))
        _moe_sum_kernel[(tokens, cdiv(n, block_n))](
            partials, slot_expert, out, n, slots * n, TOPK=topk, SPLIT_K=splits, BLOCK_N=block_n
        )
    return out


def select_configs(
    num_tokens: int, topk: int, w13: ExpertGemmWeights, w2: ExpertGemmWeights, device=None
) -> tuple[GemmConfig, GemmConfig]:
    """Configs of (GEMM1, GEMM2) for this token count; both share BLOCK_M (see configs.py)."""
    key1, key2 = layer_gemm_keys(w13, w2)
    e = w13.num_experts
    return config_for_key(key1, num_tokens, topk, e, device), config_for_key(key2, num_tokens, topk, e, device)


def gemm_key(w: ExpertGemmWeights, low_bit_layer: bool) -> GemmKey:
    """What a GEMM's config depends on besides the token count (``low_bit_layer``: see layer_gemm_keys)."""
    return GemmKey(w.n, w.k, w.group_sizes(), all_w8a8fp8(w), all_int4_fragment(w), low_bit_layer)


def layer_gemm_keys(w13: ExpertGemmWeights, w2: ExpertGemmWeights) -> tuple[GemmKey, GemmKey]:
    """The gemm_key of both GEMMs of a layer, with the layer-wide facts (both must pick one BLOCK_M)."""
    low_bit = has_3bit_blocks(w13) or has_3bit_blocks(w2)
    return gemm_key(w13, low_bit), gemm_key(w2, low_bit)


def mxmoe_fused_experts(
    hidden_states: torch.Tensor,
    w13: ExpertGemmWeights,
    w2: ExpertGemmWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None = None,
    *,
    configs: tuple[GemmConfig, GemmConfig] | None = None,
    out: torch.Tensor | None = None,
    use_csrc: bool | None = None,
    fuse_silu: bool | None = None,
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = expert of slot (t, j).

    hidden_states [T, hidden] fp16/bf16; w13: gate_up weights (N = 2 * inter, gate
    rows first); w2: down weights; expert_map: global -> local expert id (-1: not
    on this rank, such slots contribute 0). ``configs`` overrides the tile table
    (GEMM1, GEMM2; same block_m); ``out`` [T, hidden] receives the result.
    ``use_csrc``: run the GEMMs that csrc_ext.supports() through the CUDA extension
    (None: for batches of <= csrc_ext.DEFAULT_MAX_TOKENS tokens when csrc_ext.enabled(),
    i.e. only once the extension is built). ``fuse_silu``: silu(gate) * up in GEMM1's epilogue where
    possible (None: FUSED_SILU_DEFAULT).
    """
    num_tokens, hidden = hidden_states.shape
    topk = topk_ids.shape[1]
    if w13.k != hidden or w2.n != hidden or w2.k * 2 != w13.n:
        raise ValueError(
            f"mxmoe_fused_experts: shapes do not chain: hidden={hidden}, w13 [{w13.n}, {w13.k}], w2 [{w2.n}, {w2.k}]"
        )
    if w13.num_experts != w2.num_experts:
        raise ValueError("mxmoe_fused_experts: w13 and w2 hold different expert counts")
    if out is None:
        out = torch.empty(num_tokens, hidden, dtype=hidden_states.dtype, device=hidden_states.device)
    elif tuple(out.shape) != (num_tokens, hidden) or not out.is_contiguous():
        raise ValueError(f"mxmoe_fused_experts: out must be a contiguous [{num_tokens}, {hidden}] tensor")
    if num_tokens == 0:
        return out
    cfg1, cfg2 = configs or select_configs(num_tokens, topk, w13, w2, hidden_states.device)
    if cfg1.block_m != cfg2.block_m:
        raise ValueError("mxmoe_fused_experts: both GEMM configs must share block_m")

    x = hidden_states if hidden_states.stride(-1) == 1 else hidden_states.contiguous()
    routing = align_routing(topk_ids, w13.num_experts, cfg1.block_m, expert_map)

    if use_csrc is None:  # measured faster at 1 token only (KERNEL_NOTES.md)
        use_csrc = num_tokens <= csrc_ext.DEFAULT_MAX_TOKENS and csrc_ext.enabled()
    x_fp8 = quantize_fp8_per_token(x) if needs_fp8_activations(w13) else None
    gemm1_csrc = use_csrc and csrc_ext.supports(w13, x, cfg1.block_m)
    if fuse_silu is None:
        fuse_silu = FUSED_SILU_DEFAULT
    act_to_fp8 = needs_fp8_activations(w2)
    if fuse_silu and not gemm1_csrc and cfg1.split_k == 1 and not act_to_fp8:
        act = grouped_gemm(x, w13, routing, cfg1, a_row_div=topk, a_fp8=x_fp8, gated=True)[0]
        act_fp8 = None
    else:
        if gemm1_csrc:
            gate_up = csrc_ext.w4_gemv(x, w13, routing, a_row_div=topk)
        else:
            gate_up = grouped_gemm(x, w13, routing, cfg1, a_row_div=topk, a_fp8=x_fp8)
        act, act_fp8 = silu_and_mul(gate_up, routing.slot_expert, x.dtype, quantize_fp8=act_to_fp8,
                                    store_act=any(s.act != "fp8" for s in w2.distinct_schemes))
    flat_weights = topk_weights.reshape(-1)
    if use_csrc and csrc_ext.supports(w2, act, cfg2.block_m):
        down = csrc_ext.w4_gemv(act, w2, routing, routed_weights=flat_weights)
    else:
        down = grouped_gemm(act, w2, routing, cfg2, a_fp8=act_fp8, routed_weights=flat_weights)
    return moe_sum(down, routing.slot_expert, topk, out)


__all__ = ["mxmoe_fused_experts", "select_configs", "moe_sum", "GemmConfig"]
