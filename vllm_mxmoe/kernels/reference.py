"""Torch reference of the mixed-precision MoE: the correctness oracle and the CPU path.

Dequantizes one expert at a time (never the whole layer), computes in float32
and returns the input dtype. Tokens are gathered per expert with
data-dependent indexing: cheap on the CPU, where there is no device to sync
with (the plugin calls this inside an opaque custom op, so torch.compile never
traces it). ``dense=True`` computes every expert on every token and masks by
the routing weights instead: E/topk times the work, but no data-dependent
shapes. CUDA runs the Triton kernels instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..format import FP8_DTYPE, FP8_MAX
from .layout import ExpertGemmWeights


def fake_quant_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Round activations through fp8 e4m3 with one scale per row, as the kernels do."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8_DTYPE).float() * scale


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [..., 2I] (gate first), in its dtype: the expert MLP's activation."""
    inter = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :inter]) * gate_up[..., inter:]


def expert_linear(x: torch.Tensor, weights: ExpertGemmWeights, e: int) -> torch.Tensor:
    """x [T, K] @ W_e^T in float32 for expert e, fp8 activations where its scheme says."""
    x = x.float()
    if weights.schemes[e].act == "fp8":
        x = fake_quant_fp8_per_token(x)
    return x @ weights.dequantize_expert(e, torch.float32).t()


def reference_fused_experts(
    hidden_states: torch.Tensor,
    w13: ExpertGemmWeights,
    w2: ExpertGemmWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None = None,
    dense: bool = False,
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = topk_ids[t, j].

    ``expert_map`` maps global expert ids to local ones (-1: not on this rank),
    as vLLM's expert parallelism does.
    """
    num_tokens, hidden = hidden_states.shape
    out = torch.zeros(num_tokens, w2.n, dtype=torch.float32, device=hidden_states.device)
    ids = topk_ids if expert_map is None else expert_map[topk_ids.long()]

    def expert_mlp(x: torch.Tensor, e: int) -> torch.Tensor:
        return expert_linear(silu_mul(expert_linear(x, w13, e)), w2, e)

    for e in range(w13.num_experts):
        if dense:
            combine = (topk_weights.float() * (ids == e)).sum(dim=1, keepdim=True)  # 0 where not routed
            out += expert_mlp(hidden_states, e) * combine
            continue
        token_idx, slot = torch.nonzero(ids == e, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        down = expert_mlp(hidden_states[token_idx], e)
        out.index_add_(0, token_idx, down * topk_weights[token_idx, slot].float().unsqueeze(1))
    return out.to(hidden_states.dtype)
