"""Triton MoE kernels vs the torch reference, on the CPU through Triton's interpreter.

The interpreter (TRITON_INTERPRET=1, set before triton is imported) runs the
same kernels with numpy; it is slow, so shapes are tiny. fp16 only: triton
3.9's interpreter returns garbage for bf16 tl.dot (bf16 is checked on the GPU
by benchmarks/kernel_check.py).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from vllm_mxmoe.format import FP8_MAX, encode, pack, unpack  # noqa: E402
from vllm_mxmoe.kernels.layout import ExpertGemmWeights, from_kernel_order, to_kernel_order  # noqa: E402
from vllm_mxmoe.kernels.reference import expert_linear, reference_fused_experts  # noqa: E402
from vllm_mxmoe.schemes import Scheme, parse_scheme  # noqa: E402

_KERNEL_MODULES = ("act_quant", "align", "grouped_gemm", "fused_moe", "dense_linear")


def _load_interpreted_kernels():
    """Import the kernel modules so that their @triton.jit functions run in the interpreter.

    If another test imported them before TRITON_INTERPRET was set, reload them.
    """
    from triton.runtime.interpreter import InterpretedFunction

    mods = {}
    for name in _KERNEL_MODULES:
        full = f"vllm_mxmoe.kernels.{name}"
        mod = importlib.import_module(full)
        mods[name] = mod
    if not isinstance(mods["grouped_gemm"]._grouped_gemm_kernel, InterpretedFunction):
        for name in _KERNEL_MODULES:
            mods[name] = importlib.reload(sys.modules[f"vllm_mxmoe.kernels.{name}"])
    return mods


_mods = _load_interpreted_kernels()
align_routing = _mods["align"].align_routing
grouped_gemm = _mods["grouped_gemm"].grouped_gemm
mxmoe_fused_experts = _mods["fused_moe"].mxmoe_fused_experts
quantize_fp8_per_token = _mods["act_quant"].quantize_fp8_per_token
quantized_linear = _mods["dense_linear"].quantized_linear
DEQUANT_MIN_ROWS = _mods["dense_linear"].DEQUANT_MIN_ROWS
from vllm_mxmoe.kernels.configs import GemmConfig  # noqa: E402

DTYPE = torch.float16
WEIGHT_ONLY_TOL = 5e-3
FP8_TOL = 2e-2


# ---------------------------------------------------------------------------
# Helpers


def rtn_quantize(w: torch.Tensor, scheme: Scheme):
    """Round-to-nearest with per-group min/max (asymmetric) or absmax (symmetric) scales."""
    n, k = w.shape
    if scheme.weight_is_fp8:
        return encode(w, w.abs().amax(1, keepdim=True).clamp(min=1e-8) / FP8_MAX, None, scheme)
    g = scheme.group(k)
    wg = w.reshape(n, k // g, g)
    if scheme.symmetric:
        scale = wg.abs().amax(-1).clamp(min=1e-8) / ((1 << (scheme.bits - 1)) - 1)
        return encode(w, scale, None, scheme)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = (hi - lo).clamp(min=1e-8) / scheme.qmax
    return encode(w, scale, torch.round(-lo / scale), scheme)


def make_weights(scheme_names: list[str], n: int, k: int, gen: torch.Generator) -> ExpertGemmWeights:
    """Random experts quantized each in its scheme, copied into the flat layer layout."""
    schemes = [parse_scheme(name) for name in scheme_names]
    weights = ExpertGemmWeights.allocate(schemes, n, k)
    for e, scheme in enumerate(schemes):
        qw = rtn_quantize(torch.randn(n, k, generator=gen) / k**0.5, scheme)
        weights.store_block(e, qw)
    return weights


def make_routing(num_tokens: int, topk: int, num_experts: int, gen: torch.Generator, skip=()):
    """Distinct experts per token, never one in ``skip`` (those get zero tokens)."""
    allowed = torch.tensor([e for e in range(num_experts) if e not in skip])
    picks = torch.stack([torch.randperm(len(allowed), generator=gen)[:topk] for _ in range(num_tokens)])
    ids = allowed[picks].to(torch.int32)
    weights = torch.rand(num_tokens, topk, generator=gen).softmax(-1)
    return ids, weights


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


ALL_SCHEMES_G32 = ["w2g32", "w3g64", "w4g128", "w8", "w4g128_sym", "w8_sym", "w3", "w2g128", "w8a8fp8", "w4a8fp8"]
FRAGMENT_SCHEMES = ["w4g128", "w4", "w4g128_sym", "w3g128", "w2g128", "w4"]
ALL_SCHEMES = ["w2g128", "w3g128", "w4g128", "w8", "w4g128_sym", "w8a8fp8", "w4a8fp8", "w3_sym", "w8g128", "w2"]


# ---------------------------------------------------------------------------
# Layout


def test_three_bit_kernel_order_is_a_2bit_plane_then_a_1bit_plane():
    gen = torch.Generator().manual_seed(3)
    n, k = 5, 256
    codes = torch.randint(0, 8, (n, k), generator=gen, dtype=torch.int32)
    w3 = parse_scheme("w3g64")  # groups of 64: not in fragment order
    planes = to_kernel_order(w3, pack(codes, 3))
    assert torch.equal(planes[:, : k // 16], pack(codes & 3, 2))
    bit2 = ((codes >> 2).reshape(n, k // 32, 32).long() << torch.arange(32)).sum(-1)
    assert torch.equal(planes[:, k // 16 :], bit2.to(torch.int64).remainder(2**32).to(torch.uint32).view(torch.int32))
    assert torch.equal(from_kernel_order(w3, planes), pack(codes, 3))
    packed4 = pack(codes & 15, 4)
    for name in ("w4g64", "w4g32", "w4a8fp8"):  # groups smaller than a fragment chunk, fp8 activations: as is
        w4 = parse_scheme(name)
        assert to_kernel_order(w4, packed4) is packed4 and from_kernel_order(w4, packed4) is packed4


def _lane_positions(c: int, j: int, field: int, bits: int) -> int:
    """K position (in a 128-chunk) that lane c's word j, field ``field``, holds in fragment order."""
    if bits == 4:  # j = (k5, k6), field = k3 + 2 k4 + 4 k0
        return (field >> 2) + 2 * c + 8 * (field & 1) + 16 * ((field >> 1) & 1) + 32 * j
    assert bits == 2  # j = k6, field = k3 + 2 k4 + 4 k5 + 8 k0
    return (field >> 3) + 2 * c + 8 * (field & 7) + 64 * j


@pytest.mark.parametrize("name", ["w4g128", "w4", "w4g256_sym", "w2g128", "w2"])
def test_fragment_order_puts_each_lanes_k_positions_in_its_words(name):
    gen = torch.Generator().manual_seed(5)
    n, k = 3, 256
    scheme = parse_scheme(name)
    codes = torch.randint(0, 1 << scheme.bits, (n, k), generator=gen, dtype=torch.int32)
    stored = to_kernel_order(scheme, pack(codes, scheme.bits))
    assert from_kernel_order(scheme, stored).equal(pack(codes, scheme.bits))
    pos = torch.arange(k).reshape(k // 128, 128)
    bits = scheme.bits
    per_lane = bits  # words per lane per 128-chunk
    got = unpack(stored, bits).reshape(n, k // 128, 4, per_lane, 32 // bits)  # [row, chunk, lane, word, field]
    for c in range(4):
        for j in range(per_lane):
            for f in range(32 // bits):
                kk = _lane_positions(c, j, f, bits)
                assert torch.equal(got[:, :, c, j, f], codes[:, pos[:, kk]]), (bits, c, j, f)


@pytest.mark.parametrize("name", ["w3g128", "w3_sym"])
def test_three_bit_fragment_order_keeps_lane_codes_in_nibbles_and_spare_bits(name):
    # layout._w3_fragment_bits: low word x = 2c + k6 of a chunk's 8, high word c of its 4 (shifted by 8 k6);
    # weight (i = k3 + 2 k4, k5, k0): i < 2 nibble i + 2 k5 of x, i = 2 nibble k5 of xh, i = 3 the spare
    # bits (bit 3) of x's nibbles k5 and 2 + k5 and of xh's nibble k5; k0 = 1 is 16 bits up.
    gen = torch.Generator().manual_seed(6)
    n, k = 3, 256
    scheme = parse_scheme(name)
    codes = torch.randint(0, 8, (n, k), generator=gen, dtype=torch.int32)
    stored = to_kernel_order(scheme, pack(codes, 3))
    assert from_kernel_order(scheme, stored).equal(pack(codes, 3))
    low = stored[:, : k // 16].reshape(n, k // 128, 8).long() & 0xFFFFFFFF
    high = stored[:, k // 16 :].reshape(n, k // 128, 4).long() & 0xFFFFFFFF

    def nibble(word, m):
        return (word >> (4 * m)) & 15

    for kk in range(128):
        k0, c, k3, k4, k5, k6 = kk & 1, (kk >> 1) & 3, (kk >> 3) & 1, (kk >> 4) & 1, (kk >> 5) & 1, kk >> 6
        i = k3 + 2 * k4
        x, xh = low[:, :, 2 * c + k6] >> (16 * k0), high[:, :, c] >> (8 * k6 + 16 * k0)
        if i < 2:
            got = nibble(x, i + 2 * k5) & 7
        elif i == 2:
            got = nibble(xh, k5) & 7
        else:
            got = (nibble(x, k5) >> 3) | ((nibble(x, 2 + k5) >> 3) << 1) | ((nibble(xh, k5) >> 3) << 2)
        assert torch.equal(got.int(), codes.reshape(n, k // 128, 128)[:, :, kk]), kk


def test_store_block_round_trips_through_block():
    gen = torch.Generator().manual_seed(4)
    weights = make_weights(["w3g64", "w4g128", "w3_sym", "w8a8fp8", "w4", "w4g64"], 16, 128, gen)
    for e, scheme in enumerate(weights.schemes):
        qw = rtn_quantize(torch.randn(16, 128, generator=gen), scheme)
        weights.store_block(e, qw)
        got = weights.block(e)
        assert torch.equal(got.packed.view(torch.uint8), qw.packed.view(torch.uint8)), scheme.name
        assert torch.equal(got.scale, qw.scale)
        assert (got.zero is None) == (qw.zero is None) and (got.zero is None or torch.equal(got.zero, qw.zero))


# ---------------------------------------------------------------------------
# Align


@pytest.mark.parametrize("one_program", [False, True])
@pytest.mark.parametrize(
    "num_tokens,topk,num_experts,block_m,local",
    [
        (1, 2, 4, 16, None),
        (20, 2, 6, 32, [2, -1, 0, -1, 1, -1]),  # one program: ranks by comparison (<= 128 slots)
        (37, 4, 8, 16, None),  # one program: ranks by atomic cursor
        (300, 4, 8, 16, None),  # three kernels: two count + rank programs share hot experts
    ],
)
def test_align_routing(num_tokens, topk, num_experts, block_m, local, one_program):
    gen = torch.Generator().manual_seed(num_tokens)
    ids, _ = make_routing(num_tokens, topk, num_experts, gen, skip=(num_experts - 1,))
    expert_map = None if local is None else torch.tensor(local, dtype=torch.int32)
    n_local = num_experts if local is None else max(local) + 1
    r = align_routing(ids, n_local, block_m, expert_map, one_program=one_program)

    flat = ids.reshape(-1).long()
    want_expert = flat if expert_map is None else expert_map[flat].long()
    num_slots = flat.numel()
    counts = torch.bincount(want_expert[want_expert >= 0], minlength=n_local)
    blocks = (counts + block_m - 1) // block_m
    nb = int(r.num_blocks.item())
    assert nb == int(blocks.sum())
    assert torch.equal(r.slot_expert.long(), want_expert)
    # Every M-block's owner, and every local slot exactly once in its expert's blocks.
    assert torch.equal(r.block_expert[:nb].long(), torch.repeat_interleave(torch.arange(n_local), blocks))
    rows = r.sorted_ids[: nb * block_m].long()
    real = rows[rows < num_slots]
    assert torch.equal(real.sort().values, torch.nonzero(want_expert >= 0).flatten())
    assert torch.all(rows[rows >= num_slots] == num_slots), "padding rows must hold the sentinel"
    row_owner = r.block_expert[:nb].long().repeat_interleave(block_m)
    assert torch.equal(row_owner[rows < num_slots], want_expert[real])
    assert torch.all(r.block_expert[nb:] == -1)


# ---------------------------------------------------------------------------
# One grouped GEMM, every scheme in one launch


@pytest.mark.parametrize("dequant,swap_ab", [(0, False), (1, False), (3, False), (1, True), (3, True)])
@pytest.mark.parametrize(
    "schemes,k,cfg",
    [
        (ALL_SCHEMES_G32, 256, GemmConfig(16, 32, 128, 4, 1, split_k=1)),  # BLOCK_K fitted to 32 by g32
        (ALL_SCHEMES, 256, GemmConfig(16, 32, 64, 4, 1, split_k=2)),
        # 4-bit blocks in fragment order read by whole 128-chunks (one per tile, then two per tile)
        (FRAGMENT_SCHEMES, 384, GemmConfig(16, 32, 128, 4, 1, split_k=2)),
        (FRAGMENT_SCHEMES, 512, GemmConfig(16, 32, 256, 4, 1, split_k=1)),
        # two K tiles per loop iteration: 5 tiles split 2 + 3 (pairs, then one tile after the loop)
        (FRAGMENT_SCHEMES, 640, GemmConfig(16, 32, 128, 4, 1, split_k=2, k_unroll=2)),
        # fragment blocks read by 32-K tiles (a quarter chunk; 3 bits: the k5 half picked at run time)
        (FRAGMENT_SCHEMES, 256, GemmConfig(16, 32, 32, 4, 1, split_k=1)),
        # 32-row tiles (the decode table's 14-48 rows per expert bucket)
        (FRAGMENT_SCHEMES, 384, GemmConfig(32, 32, 128, 4, 1, split_k=2)),
    ],
)
def test_grouped_gemm_mixed(schemes, k, cfg, dequant, swap_ab):
    # 2/3 (inline PTX) run their pure-Triton twins 1/3 here; swap_ab computes W x A^T.
    from dataclasses import replace

    from vllm_mxmoe.kernels.configs import fit_block_k

    cfg = replace(cfg, dequant=dequant, swap_ab=swap_ab)

    gen = torch.Generator().manual_seed(k + cfg.split_k)
    n, topk, tokens = 48, 2, 11  # N not a multiple of BLOCK_N
    weights = make_weights(schemes, n, k, gen)
    cfg = replace(cfg, block_k=fit_block_k(cfg.block_k, k, [parse_scheme(s).group(k) for s in schemes]))
    # Expert 1 gets no token; 11 tokens * 2 slots spread unevenly over the rest.
    ids, _ = make_routing(tokens, topk, len(schemes), gen, skip=(1,))
    x = torch.randn(tokens, k, generator=gen).to(DTYPE)
    routing = align_routing(ids, len(schemes), cfg.block_m)
    x_fp8 = quantize_fp8_per_token(x)
    out = torch.full((cfg.split_k, tokens * topk, n), float("nan"), dtype=torch.float32 if cfg.split_k > 1 else DTYPE)
    grouped_gemm(x, weights, routing, cfg, a_row_div=topk, a_fp8=x_fp8, out=out)
    assert not out.isnan().any(), "every slot row of every split must be written"
    got = out.float().sum(0)
    flat = ids.reshape(-1)
    for e in range(len(schemes)):
        slots = torch.nonzero(flat == e).flatten()
        if slots.numel() == 0:
            continue
        ref = expert_linear(x[slots // topk], weights, e)
        tol = FP8_TOL if weights.schemes[e].act == "fp8" else WEIGHT_ONLY_TOL
        err = rel_err(got[slots], ref)
        print(f"expert {e} ({schemes[e]}): rel err {err:.2e}")
        assert err < tol, f"expert {e} ({schemes[e]}): rel err {err:.2e}"


# Dense linears (kernels/dense_linear.py): the grouped kernel with one block and rows in order, or the weight
# dequantized by the same tile code (fragment order from 128-groups, plain packing below).
DENSE_SCHEMES = ["w4g128", "w3g128", "w2g128", "w8", "w4g128_sym", "w2", "w3g64", "w4g32", "w8a8fp8", "w4a8fp8"]


@pytest.mark.parametrize("name", DENSE_SCHEMES)
def test_dense_linear_matches_reference(name):
    from dataclasses import replace

    from vllm_mxmoe.kernels.configs import fit_block_k

    gen = torch.Generator().manual_seed(len(name))
    n, k = 48, 256  # N not a multiple of BLOCK_N
    weights = make_weights([name], n, k, gen)
    bias = torch.randn(n, generator=gen).to(DTYPE)
    weight_only = weights.schemes[0].act == "none"
    cases = [
        (1, None, None),  # the decode tile: swap-AB, split-K
        (19, GemmConfig(16, 32, 128, 4, 1, split_k=2), "kernel"),  # rows not a multiple of BLOCK_M, partials summed
        (37, GemmConfig(32, 64, 128, 4, 1, dequant=0), "kernel"),  # a plain (v1 dequant) tile
        (DEQUANT_MIN_ROWS, None, None),  # weight-only: dequantized once for a dense matmul; fp8: the kernel
    ]
    if weight_only:
        cases.append((3, None, "dequant"))
    for rows, cfg, path in cases:
        if cfg is not None:
            cfg = replace(cfg, block_k=fit_block_k(cfg.block_k, k, weights.group_sizes()))
        x = torch.randn(rows, k, generator=gen).to(DTYPE)
        ref = expert_linear(x, weights, 0)
        tol = FP8_TOL if not weight_only else WEIGHT_ONLY_TOL
        got = quantized_linear(x, weights, config=cfg, path=path)
        assert got.shape == (rows, n) and got.dtype == DTYPE
        assert rel_err(got, ref) < tol, f"{name}, {rows} rows, {path}: rel err {rel_err(got, ref):.2e}"
        with_bias = quantized_linear(x.reshape(1, rows, k), weights, bias, config=cfg, path=path)  # leading dims kept
        assert with_bias.shape == (1, rows, n)
        assert rel_err(with_bias[0], ref + bias.float()) < tol


def test_dense_linear_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(1)
    two = make_weights(["w4g128", "w4g128"], 32, 128, gen)
    with pytest.raises(ValueError, match="one block"):
        quantized_linear(torch.zeros(2, 128, dtype=DTYPE), two)
    one = make_weights(["w4g128"], 32, 128, gen)
    with pytest.raises(ValueError, match="bias"):
        quantized_linear(torch.zeros(2, 128, dtype=DTYPE), one, torch.zeros(31, dtype=DTYPE))
    with pytest.raises(ValueError, match="columns"):
        quantized_linear(torch.zeros(2, 64, dtype=DTYPE), one)
    with pytest.raises(ValueError, match="weight-only"):
        _mods["dense_linear"].dequantize_weight(make_weights(["w8a8fp8"], 32, 128, gen), DTYPE)
    assert quantized_linear(torch.zeros(0, 128, dtype=DTYPE), one).shape == (0, 32)


def test_linear_warmup_compiles_each_config_once():
    from vllm_mxmoe.kernels import warmup

    gen = torch.Generator().manual_seed(2)
    weights = make_weights(["w4g128"], 64, 256, gen)
    top = DEQUANT_MIN_ROWS + 3
    launches, _ = warmup.warm_up_linear(weights, max_tokens=top, dtype=DTYPE, has_bias=True)
    expected = warmup.linear_signature_token_counts(top, 64, 256, (128,), True, 132)
    assert launches == len(expected) > 2  # kernel tiles (and their K splits), then the dequantized weight
    assert expected[-1] == (DEQUANT_MIN_ROWS, "dequant")
    assert warmup.warm_up_linear(weights, max_tokens=top, dtype=DTYPE, has_bias=True)[0] == 0


@pytest.mark.parametrize("name", ["w4g128", "w3g128", "w8"])
def test_linear_method_runs_the_kernel_after_moving_weights(name, monkeypatch):
    """The plugin's linear method: loaded format-v1 tensors move into the kernels' layout (what it
    does on CUDA; called directly here, on CPU tensors the interpreter runs) and the forward goes
    through the mxmoe::linear op, matching the dequantizing path of an untouched layer."""
    from vllm_mxmoe.linear import MxMoELinearMethod

    monkeypatch.setenv("MXMOE_WARMUP", "0")
    scheme = parse_scheme(name)
    gen = torch.Generator().manual_seed(4)
    qw = rtn_quantize(torch.randn(80, 256, generator=gen) / 16, scheme)
    tensors = {"weight_packed": qw.packed, "weight_scale": qw.scale, "weight_zero_point": qw.zero}
    layers = []
    for _ in range(2):
        method = MxMoELinearMethod(scheme, "model.layers.0.self_attn.qkv_proj")
        layer = torch.nn.Module()
        method.create_weights(layer, 256, [48, 16, 16], 256, 80, DTYPE,
                              weight_loader=lambda param, loaded, shard=None: param.data.copy_(loaded))
        for suffix, param in layer.named_parameters():
            param.weight_loader(param, tensors[suffix], "q")
            param.weight_loader(param, tensors[suffix], "k")
            param.weight_loader(param, tensors[suffix], "v")
        method.process_weights_after_loading(layer)  # CPU: checks completeness, keeps format v1
        layers.append((method, layer))
    kernel_method, kernel_layer = layers[1]
    kernel_method._to_kernel_layout(kernel_layer, dummy=False)
    assert not hasattr(kernel_layer, "weight_packed"), "the format-v1 copy is dropped"
    x = torch.randn(5, 256, generator=gen).to(DTYPE)
    bias = torch.randn(80, generator=gen).to(DTYPE)
    ref = layers[0][0].apply(layers[0][1], x, bias)
    got = kernel_method.apply(kernel_layer, x, bias)
    assert got.shape == ref.shape == (5, 80)
    assert rel_err(got, ref) < WEIGHT_ONLY_TOL


def test_fp8_per_token_matches_reference():
    from vllm_mxmoe.kernels.reference import fake_quant_fp8_per_token

    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 200, generator=gen) * torch.tensor([1e-3, 1.0, 30.0, 1e3, 1.0])[:, None]).to(DTYPE)
    q, scale = quantize_fp8_per_token(x)
    assert torch.equal(q.float() * scale[:, None], fake_quant_fp8_per_token(x))


@pytest.mark.parametrize("inter", [96, 4096])  # one block per row (quantized from registers), and two
def test_silu_and_mul_fp8_copy_matches_reference(inter):
    """The fp8 copy is the per-token quantization of the rounded act, whether or not act is stored,
    with split-K partials summed first; rows of other ranks' experts are left alone."""
    from vllm_mxmoe.kernels.act_quant import silu_and_mul
    from vllm_mxmoe.kernels.reference import fake_quant_fp8_per_token, silu_mul

    gen = torch.Generator().manual_seed(4)
    partials = (torch.randn(2, 6, 2 * inter, generator=gen) * 3).to(DTYPE)
    slot_expert = torch.tensor([0, 1, -1, 2, 0, 1], dtype=torch.int32)
    summed = partials.float().sum(0)
    want_act = silu_mul(summed).to(DTYPE)
    want_fp8 = fake_quant_fp8_per_token(want_act)
    live = slot_expert >= 0
    for store_act in (True, False):
        act, (q, scale) = silu_and_mul(partials, slot_expert, DTYPE, quantize_fp8=True, store_act=store_act)
        got = q.float() * scale[:, None]
        assert torch.equal(got[live], want_fp8[live]), f"store_act={store_act}"
        if store_act:
            assert torch.equal(act[live], want_act[live])


@pytest.mark.parametrize(
    "cfg",
    [
        GemmConfig(16, 32, 128, 4, 1, dequant=3, swap_ab=True),  # decode tile
        GemmConfig(32, 64, 128, 4, 1, dequant=1, swap_ab=True),
        GemmConfig(64, 64, 64, 4, 1, dequant=0),  # prefill orientation, v1 dequant
        GemmConfig(16, 32, 128, 4, 1, dequant=1, swap_ab=True, k_unroll=2),
    ],
)
def test_gated_gemm_equals_silu_and_mul_of_the_gate_up_gemm(cfg):
    """GEMM1 with silu(gate) * up in its epilogue writes what the separate SiLU kernel makes of the ungated
    output, bit for bit: inter (40) not a multiple of the half tile, an expert without tokens, an fp8-activation
    expert, slots of another rank's experts left unwritten."""
    from vllm_mxmoe.kernels.act_quant import silu_and_mul

    gen = torch.Generator().manual_seed(cfg.block_m + cfg.block_n + cfg.k_unroll)
    inter, k, topk, tokens = 40, 384, 2, 13
    schemes = ["w4g128", "w3g128", "w2g128", "w8", "w8a8fp8", "w4"]
    weights = make_weights(schemes, 2 * inter, k, gen)
    expert_map = torch.tensor([0, 1, 2, -1, 3, 4, 5], dtype=torch.int32)
    ids, _ = make_routing(tokens, topk, len(expert_map), gen, skip=(1,))
    x = torch.randn(tokens, k, generator=gen).to(DTYPE)
    routing = align_routing(ids, len(schemes), cfg.block_m, expert_map)
    x_fp8 = quantize_fp8_per_token(x)
    gate_up = grouped_gemm(x, weights, routing, cfg, a_row_div=topk, a_fp8=x_fp8)
    want, _ = silu_and_mul(gate_up, routing.slot_expert, DTYPE, quantize_fp8=False)
    out = torch.full((1, tokens * topk, inter), float("nan"), dtype=DTYPE)
    grouped_gemm(x, weights, routing, cfg, a_row_div=topk, a_fp8=x_fp8, out=out, gated=True)
    live = routing.slot_expert >= 0
    assert (~live).any() and live.any()
    assert torch.equal(out[0][live], want[live])
    assert out[0][~live].isnan().all(), "rows of other ranks' experts must stay unwritten"


def test_gated_gemm_rejects_split_k():
    gen = torch.Generator().manual_seed(9)
    weights = make_weights(["w4g128", "w8"], 64, 256, gen)
    ids, _ = make_routing(3, 1, 2, gen)
    cfg = GemmConfig(16, 32, 128, 4, 1, split_k=2)
    with pytest.raises(ValueError, match="gated needs split_k=1"):
        grouped_gemm(torch.randn(3, 256).to(DTYPE), weights, align_routing(ids, 2, 16), cfg, gated=True)


@pytest.mark.parametrize("tokens", [5, 40])
def test_fused_moe_same_output_with_and_without_fused_silu(tokens):
    gen = torch.Generator().manual_seed(tokens)
    w13 = make_weights(["w4g128", "w3g128", "w2g128", "w8"], 256, 128, gen)
    w2 = make_weights(["w3g128", "w4g128", "w8", "w2g128"], 128, 128, gen)
    ids, topk_weights = make_routing(tokens, 2, 4, gen)
    x = torch.randn(tokens, 128, generator=gen).to(DTYPE)
    fused = mxmoe_fused_experts(x, w13, w2, topk_weights, ids, fuse_silu=True)
    separate = mxmoe_fused_experts(x, w13, w2, topk_weights, ids, fuse_silu=False)
    assert torch.equal(fused, separate)


# ---------------------------------------------------------------------------
# The fused layer


def _run_layer(tokens, topk, schemes13, schemes2, hidden, inter, seed, expert_map=None, configs=None, skip=()):
    gen = torch.Generator().manual_seed(seed)
    w13 = make_weights(schemes13, 2 * inter, hidden, gen)
    w2 = make_weights(schemes2, hidden, inter, gen)
    num_global = len(expert_map) if expert_map is not None else len(schemes13)
    ids, topk_weights = make_routing(tokens, topk, num_global, gen, skip=skip)
    x = torch.randn(tokens, hidden, generator=gen).to(DTYPE)
    out = torch.full((tokens, hidden), float("nan"), dtype=DTYPE)
    mxmoe_fused_experts(x, w13, w2, topk_weights, ids, expert_map, configs=configs, out=out)
    ref = reference_fused_experts(x, w13, w2, topk_weights, ids, expert_map)
    assert not out.isnan().any(), "every output element must be written"
    err = rel_err(out, ref)
    print(f"rel err {err:.2e}")
    return err


def test_fused_moe_one_token():
    err = _run_layer(1, 2, ["w4g128", "w3g64", "w2", "w8"], ["w8", "w2g64", "w4g128_sym", "w3"], 128, 128, seed=1)
    assert err < WEIGHT_ONLY_TOL, err


def test_fused_moe_all_schemes_split_k():
    # 13 tokens (not a tile multiple); experts 2 and 5 get no tokens; every scheme in both GEMMs.
    s13 = ["w2g128", "w3g128", "w4g128", "w8", "w4g128_sym", "w8a8fp8", "w4a8fp8", "w3_sym"]
    s2 = ["w8a8fp8", "w4a8fp8", "w8g128", "w2", "w3g128", "w4g128", "w8_sym", "w2g128"]
    configs = (GemmConfig(16, 64, 64, 4, 1, split_k=2), GemmConfig(16, 64, 64, 4, 1, split_k=2))
    err = _run_layer(13, 3, s13, s2, 128, 128, seed=2, configs=configs, skip=(2, 5))
    assert err < FP8_TOL, err


def test_fused_moe_expert_map_and_table_config():
    # 8 global experts, 4 local to this rank; the rest contribute 0. Tile config from the table.
    expert_map = torch.tensor([-1, 0, -1, 1, 2, -1, 3, -1], dtype=torch.int32)
    err = _run_layer(9, 2, ["w4g128", "w8a8fp8", "w2g64", "w3"], ["w3g64", "w4g128", "w8", "w4a8fp8"],
                     128, 128, seed=3, expert_map=expert_map)
    assert err < FP8_TOL, err


def test_fused_moe_table_takes_the_32_row_decode_tile():
    # 40 tokens x 2 slots over 4 experts: 20 rows each, the table's 32-row swap-AB tile (asm dequant on a GPU).
    from vllm_mxmoe.kernels.fused_moe import select_configs

    gen = torch.Generator().manual_seed(6)
    w13 = make_weights(["w4g128", "w3g128", "w2g128", "w8"], 256, 128, gen)
    w2 = make_weights(["w3g128", "w4g128", "w8", "w2g128"], 128, 128, gen)
    cfg1, cfg2 = select_configs(40, 2, w13, w2)
    assert (cfg1.block_m, cfg1.swap_ab, cfg2.block_m, cfg2.swap_ab) == (32, True, 32, True)
    err = _run_layer(40, 2, ["w4g128", "w3g128", "w2g128", "w8"], ["w3g128", "w4g128", "w8", "w2g128"], 128, 128,
                     seed=6)
    assert err < WEIGHT_ONLY_TOL, err


def test_layer_gemm_keys_share_the_3bit_fact():
    """Both GEMMs of a layer must pick one BLOCK_M: a 3-bit block in either GEMM moves both to the 32-row tile at
    48-128 rows per expert; a layer without one keeps the 64-row tile."""
    from vllm_mxmoe.kernels.fused_moe import layer_gemm_keys, select_configs

    gen = torch.Generator().manual_seed(7)
    w13_w4 = make_weights(["w4g128"] * 4, 256, 128, gen)
    w2_mixed = make_weights(["w4g128", "w3g128", "w4g128", "w4g128"], 128, 128, gen)
    w2_w4 = make_weights(["w4g128"] * 4, 128, 128, gen)
    k1, k2 = layer_gemm_keys(w13_w4, w2_mixed)
    assert k1.low_bit_layer and k2.low_bit_layer and k1.int4_only and not k2.int4_only
    cfgs = select_configs(160, 2, w13_w4, w2_mixed)  # 80 rows per expert
    assert [(c.block_m, c.swap_ab) for c in cfgs] == [(32, True), (32, True)]
    assert [c.block_m for c in select_configs(160, 2, w13_w4, w2_w4)] == [64, 64]
    assert [c.block_m for c in select_configs(40, 2, w13_w4, w2_w4)] == [32, 32]  # 20 rows: any layer


def test_fused_moe_low_bit_layer_on_the_wide_32_row_tile():
    # 70 rows per expert on a layer with 3-bit blocks (and 8-bit and fp8 ones): three 32-row tiles per expert,
    # the last one partly padding.
    from vllm_mxmoe.kernels.fused_moe import select_configs

    s13, s2 = ["w3g128", "w4g128", "w2g128", "w8a8fp8"], ["w4g128", "w3g128", "w8", "w2g128"]
    gen = torch.Generator().manual_seed(8)
    cfg1, _ = select_configs(140, 2, make_weights(s13, 256, 128, gen), make_weights(s2, 128, 128, gen))
    assert (cfg1.block_m, cfg1.swap_ab) == (32, True)
    err = _run_layer(140, 2, s13, s2, 128, 128, seed=8)
    assert err < FP8_TOL, err


def test_fused_moe_block_m_32():
    configs = (GemmConfig(32, 32, 128, 4, 1), GemmConfig(32, 64, 32, 4, 1))
    err = _run_layer(21, 2, ["w4g128", "w8", "w2g128"], ["w4g64", "w3g32", "w8"], 128, 64, seed=4, configs=configs)
    assert err < WEIGHT_ONLY_TOL, err


def test_zero_tokens_returns_empty():
    gen = torch.Generator().manual_seed(5)
    w13 = make_weights(["w4g128", "w8"], 256, 128, gen)
    w2 = make_weights(["w4g128", "w8"], 128, 128, gen)
    x = torch.empty(0, 128, dtype=DTYPE)
    out = mxmoe_fused_experts(x, w13, w2, torch.empty(0, 2), torch.empty(0, 2, dtype=torch.int32))
    assert out.shape == (0, 128)


def test_dummy_weights_are_finite_and_zero_mean():
    """Speed runs with load_format="dummy": every scheme's dequantized weights must be finite and
    centred on zero like vLLM's own dummy weights, or hidden states drift and routing collapses (the old
    fill, positive scales and a zero point of 1, gave 4-bit weights a mean of 1.3 standard deviations)."""
    from vllm_mxmoe.kernels.layout import make_dummy_weights_sane

    names = ["w4g128", "w3g128", "w2g128", "w8", "w8a8fp8", "w4g128_sym", "w2", "w4a8fp8"]
    weights = ExpertGemmWeights.allocate([parse_scheme(n) for n in names], 128, 512)
    weights.qweight.fill_(-1)  # all-ones bits: NaN fp8 bytes, the largest codes
    torch.manual_seed(0)
    make_dummy_weights_sane(weights)
    for e, name in enumerate(names):
        w = weights.dequantize_expert(e)
        assert torch.isfinite(w).all(), name
        assert w.abs().max() <= 1.01e-3, name
        assert abs(w.mean().item()) < 0.25 * w.std().item(), f"{name}: mean {w.mean().item():.2e}, std {w.std().item():.2e}"


# ---------------------------------------------------------------------------
# Config selection (host only)


def test_default_dequant_takes_the_asm_for_64_row_tiles_of_3bit_layers(monkeypatch):
    from vllm_mxmoe.kernels.configs import DEQUANT_ASM, DEQUANT_V1, default_dequant

    monkeypatch.delenv("MXMOE_DEQUANT", raising=False)
    assert default_dequant(16) == DEQUANT_ASM
    assert default_dequant(32) == DEQUANT_ASM  # the 32-row decode tile
    assert default_dequant(64) == DEQUANT_V1  # layers without 3-bit fragment blocks
    assert default_dequant(64, low_bit=True) == DEQUANT_ASM
    assert default_dequant(128, low_bit=True) == DEQUANT_V1
    monkeypatch.setenv("MXMOE_DEQUANT", "0")
    assert default_dequant(16, low_bit=True) == DEQUANT_V1


def test_config_selection():
    from vllm_mxmoe.kernels.configs import fit_block_k, select_gemm_config

    assert fit_block_k(128, 1408, [128, 1408]) == 128
    assert fit_block_k(128, 2048, [32, 128]) == 32
    assert fit_block_k(64, 96 * 4, [96]) == 32  # a group of 96 only fits 32-wide K tiles
    # Decode: small BLOCK_M, K split so that enough programs stream weights; never more splits than K tiles.
    decode = select_gemm_config(1, 8, 128, 1536, 2048, [128])
    assert decode.block_m == 16 and 1 < decode.split_k <= 2048 // decode.block_k
    # 14-48 rows per expert (DeepSeek-V2-Lite at 256 tokens: 24) take the 32-row swap-AB tile, with the asm
    # dequant; 12 rows (DeepSeek at 128 tokens) keep 16 rows, and so do the tiles of fewer rows.
    assert (select_gemm_config(256, 6, 64, 2816, 2048, [128]).block_m,
            select_gemm_config(128, 6, 64, 2816, 2048, [128]).block_m) == (32, 16)
    assert select_gemm_config(256, 6, 64, 2816, 2048, [128]).swap_ab
    # Layers holding 3-bit blocks keep it, unsplit, up to 128 rows (Mixtral at 512 tokens: 128; its down has 112 K
    # tiles); others take the 64-row tile there; past 128 rows both take the prefill tiles.
    wide = select_gemm_config(512, 2, 8, 4096, 14336, [128], sms=132, low_bit_layer=True)
    assert (wide.block_m, wide.swap_ab, wide.split_k) == (32, True, 1)
    assert select_gemm_config(512, 2, 8, 4096, 14336, [128], sms=132).block_m == 64
    assert select_gemm_config(1024, 2, 8, 4096, 14336, [128], sms=132, low_bit_layer=True).block_m == 128
    assert select_gemm_config(1, 8, 128, 2048, 256, [128]).split_k <= 256 // 128
    # ... and never into programs of fewer than MOE_MIN_K_STEPS_PER_SPLIT K tiles on average (qwen3's down: 6
    # tiles, unsplit; its gate_up: 16 tiles, 2 ways; DeepSeek's down: 11 tiles, 2 ways).
    assert select_gemm_config(1, 8, 128, 2048, 768, [128]).split_k == 1
    assert select_gemm_config(1, 8, 128, 1536, 2048, [128], sms=132).split_k == 2
    assert select_gemm_config(1, 6, 64, 2048, 1408, [128], sms=132).split_k == 2
    # Few huge experts (Mixtral-8x7b gate_up at 1 token: 2 x 448 programs) are split anyway.
    assert select_gemm_config(1, 2, 8, 28672, 4096, [128], sms=132).split_k == 2
    # Mixed layers aim at fewer programs per SM than all-fp8 ones: DeepSeek's down (11 K tiles) at 16 tokens.
    assert select_gemm_config(16, 6, 64, 2048, 1408, [128], sms=132).split_k == 1
    assert select_gemm_config(16, 6, 64, 2048, 1408, [1408], sms=132, fp8_only=True).split_k == 2
    # Prefill: big tiles, no split.
    prefill = select_gemm_config(8192, 8, 128, 1536, 2048, [128])
    assert prefill.block_m == 128 and prefill.split_k == 1
    # An all-fp8 GEMM takes the wide fp8 tile in prefill only, with the same BLOCK_M as its partner GEMM.
    fp8 = select_gemm_config(8192, 8, 128, 1536, 2048, [2048], fp8_only=True)
    assert fp8.block_n > prefill.block_n and fp8.block_m == prefill.block_m
    assert select_gemm_config(16, 8, 128, 1536, 2048, [2048], fp8_only=True) == select_gemm_config(
        16, 8, 128, 1536, 2048, [2048])
    # All-4-bit decode GEMMs with >= 16 K tiles per program take two tiles per loop iteration (qwen3's
    # gate_up at 16 tokens); short K (its down: 6 tiles), prefill and other schemes keep one.
    unrolled = select_gemm_config(16, 8, 128, 1536, 2048, [128], sms=132, int4_only=True)
    assert (unrolled.k_unroll, unrolled.num_stages) == (2, 3)
    assert select_gemm_config(16, 8, 128, 1536, 2048, [128], sms=132).k_unroll == 1
    assert select_gemm_config(16, 8, 128, 2048, 768, [128], sms=132, int4_only=True).k_unroll == 1
    assert select_gemm_config(8192, 8, 128, 1536, 2048, [128], int4_only=True).k_unroll == 1
    # All-4-bit GEMMs aim at fewer programs per SM, so their programs stay long enough for that loop:
    # Mixtral-8x7b runs gate_up unsplit (32 tiles, unrolled), and its down (112 K tiles) splits into programs
    # of at most INT4_MAX_K_TILES_PER_PROGRAM tiles, 4 ways at any decode token count, not the count rule's
    # 5 at 1 token or 2 at 4-16 tokens; a mixed layer's down keeps the count rule (8 ways at 1 token).
    for tokens in (1, 2, 4, 16):
        mixtral_gate_up = select_gemm_config(tokens, 2, 8, 28672, 4096, [128], sms=132, int4_only=True)
        assert (mixtral_gate_up.split_k, mixtral_gate_up.k_unroll) == (1, 2), tokens
        mixtral_down = select_gemm_config(tokens, 2, 8, 4096, 14336, [128], sms=132, int4_only=True)
        assert (mixtral_down.split_k, mixtral_down.k_unroll) == (4, 2), tokens
    assert select_gemm_config(1, 2, 8, 4096, 14336, [128], sms=132).split_k == 8


# ---------------------------------------------------------------------------
# Compile warm-up (kernels/warmup.py)


def test_warmup_signatures_cover_every_token_count():
    from vllm_mxmoe.kernels import warmup
    from vllm_mxmoe.kernels.configs import GemmKey, select_gemm_config

    g1 = GemmKey(1536, 2048, (128,), fp8_only=False, int4_only=True)  # gate_up w4g128
    g2 = GemmKey(2048, 768, (128,), fp8_only=True, int4_only=False)  # down w8a8fp8
    sigs = warmup.signature_token_counts(4096, 8, 128, g1, g2, 132)
    first = {sig: t for t, sig in sigs}
    assert len(first) == len(sigs) and 2 < len(sigs) < 64, len(sigs)
    for t in (1, 2, 3, 7, 16, 17, 100, 511, 512, 513, 2049, 4096):
        cfg1 = select_gemm_config(t, 8, 128, *g1[:2], list(g1[2]), sms=132, int4_only=True)
        cfg2 = select_gemm_config(t, 8, 128, *g2[:2], list(g2[2]), sms=132, fp8_only=True)
        sig = (cfg1, cfg2, warmup._align_variant(t * 8, 128, cfg1.block_m))
        assert sig in first and first[sig] <= t  # warmed at the smallest count that launches it


def test_warmup_runs_each_signature_once():
    from vllm_mxmoe.kernels import warmup
    from vllm_mxmoe.kernels.configs import GemmKey

    gen = torch.Generator().manual_seed(6)
    w13 = make_weights(["w4g128", "w2g64", "w8"], 256, 128, gen)
    w2 = make_weights(["w3g64", "w4g128", "w8"], 128, 128, gen)
    launches, _ = warmup.warm_up_layer(w13, w2, topk=2, max_tokens=24, dtype=DTYPE)
    g1, g2 = GemmKey(256, 128, (64, 128)), GemmKey(128, 128, (64, 128))
    expected = len(warmup.signature_token_counts(24, 2, 3, g1, g2, 132))
    assert launches == expected > 1
    assert warmup.warm_up_layer(w13, w2, topk=2, max_tokens=24, dtype=DTYPE)[0] == 0  # already compiled


# ---------------------------------------------------------------------------
# The measured perf table (benchmarks/kernel_check.py --parts table) and its loader


def _perf_table_path():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "perf_table_h200.json"


def test_perf_table_format_loads(tmp_path):
    """kernel_check's table format (extra keys included) is what offline/perf_model.py reads."""
    import json

    from offline.perf_model import PerfModel

    table = dict(device="NVIDIA H200", source="benchmarks/kernel_check.py --parts table", date="2026-11-29",
                 default_dequant=2, experts_per_launch=64,
                 entries=[dict(scheme=s, n=1536, k=2048, tokens=t, us=us * (1 + t / 64))
                          for s, us in (("w4g128", 2.0), ("w2g128", 1.5)) for t in (1, 4, 16, 64, 256)])
    path = tmp_path / "perf_table_h200.json"
    path.write_text(json.dumps(table))
    model = PerfModel.from_json(path)
    assert {"w4g128", "w2g128"} <= set(model.measured_schemes)
    assert model.time_us("w2g128", 1536, 2048, 16) < model.time_us("w4g128", 1536, 2048, 16)
    assert model.time_us("w4g128", 1536, 2048, 8) <= model.time_us("w4g128", 1536, 2048, 32)


def test_shipped_perf_table_loads():
    from offline.perf_model import PerfModel

    path = _perf_table_path()
    if not path.exists():
        pytest.skip("no measured table shipped yet")
    model = PerfModel.from_json(path)
    for scheme in model.measured_schemes:
        times = [model.time_us(scheme, 1536, 2048, t) for t in (1, 2, 8, 32, 128)]
        assert all(t > 0 for t in times) and times == sorted(times), (scheme, times)


# ---------------------------------------------------------------------------
# csrc/ CUDA extension: optional; on the CPU it is never built and never used


def test_csrc_ext_unbuilt_is_inert():
    from vllm_mxmoe.kernels import csrc_ext

    gen = torch.Generator().manual_seed(9)
    w = make_weights(["w4g128", "w4g128_sym"], 64, 128, gen)
    x = torch.randn(3, 128, generator=gen).to(DTYPE)
    assert csrc_ext.CSRC_DIR.joinpath("w4_gemv.cu").exists()
    if csrc_ext._ext is None:
        assert not csrc_ext.supports(w, x, 16)
        assert not csrc_ext.enabled()
    # use_csrc=True without a build falls back to the Triton kernels
    err = _run_layer(1, 2, ["w4g128", "w4g128_sym", "w4", "w4g128"], ["w4", "w4g128", "w4g128_sym", "w4g128"],
                     128, 128, seed=6)
    assert err < WEIGHT_ONLY_TOL, err


def test_csrc_fragment_indexing_matches_layout():
    """csrc/w4_gemv.cu reads a fragment-ordered 4-bit block as: 32-element lane chunk c, word w, nibbles f and
    f + 4 hold elements (c // 4) * 128 + 2 (c % 4) + 8 f + 32 w and the one after it. The packing is
    layout._fragment_slots; if it changes, the CUDA kernel must change with it."""
    k = 384
    codes = torch.randint(0, 16, (5, k), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    v1 = pack(codes, 4)  # format v1: element 8j + i of a row in nibble i of word j
    frag = to_kernel_order(parse_scheme("w4g128"), v1)
    assert not torch.equal(frag, v1)
    for c in range(k // 32):
        for w in range(4):
            word = frag[:, 4 * c + w]
            for f in range(4):
                k0 = (c // 4) * 128 + 2 * (c % 4) + 8 * f + 32 * w
                assert torch.equal((word >> (4 * f)) & 15, codes[:, k0]), (c, w, f)
                assert torch.equal((word >> (4 * f + 16)) & 15, codes[:, k0 + 1]), (c, w, f)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_csrc_kernel_compiles_without_spills(tmp_path):
    """The CUDA source builds for sm_90 (the extension itself needs a CUDA torch, so only the kernel file),
    and ptxas keeps every variant in registers (the launch bounds cap them at 128)."""
    from vllm_mxmoe.kernels import csrc_ext

    cmd = ["nvcc", "-c", "-O3", "-std=c++17", "-arch=sm_90", "-Xptxas", "-v",
           str(csrc_ext.CSRC_DIR / "w4_gemv.cu"), "-o", str(tmp_path / "w4_gemv.o")]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    reports = [line for line in run.stderr.splitlines() if "spill" in line]
    assert reports and all("0 bytes spill stores, 0 bytes spill loads" in line for line in reports), reports


# The GPU check of csrc/ against the torch reference is benchmarks/kernel_check.py's 'csrc' mode
# (this module forces the Triton interpreter, so it cannot run compiled kernels).
