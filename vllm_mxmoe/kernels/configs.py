"""Tile configurations of the mixed-precision MoE kernels: the one table, and how it is read.

A configuration is chosen from host-side integers only (token count, top-k,
expert count, GEMM shape, group sizes), never from routing data, so choosing
costs no host/device sync and CUDA graphs can capture the launches.

BLOCK_M is shared by the alignment step and both GEMMs of a layer (the sorted
token list is padded per expert to a multiple of it); BLOCK_N, BLOCK_K,
warps, stages and split-K may differ between the two GEMMs.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    # Dequantization of 2/3/4-bit codes: 0 = shift/mask + magic OR (v1), 1 = field-wise in
    # plain Triton, 2 = field-wise in inline PTX, 3 = 2 with 4-bit pairs taken straight from
    # the LOP3 and the K order permuted inside 8-groups for A and W (grouped_gemm.py);
    # -1 = default_dequant().
    dequant: int = -1
    # Field-wise dequant modes (>= 1) only: compute the tile as W x A^T (see grouped_gemm.py).
    swap_ab: bool = False
    # K tiles per loop iteration of blocks in fragment order with post-scaled tiles (1 or 2).
    k_unroll: int = 1


# Rows an expert is expected to see (tokens * topk / experts), upper bound -> tiles.
# Decode is memory bound: small BLOCK_M (16 is the smallest tl.dot takes), long
# BLOCK_K for wide loads of packed words, and split-K (below) so that enough
# programs stream weights at once. Prefill is compute bound: big tiles.
# Decode tiles compute W x A^T (swap_ab): measured 1.09-1.26x faster per GEMM on an H200 at 16-64
# tokens (benchmarks/tile_sweep.py --swap-ab, 2026-11-29 evening; KERNEL_NOTES.md), where ncu showed
# the plain orientation bound by 8-way bank-conflicted shared-memory stores of the dequantized tile.
# With 4-bit blocks in fragment order (layout.is_fragment_ordered; 2026-11-29 late sweeps,
# KERNEL_NOTES.md version 5) BLOCK_M = 16 also won at 17 rows per expert (qwen1.5-moe, 256 tokens:
# 1.7-2.1x over a 32-row tile in the plain orientation with the v1 dequant; see below), and prefill wants
# BLOCK_K = 128 with 2 stages (1.6-2.5x at 8192 tokens);
# the <= 128-row bucket takes the same BLOCK_K and stages: its own sweep (1024 tokens, 2026-11-30) found
# 8 warps / 3 stages 1.03-1.16x faster on gate_up but 1.07x slower on down, and a bucket has one config.
# Above 16 and up to 48 expected rows the swap-AB tile takes 32 rows (each expert's weights dequantized once
# for up to 32 rows instead of twice or three times). Measured on an H200 (decode_probe.py --overrides,
# w4g128 and mixed 3.25, session 15), time per GEMM against the 16-row tile: uniform routing, 0.73-0.92x at
# 17-48 rows per expert on DeepSeek-V2-Lite and Qwen1.5-MoE (256-512 tokens), 0.80-0.83x on Qwen3-30B-A3B at
# 32 and 0.78-0.85x on Mixtral at 32; 1.13-1.30x at 8-12 rows. At exactly 16 rows it is a draw: 0.94-0.97x
# with uniform routing (Qwen3, 256 tokens), 0.94-1.05x and slower in 6 of 8 GEMMs with Zipf s=1 (Qwen3 at
# 256, Mixtral at 64), so 16 keeps the 16-row tile. (Session 9's 32-row probe had fallen back to the v1
# dequant.)
TILE_TABLE: list[tuple[float, GemmConfig]] = [
    (16, GemmConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4, swap_ab=True)),
    (48, GemmConfig(block_m=32, block_n=64, block_k=128, num_warps=4, num_stages=4, swap_ab=True)),
    (128, GemmConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=2)),
    (math.inf, GemmConfig(block_m=128, block_n=128, block_k=128, num_warps=4, num_stages=2)),
]

# Layers holding 3-bit blocks keep the 32-row swap-AB tile (unsplit) from 48 up to 128 expected rows per
# expert, where other layers take the 64-row tile. Measured on an H200 (decode_probe.py --zipf-s 1, session 15,
# results/2026-11-30-s15-h200/call6_wide_tiles_table), 32-row time / 64-row time for mixed 3.25 layers
# (2/3/4-bit): Mixtral at 64 rows 0.81 (gate_up) / 0.65 (down), at 128 rows 0.84 / 0.77; DeepSeek-V2-Lite at
# 96 rows 0.88 / 0.87. Session 16 (results/2026-12-01-s16-h200/callB_checks_probe_table) on all four shapes: the
# 64-row tile takes 1.05-1.53x the 32-row tile's time (Qwen3 1.30-1.36x at 64 rows, 1.05-1.10x at 128). Past 128
# rows the 32-row tile gains only with even routing (0.87-0.95x at 137-160 rows; Zipf 0.97-1.07x; 192 rows
# 1.08-1.17x; callD_prefill_tiles), so the bound stays. Uniform w4g128 layers came out both ways (Mixtral
# 0.89-0.96, DeepSeek 1.04-1.05) and keep the 64-row tile.
LOW_BIT_WIDE_DECODE_MAX_ROWS = 128

# Prefill tile of a GEMM whose blocks are all w8a8fp8: with no dequantization registers the 128 x 256
# tile with two warpgroups and 4 stages fits, and fp8 tensor cores need it (tile_sweep.py --max-tile
# 32768, 2026-11-30: 1.23x gate_up and 1.34x down over the shared prefill tile at 8192 tokens on
# qwen3-30b-a3b; the w4g128 layer gained nothing from it on gate_up). Same BLOCK_M as that tile, so
# the other GEMM of the layer may keep the shared one.
FP8_PREFILL_CONFIG = GemmConfig(block_m=128, block_n=256, block_k=128, num_warps=8, num_stages=4)

# Split K until about this many programs per SM are launched (decode only), keeping at least
# MIN_K_STEPS_PER_SPLIT K tiles per program: each program streams only BLOCK_N * BLOCK_K packed
# weights per step, so the memory system needs many of them, but a program of a few K steps is
# mostly start-up. Measured on an H200 (tile_sweep.py --split-k 1,2,3,4,6,8, uniform and Zipf
# routing, 2026-11-30): Mixtral-8x7b's few huge experts gained 1.17x (gate_up, 1 token, split 3)
# and 1.08-1.11x (down, 16 tokens, split 6) over 4 programs per SM, and the small experts' down at
# 1 token (6-11 K steps) lost 1.1-1.3x when split into programs of 2-3 steps. (Before the two-tile
# loop; since session 10 this target serves all-fp8 MoE GEMMs and dense linears only.)
PROGRAMS_PER_SM = 20
# GEMMs whose blocks are all 4-bit weight-only (the ones that take the two-tile loop below) aim at
# 4 programs per SM: fewer splits keep their programs long enough for that loop. Measured on an H200
# (benchmarks/decode_probe.py --overrides, uniform routing, 2026-11-30 session 10): Mixtral-8x7b at
# 1 token, gate_up split 1 (32 K tiles, two-tile loop) 0.84x the time of split 3, down split 4 0.83x
# split 8; Qwen3-30B-A3B gate_up at 4 tokens split 1 0.87x split 3; DeepSeek-V2-Lite down at 16
# tokens split 1 0.91x split 2.
INT4_PROGRAMS_PER_SM = 4
# Every other MoE GEMM (mixed layers; uniform 2/3/8-bit ones too, though only mixed 3.25-bit layers were
# measured) aims at 12: same sweep, 1-64 tokens: DeepSeek-V2-Lite and Qwen1.5-MoE down (11 K tiles) at 16-64
# tokens split 1 0.87-0.92x split 2, Mixtral down split 4 0.97-1.04x split 6-8; at 1-4 tokens the splits
# stay as they were except gate_up of Mixtral at 1 token and DeepSeek at 4 (3 -> 2: 0.99x, 0.95x).
# All-fp8 GEMMs keep 20.
MIXED_PROGRAMS_PER_SM = 12
# Decode tiles of all-4-bit GEMMs with long K take two K tiles per loop iteration (GemmConfig.k_unroll)
# and 3 stages (a stage holds both tiles). Measured on an H200 (benchmarks/decode_probe.py, uniform
# routing, qwen3-30b-a3b, 2026-11-30 session 9): gate_up (16 K tiles) 0.89-0.92x the time of one tile
# per iteration at 16-64 tokens; down (6 K tiles) 1.07-1.08x, and 2/3-bit or mixed GEMMs 0.99-1.08x:
# the loop's own instructions are shared by two tiles (195 instead of 215 sm_90 instructions per 4-bit
# tile), but registers rise from 80 to 117 (4 programs per SM instead of 6), which short loops and
# 3-bit tiles (96 registers already) do not repay.
UNROLL_MIN_K_TILES = 16
UNROLLED_DECODE = {"k_unroll": 2, "num_stages": 3}
# All-4-bit decode GEMMs with long K split until a program takes at most this many K tiles, whatever the
# program count says. Measured on an H200 (decode_probe.py --overrides, session 14, uniform and Zipf s=1
# routing): Mixtral-8x7b's down (112 K tiles) at split 4 took 0.83-0.84x the time of the count rule's split 5
# at 1 token, 0.90-0.93x its split 3 at 2 tokens, 0.90-0.91x its split 2 at 4 tokens and 0.97-1.01x at 16;
# its gate_up (32 K tiles) is fastest unsplit. The count rule's 5 overfills one wave of resident programs
# (4 per SM), and its 2-3 leave programs of 37-56 tiles.
INT4_MAX_K_TILES_PER_PROGRAM = 32
MIN_K_STEPS_PER_SPLIT = 5
# MoE GEMMs want at least 5.5 K tiles per program on average: K = 2048 (16 tiles) then splits at most 2 ways, not
# 3, while 11 tiles (K = 1408) still split 2 ways, which their down GEMMs at 1 token need (unsplit: 1.14-1.20x
# slower). Same call against 5 (decode_probe, session 10, gate_up at 1-4 tokens): Qwen3 w4g128 0.95x at 1 token,
# mixed 3.25 0.91 / 0.96x at 1 / 4; DeepSeek mixed 0.90 / 0.97x at 1 / 2; Qwen1.5 mixed 0.97 / 0.96x at 2 / 4
# but 1.07x at 1 token (w4g128 1.03x).
MOE_MIN_K_STEPS_PER_SPLIT = 5.5
MAX_SPLIT_K = 8
_DEFAULT_NUM_SMS = 132  # H100/H200; used when no GPU is visible (CPU interpreter)


DEQUANT_V1, DEQUANT_FIELDS, DEQUANT_ASM, DEQUANT_ASM_PAIRED = 0, 1, 2, 3


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def default_dequant(block_m: int | None = None, low_bit: bool = False) -> int:
    """MXMOE_DEQUANT (0-3) if set; else DEQUANT_DEFAULT for decode tiles (BLOCK_M <= ASM_MAX_BLOCK_M,
    or LOW_BIT_ASM_MAX_BLOCK_M where the layer has 3-bit fragment blocks: ``low_bit``) and
    DEQUANT_V1 for larger ones. Asm modes run their pure-Triton twin when interpreting."""
    env = os.environ.get("MXMOE_DEQUANT")
    if env is not None:
        mode = int(env)
        if mode not in (DEQUANT_V1, DEQUANT_FIELDS, DEQUANT_ASM, DEQUANT_ASM_PAIRED):
            raise ValueError(f"MXMOE_DEQUANT must be 0, 1, 2 or 3, got {mode}")
        return mode
    if block_m is not None and block_m > (LOW_BIT_ASM_MAX_BLOCK_M if low_bit else ASM_MAX_BLOCK_M):
        return DEQUANT_V1
    return DEQUANT_DEFAULT


def resolve_dequant(mode: int, block_m: int | None = None, low_bit: bool = False) -> int:
    return default_dequant(block_m, low_bit) if mode < 0 else mode


# Inline-PTX dequant by default for decode tiles: checked against the torch reference in bf16 on an
# H200 (every scheme mixed, 1..2048 tokens) and 6-16% faster on mixed 2/3/4-bit layers at 1-256
# tokens, equal within noise on uniform w4g128 (KERNEL_NOTES.md, 2026-11-29). With BLOCK_M >= 64
# triton 3.6 fails to compile it for some layers (grouped_gemm then falls back to mode 0 with a
# warning), and it was not faster at 8192 tokens on mixed layers: larger tiles keep mode 0.
DEQUANT_DEFAULT = DEQUANT_ASM
ASM_MAX_BLOCK_M = 32  # the decode tiles it was measured on (16 rows: <= 256 tokens on qwen3; 32 rows: session 15)
# Since 3-bit codes decode in place (KERNEL_NOTES.md version 11), 64-row tiles of layers holding 3-bit
# fragment blocks are faster with the asm too: mixed 3.25 layers 0.89-0.90x the time at 256 (Mixtral)
# and 2048 tokens (Qwen3), w3g128 0.85-0.89x; w2g128 layers 1.15-1.46x slower with it, all-4-bit ones
# 1.2-1.6x, and 128-row tiles 1.7-3.5x (results/2026-11-30-s11-h200/call12_large_tiles, call13_rule).
LOW_BIT_ASM_MAX_BLOCK_M = 64


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host. (triton.cdiv and triton.next_power_of_2 are constexpr functions in newer triton,
    a few microseconds per Python call, and an eager MoE forward makes about fifteen such calls per layer.)"""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), on the host."""
    return 1 << (n - 1).bit_length()


def expected_rows_per_expert(num_tokens: int, topk: int, num_experts: int) -> float:
    return num_tokens * topk / max(num_experts, 1)


def table_config(num_tokens: int, topk: int, num_experts: int, low_bit_layer: bool = False) -> GemmConfig:
    """The tile for the expected rows per expert; ``low_bit_layer``: the layer holds 3-bit blocks
    (LOW_BIT_WIDE_DECODE_MAX_ROWS)."""
    rows = expected_rows_per_expert(num_tokens, topk, num_experts)
    if low_bit_layer and TILE_TABLE[1][0] < rows <= LOW_BIT_WIDE_DECODE_MAX_ROWS:
        return TILE_TABLE[1][1]
    for bound, cfg in TILE_TABLE:
        if rows <= bound:
            return cfg
    return TILE_TABLE[-1][1]


def fit_block_k(block_k: int, k: int, groups: Sequence[int]) -> int:
    """Largest power of two <= block_k dividing K and every group size.

    One K tile then lies inside one quantization group, so a tile needs one
    scale (and zero) per output column. Groups are multiples of 32, so 32 always fits.
    """
    while block_k > 32 and (k % block_k or any(g % block_k for g in groups)):
        block_k //= 2
    return block_k


def num_sms(device: torch.device | None) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_NUM_SMS


def fit_split_k(cfg: GemmConfig, num_tokens: int, topk: int, num_experts: int, n: int, k: int, sms: int,
                programs_per_sm: int) -> int:
    """Split K in decode (the swap-AB tiles up to TILE_TABLE's 48 rows) so that busy M-blocks x N-blocks x splits
    fills the GPU."""
    if not cfg.swap_ab or expected_rows_per_expert(num_tokens, topk, num_experts) > TILE_TABLE[1][0]:
        return 1
    busy_blocks = min(num_tokens * topk, num_experts)  # every busy expert holds >= 1 M-block
    return split_for_programs(cfg, busy_blocks * math.ceil(n / cfg.block_n), k, sms, programs_per_sm,
                              MOE_MIN_K_STEPS_PER_SPLIT)


def split_for_programs(cfg: GemmConfig, programs: int, k: int, sms: int,
                       programs_per_sm: int = PROGRAMS_PER_SM, min_steps: float = MIN_K_STEPS_PER_SPLIT) -> int:
    """Splits of K that bring ``programs`` (M-blocks x N-blocks) to about ``programs_per_sm`` per SM,
    keeping at least ``min_steps`` K tiles per program on average."""
    want = math.ceil(programs_per_sm * sms / max(programs, 1))
    return max(1, min(want, MAX_SPLIT_K, int(k // cfg.block_k / min_steps)))


def select_gemm_config(
    num_tokens: int, topk: int, num_experts: int, n: int, k: int, groups: Sequence[int], device=None,
    sms: int | None = None, fp8_only: bool = False, int4_only: bool = False, low_bit_layer: bool = False,
) -> GemmConfig:
    """The config of one GEMM of a layer (BLOCK_M follows table_config for both); ``sms``
    overrides the SM count read from ``device``; ``fp8_only``: every block is w8a8fp8; ``int4_only``:
    every block is 4-bit weight-only in fragment order; ``low_bit_layer``: either GEMM of the layer holds
    3-bit blocks."""
    cfg = table_config(num_tokens, topk, num_experts, low_bit_layer)
    if fp8_only and cfg == TILE_TABLE[-1][1]:
        cfg = FP8_PREFILL_CONFIG
    cfg = replace(cfg, block_k=fit_block_k(cfg.block_k, k, groups))
    sms = sms or num_sms(device)
    int4_decode = int4_only and cfg.swap_ab  # the tiles that may take the two-tile loop
    per_sm = INT4_PROGRAMS_PER_SM if int4_decode else PROGRAMS_PER_SM if fp8_only else MIXED_PROGRAMS_PER_SM
    split_k = fit_split_k(cfg, num_tokens, topk, num_experts, n, k, sms, per_sm)
    k_tiles = k // cfg.block_k
    if int4_decode and k_tiles > INT4_MAX_K_TILES_PER_PROGRAM:
        split_k = min(MAX_SPLIT_K, cdiv(k_tiles, INT4_MAX_K_TILES_PER_PROGRAM))
    cfg = replace(cfg, split_k=split_k)
    if int4_decode and k_tiles // cfg.split_k >= UNROLL_MIN_K_TILES:
        cfg = replace(cfg, **UNROLLED_DECODE)
    return cfg


class GemmKey(NamedTuple):
    """What a GEMM's config depends on besides the token count (fused_moe.gemm_key builds it from weights)."""

    n: int
    k: int
    groups: tuple[int, ...]
    fp8_only: bool = False  # every block is w8a8fp8
    int4_only: bool = False  # every block is 4-bit weight-only in fragment order
    low_bit_layer: bool = False  # either GEMM of the layer holds 3-bit blocks (same for both: BLOCK_M is shared)


@functools.lru_cache(maxsize=4096)
def config_for_key(key: GemmKey, num_tokens: int, topk: int, num_experts: int, device=None,
                   sms: int | None = None) -> GemmConfig:
    """select_gemm_config for the GEMM ``key`` describes (memoised: eager forwards ask for it per layer)."""
    return select_gemm_config(num_tokens, topk, num_experts, key.n, key.k, key.groups, device, sms=sms,
                              fp8_only=key.fp8_only, int4_only=key.int4_only, low_bit_layer=key.low_bit_layer)
