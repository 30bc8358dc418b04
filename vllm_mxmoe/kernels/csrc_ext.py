"""Optional CUDA extension (csrc/): a grouped GEMV-like kernel for 4-bit weight-only experts.

Built only on request, through torch.utils.cpp_extension.load (nvcc, about a minute):

    from vllm_mxmoe.kernels import csrc_ext
    csrc_ext.build()            # or MXMOE_CSRC_BUILD=1 in the environment, see enabled()

and used only when built. ``fused_moe.mxmoe_fused_experts`` routes a GEMM to it
when ``use_csrc`` (default: ``enabled()``, off unless MXMOE_CSRC=1) holds and ``supports()``
says the GEMM fits: every expert 4-bit weight-only (w4g128 and per-channel w4 in fragment
order, smaller groups in format-v1 order), decode tiles (BLOCK_M <= 16). It is a fallback,
not a fast path: on the H200 the Triton decode kernel is faster at every size measured
(benchmarks/KERNEL_NOTES.md, version 14).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from .align import AlignedRouting
from .layout import ExpertGemmWeights

CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("w4_gemv.cu", "binding.cpp")
MAX_BLOCK_M = 16  # decode tiles only (the kernel itself takes up to 64)

_ext = None
_lock = threading.Lock()
_build_error: str | None = None


def build(verbose: bool = False):
    """Compile (or load the cached build of) the extension; returns the module or raises."""
    global _ext, _build_error
    with _lock:
        if _ext is not None:
            return _ext
        if not torch.cuda.is_available():
            raise RuntimeError("csrc_ext.build: no CUDA device")
        missing = [s for s in SOURCES if not (CSRC_DIR / s).exists()]
        if missing:
            raise FileNotFoundError(f"csrc_ext.build: {CSRC_DIR} lacks {missing}")
        from torch.utils.cpp_extension import load

        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        try:
            _ext = load(
                name="mxmoe_csrc",
                sources=[str(CSRC_DIR / s) for s in SOURCES],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "-lineinfo"],
                verbose=verbose,
            )
        except Exception as e:  # noqa: BLE001 - reported by available()/build_error()
            _build_error = f"{type(e).__name__}: {e}"
            raise
        return _ext


def available() -> bool:
    """True once built (build() or MXMOE_CSRC_BUILD=1; the latter builds on first call)."""
    if _ext is None and os.environ.get("MXMOE_CSRC_BUILD") == "1" and _build_error is None:
        try:
            build()
        except Exception:  # noqa: BLE001 - the Triton path is used instead
            return False
    return _ext is not None


def build_error() -> str | None:
    return _build_error


# Off by default: the Triton decode path is faster wherever both were timed. H200, session 14 (KERNEL_NOTES.md
# version 14), w4g128 layers in fragment order, Zipf routing, 1 token: 28.7 vs 22.5 us per layer (qwen3 shape),
# 26.5 vs 22.7 (qwen1.5), 31.9 vs 26.4 (deepseek), 118.7 vs 93.2 (mixtral); 1.3-4.5x slower at 2-16 tokens.
# (It was faster at 1 token, 27.9 vs 39.4 us, against the Triton kernel of KERNEL_NOTES.md version 2.)
# MXMOE_CSRC=1 (with a build) turns it on for batches of <= DEFAULT_MAX_TOKENS tokens.
CSRC_DEFAULT = False
DEFAULT_MAX_TOKENS = 1


def enabled() -> bool:
    """Default of fused_moe's use_csrc (for <= DEFAULT_MAX_TOKENS tokens): MXMOE_CSRC=1/0 if set, else
    CSRC_DEFAULT; always needs a build (build() or MXMOE_CSRC_BUILD=1)."""
    env = os.environ.get("MXMOE_CSRC")
    want = CSRC_DEFAULT if env is None else env == "1"
    return want and available()


def supports(weights: ExpertGemmWeights, a: torch.Tensor, block_m: int) -> bool:
    """The kernel handles this GEMM: all experts int4 weight-only (format-v1 or fragment order), K % 32 == 0,
    decode tiles, aligned A."""
    if _ext is None or block_m > MAX_BLOCK_M or weights.k % 32 or a.dtype not in (torch.float16, torch.bfloat16):
        return False
    if a.stride(-1) != 1 or a.stride(0) % 8 or a.data_ptr() % 16:
        return False
    return all(
        s.bits == 4 and s.act != "fp8" and not s.weight_is_fp8 and s.group(weights.k) % 32 == 0
        for s in weights.distinct_schemes
    )


def w4_gemv(
    a: torch.Tensor,
    weights: ExpertGemmWeights,
    routing: AlignedRouting,
    *,
    a_row_div: int = 1,
    routed_weights: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as grouped_gemm with split_k = 1: returns [1, num_slots, N] in a's dtype."""
    if _ext is None:
        raise RuntimeError("csrc_ext.w4_gemv: extension not built (csrc_ext.build())")
    shape = (1, routing.num_slots, weights.n)
    if out is None:
        out = torch.empty(shape, dtype=a.dtype, device=a.device)
    rw = routed_weights.float().contiguous() if routed_weights is not None else None
    _ext.w4_gemv(
        a, weights.qweight, weights.scales, weights.zeros, weights.meta, out, rw,
        routing.sorted_ids, routing.block_expert, routing.num_blocks,
        weights.n, weights.k, routing.num_slots, a_row_div, routing.block_m,
    )
    return out
