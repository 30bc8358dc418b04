"""RTN grids and GPTQ: consistency with format v1, accuracy, degenerate statistics."""

import pytest
import torch

from offline.gptq import (
    HessianAccumulator,
    gptq_fake_quantize,
    gptq_quantize,
    refine_codes,
    refit_scales,
    run_gptq,
    run_gptq_batch,
)
from offline.quant_grid import (
    MIN_SCALE,
    fake_quantize,
    fit_grid,
    fit_grid_mse,
    quantize_dequantize,
    quantize_rtn,
)
from vllm_mxmoe.format import dequantize, tensor_specs
from vllm_mxmoe.schemes import KNOWN_SCHEMES, parse_scheme

N, K = 64, 256


@pytest.fixture(autouse=True)
def single_thread():
    """GPTQ on these tiny matrices is ~256 small ops per call; on a shared 2-core
    machine thread hand-offs cost more than the math (3x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def correlated_inputs(num: int, seed: int) -> torch.Tensor:
    """Inputs with correlated channels of very different scales (LLM-like outlier channels)."""
    gen = torch.Generator().manual_seed(1234)  # one distribution for every draw
    mix = torch.randn(K, K, generator=gen) / K**0.5 + 0.3 * torch.eye(K)
    channel_scale = torch.exp(torch.randn(K, generator=gen))
    draw = torch.Generator().manual_seed(seed)
    return (torch.randn(num, K, generator=draw) @ mix) * channel_scale


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    weight = torch.randn(N, K)
    acc = HessianAccumulator(K)
    for batch in correlated_inputs(2048, seed=1).split(512):
        acc.add(batch.reshape(4, 128, K))  # leading dims are samples too
    held_out = correlated_inputs(2048, seed=2)
    return weight, acc.finalize(), held_out


def output_error(weight, quantized, x):
    ref = x @ weight.T
    return float((x @ quantized.T - ref).norm() / ref.norm())


# ---------------------------------------------------------------------------
# RTN grid


@pytest.mark.parametrize("name", KNOWN_SCHEMES)
def test_rtn_grid_matches_format(name):
    scheme = parse_scheme(name)
    torch.manual_seed(0)
    w = torch.randn(N, K) * torch.linspace(0.01, 3.0, K)
    scale, zero = fit_grid(w, scheme)
    groups = scheme.num_groups(K)
    assert scale.shape == (N, groups) and scale.dtype == torch.float16
    assert (zero is None) == scheme.symmetric
    if zero is not None:
        assert zero.shape == (N, groups) and zero.dtype == torch.float16
        assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= scheme.qmax
    qw = quantize_rtn(w, scheme)
    for key, (shape, dtype) in tensor_specs(scheme, N, K).items():
        assert tuple(qw.tensors()[key].shape) == shape and qw.tensors()[key].dtype == dtype, key
    # Min/max grid: no clipping beyond fp16 rounding of the scale, error <= half a step.
    err = (dequantize(qw, K) - w).abs()
    step = scale.float().repeat_interleave(scheme.group(K), dim=1)
    if scheme.weight_is_fp8:
        assert (err <= w.abs() * 2**-4 + step * 2**-10).all()  # e4m3: 3 mantissa bits, subnormals below 2^-6
    else:
        assert (err <= 0.5 * step * 1.01 + 1e-6).all()
    assert torch.equal(fake_quantize(w, scheme), dequantize(qw, K))


@pytest.mark.parametrize("name", KNOWN_SCHEMES)
def test_rtn_all_zero_rows_and_groups_are_finite(name):
    scheme = parse_scheme(name)
    w = torch.randn(N, K)
    w[:8] = 0.0  # whole rows
    w[8:16, :128] = 0.0  # single groups
    scale, _ = fit_grid(w, scheme)
    assert torch.isfinite(scale).all() and (scale.float() >= MIN_SCALE).all()
    fq = fake_quantize(w, scheme)
    assert torch.isfinite(fq).all()
    assert torch.equal(fq[:8], torch.zeros(8, K))
    if scheme.group(K) == 128:
        assert torch.equal(fq[8:16, :128], torch.zeros(8, 128))


def test_rtn_rejects_bad_weights():
    scheme = parse_scheme("w4g128")
    w = torch.randn(4, K)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit_grid(w, scheme)
    with pytest.raises(ValueError, match="group size"):
        fit_grid(torch.randn(4, 96), scheme)


# ---------------------------------------------------------------------------
# Hessian


def test_hessian_accumulator_matches_definition():
    x = torch.randn(3, 50, 32)
    acc = HessianAccumulator(32)
    acc.add(x[0])
    acc.add(x[1:])
    flat = x.reshape(-1, 32).double()
    assert acc.num_samples == 150
    assert torch.allclose(acc.finalize(), 2 * flat.T @ flat / 150, rtol=1e-5, atol=1e-5)  # float32 products
    empty = HessianAccumulator(32).finalize()
    assert empty.shape == (32, 32) and not empty.any()
    with pytest.raises(ValueError, match="32"):
        acc.add(torch.randn(4, 16))


# ---------------------------------------------------------------------------
# GPTQ accuracy


@pytest.mark.parametrize("name", ["w4g128", "w3g128", "w2g128", "w8", "w4", "w2", "w8a8fp8"])
def test_gptq_beats_rtn_on_held_out_inputs(layer, name):
    weight, hessian, x = layer
    scheme = parse_scheme(name)
    rtn = output_error(weight, fake_quantize(weight, scheme), x)
    gptq = output_error(weight, gptq_fake_quantize(weight, hessian, scheme), x)
    assert gptq < 0.8 * rtn, (gptq, rtn)


@pytest.mark.parametrize("name", ["w4g128", "w3g128", "w2g128", "w4"])
def test_gptq_natural_order_static_groups_beats_rtn(layer, name):
    weight, hessian, x = layer
    scheme = parse_scheme(name)
    rtn = output_error(weight, fake_quantize(weight, scheme), x)
    natural = output_error(weight, gptq_fake_quantize(weight, hessian, scheme, act_order=False), x)
    act_order = output_error(weight, gptq_fake_quantize(weight, hessian, scheme), x)
    assert natural < 0.95 * rtn
    assert act_order < natural  # act-order is the better default on outlier-heavy inputs


@pytest.mark.parametrize("name", ["w4g128", "w3g128"])
def test_gptq_dynamic_groups_beat_rtn(layer, name):
    weight, hessian, x = layer
    scheme = parse_scheme(name)
    result = run_gptq(weight, hessian, scheme, act_order=False, static_groups=False)
    # Dynamic grids are fitted on updated columns, so they differ from the RTN grid.
    assert not torch.equal(result.scale, fit_grid(weight, scheme)[0])
    assert output_error(weight, result.fake_quantized, x) < 0.95 * output_error(
        weight, fake_quantize(weight, scheme), x
    )
    assert torch.equal(dequantize(result.to_quantized_weight(), K), result.fake_quantized)


def test_act_order_requires_static_groups(layer):
    weight, hessian, _ = layer
    with pytest.raises(ValueError, match="g_idx"):
        run_gptq(weight, hessian, parse_scheme("w4g128"), act_order=True, static_groups=False)


def test_lazy_blocks_equal_column_by_column_gptq(layer):
    """Blocked lazy updates are an exact reordering of the sequential OBS updates."""
    weight, hessian, _ = layer
    scheme = parse_scheme("w3g128")
    blocked = gptq_fake_quantize(weight, hessian, scheme, block_size=128)
    sequential = gptq_fake_quantize(weight, hessian, scheme, block_size=1)
    reference = reference_gptq(weight, hessian, scheme)
    for other in (sequential, reference):
        mismatch = (blocked != other).float().mean().item()
        assert mismatch < 0.01, mismatch  # only float round-off at rounding ties may differ


def reference_gptq(weight, hessian, scheme, percdamp=0.01):
    """Textbook GPTQ/OBS: explicit inverse Hessian, downdated after each column (act-order, static grid)."""
    h = hessian.double().clone()
    order = torch.argsort(h.diagonal(), descending=True)
    h = h[order][:, order]
    h += percdamp * h.diagonal().mean() * torch.eye(K, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    scale, zero = fit_grid(weight, scheme)
    w = weight.double()[:, order].clone()
    out = torch.zeros_like(w)
    for i in range(K):
        g = int(order[i]) // scheme.group(K)
        s, z = scale[:, g].double(), zero[:, g].double()
        q = (torch.round(w[:, i] / s) + z).clamp(0, scheme.qmax)
        out[:, i] = (q - z) * s
        err = (w[:, i] - out[:, i]) / hinv[i, i]
        w[:, i:] -= err.unsqueeze(1) * hinv[i, i:].unsqueeze(0)
        hinv -= torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return out[:, torch.argsort(order)].float()


# ---------------------------------------------------------------------------
# Format round trip, every scheme


@pytest.mark.parametrize("name", KNOWN_SCHEMES)
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_result_round_trips_exactly(layer, name, act_order):
    weight, hessian, _ = layer
    scheme = parse_scheme(name)
    result = run_gptq(weight.half(), hessian, scheme, act_order=act_order)  # any float dtype in
    qw = result.to_quantized_weight()
    assert torch.isfinite(result.fake_quantized).all() and not result.used_rtn
    assert torch.equal(dequantize(qw, K), result.fake_quantized)
    assert torch.equal(
        dequantize(gptq_quantize(weight.half(), hessian, scheme, act_order=act_order), K),
        result.fake_quantized,
    )
    for key, (shape, dtype) in tensor_specs(scheme, N, K).items():
        assert tuple(qw.tensors()[key].shape) == shape and qw.tensors()[key].dtype == dtype, key


# ---------------------------------------------------------------------------
# Degenerate calibration statistics


@pytest.mark.parametrize("name", KNOWN_SCHEMES)
def test_expert_without_calibration_tokens_gets_rtn(name):
    scheme = parse_scheme(name)
    weight = torch.randn(N, K)
    result = run_gptq(weight, HessianAccumulator(K).finalize(), scheme)
    assert result.used_rtn
    assert torch.isfinite(result.fake_quantized).all() and torch.isfinite(result.scale).all()
    assert torch.equal(result.fake_quantized, fake_quantize(weight, scheme))
    assert torch.equal(dequantize(result.to_quantized_weight(), K), result.fake_quantized)


def test_dead_inputs_are_rounded_not_zeroed(layer):
    weight, _, _ = layer
    x = correlated_inputs(512, seed=3)
    dead = torch.tensor([0, 5, 130, 255])
    x[:, dead] = 0.0
    acc = HessianAccumulator(K)
    acc.add(x)
    scheme = parse_scheme("w4g128")
    result = run_gptq(weight, acc.finalize(), scheme)
    assert torch.isfinite(result.fake_quantized).all() and not result.used_rtn
    # A dead column gets no error feedback: it is the RTN value of the original weight.
    assert torch.equal(result.fake_quantized[:, dead], fake_quantize(weight, scheme)[:, dead])
    assert result.fake_quantized[:, dead].abs().sum() > 0


def test_few_samples_and_rank_deficient_hessian_stay_finite():
    weight = torch.randn(N, K)
    acc = HessianAccumulator(K)
    acc.add(torch.randn(3, K))  # rank 3 of 256: only dampening makes it invertible
    for name in ("w2g128", "w8a8fp8"):
        result = run_gptq(weight, acc.finalize(), parse_scheme(name))
        assert torch.isfinite(result.fake_quantized).all() and not result.used_rtn


def test_nan_hessian_is_an_error():
    hessian = torch.eye(K)
    hessian[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        run_gptq(torch.randn(N, K), hessian, parse_scheme("w4g128"))


# ---------------------------------------------------------------------------
# MSE clipping search


def grid_error(w, scale, zero, scheme, importance=None):
    """Per-group weighted rounding error of a grid, computed from the stored tensors."""
    n, k = w.shape
    g = scheme.group(k)
    fq = quantize_dequantize(
        w,
        scale.repeat_interleave(g, dim=1),
        None if zero is None else zero.repeat_interleave(g, dim=1),
        scheme,
    )
    imp = torch.ones(k) if importance is None else importance
    return ((fq - w).pow(2) * imp).reshape(n, k // g, g).sum(-1)


@pytest.mark.parametrize("name", ["w2g128", "w3g128", "w4g128", "w3", "w4g128_sym", "w2g64"])
def test_mse_grid_never_worse_and_better_on_heavy_tails(name):
    scheme = parse_scheme(name)
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((N, K))  # heavy tails: clipping pays
    importance = torch.rand(K) + 0.1
    for imp in (None, importance):
        minmax = grid_error(w, *fit_grid(w, scheme), scheme, imp)
        scale, zero = fit_grid_mse(w, scheme, imp)
        assert scale.dtype == torch.float16 and (scale > 0).all()
        if zero is not None:
            assert zero.dtype == torch.float16 and zero.min() >= 0 and zero.max() <= scheme.qmax
        mse = grid_error(w, scale, zero, scheme, imp)
        assert (mse <= minmax * (1 + 1e-6)).all()  # p = 1 is among the candidates
        assert mse.sum() < 0.95 * minmax.sum()
    # the stored grid round-trips through the format exactly
    qw = quantize_rtn(w, scheme)
    assert torch.equal(dequantize(qw, K), fake_quantize(w, scheme))


@pytest.mark.parametrize("name", ["w3g128", "w2g128"])
def test_gptq_with_mse_clipping(layer, name):
    """clip="mse": a valid checkpoint grid, and no worse than min/max grids on held-out inputs."""
    weight, hessian, x = layer
    heavy = weight * (1 + 4 * (torch.rand_like(weight) > 0.98))  # a few outlier weights per group
    scheme = parse_scheme(name)
    minmax = run_gptq(heavy, hessian, scheme)
    mse = run_gptq(heavy, hessian, scheme, clip="mse")
    assert not torch.equal(mse.scale, minmax.scale)
    assert torch.equal(dequantize(mse.to_quantized_weight(), K), mse.fake_quantized)
    assert output_error(heavy, mse.fake_quantized, x) < output_error(heavy, minmax.fake_quantized, x)
    with pytest.raises(ValueError, match="clip"):
        run_gptq(weight, hessian, scheme, clip="percentile")


def hessian_error(weight, fake, hessian):
    d = (weight - fake).double()
    return float(torch.einsum("nk,kl,nl->", d, hessian.double(), d))


@pytest.mark.parametrize("name", ["w2g128", "w3g128", "w4g128_sym", "w2"])
def test_refit_scales_keeps_codes_and_lowers_the_error(layer, name):
    """Least-squares scales on GPTQ's codes: codes and zero points unchanged, each row's
    error under H no larger (lower overall), the stored grid round-trips exactly, and
    refit rounds with GPTQ passes between them keep lowering the error."""
    weight, hessian, _ = layer
    scheme = parse_scheme(name)
    plain = run_gptq(weight, hessian, scheme, clip="mse")
    refit = refit_scales(weight, hessian, plain)
    group = scheme.group(K)

    def codes(r):
        return torch.round(r.fake_quantized / r.scale.float().repeat_interleave(group, 1))

    assert torch.equal(codes(refit), codes(plain))
    assert (refit.zero is None) == (plain.zero is None)
    assert refit.zero is None or torch.equal(refit.zero, plain.zero)
    assert not torch.equal(refit.scale, plain.scale)
    assert torch.equal(dequantize(refit.to_quantized_weight(), K), refit.fake_quantized)
    d_plain, d_refit = weight - plain.fake_quantized, weight - refit.fake_quantized
    rows_plain = torch.einsum("nk,kl,nl->n", d_plain.double(), hessian.double(), d_plain.double())
    rows_refit = torch.einsum("nk,kl,nl->n", d_refit.double(), hessian.double(), d_refit.double())
    assert (rows_refit <= rows_plain * (1 + 1e-5)).all()
    assert rows_refit.sum() < 0.995 * rows_plain.sum()
    two = run_gptq(weight, hessian, scheme, clip="mse", refit_rounds=2)
    err_two, err_one = (hessian_error(weight, r.fake_quantized, hessian) for r in (two, refit))
    assert err_two <= err_one
    assert torch.equal(dequantize(two.to_quantized_weight(), K), two.fake_quantized)


def test_refit_scales_leaves_rtn_and_fp8_alone(layer):
    weight, hessian, _ = layer
    fp8 = run_gptq(weight, hessian, parse_scheme("w8a8fp8"))
    assert refit_scales(weight, hessian, fp8) is fp8
    unseen = run_gptq(weight, torch.zeros_like(hessian), parse_scheme("w2g128"))
    assert unseen.used_rtn and refit_scales(weight, torch.zeros_like(hessian), unseen) is unseen


@pytest.mark.parametrize("name", ["w2g128", "w3g128", "w4g128_sym", "w2"])
def test_refine_codes_keeps_the_grid_and_lowers_the_error(layer, name):
    """Coordinate descent on GPTQ's codes: scales and zero points untouched, codes in range
    (the grid round-trips exactly), each row's error under the dampened H no larger, and
    lower overall than GPTQ's one pass."""
    weight, hessian, _ = layer
    scheme = parse_scheme(name)
    plain = run_gptq(weight, hessian, scheme, clip="mse", percdamp=0.1)
    refined = refine_codes(weight, hessian, plain, sweeps=2, percdamp=0.1)
    assert torch.equal(refined.scale, plain.scale)
    assert (refined.zero is None) == (plain.zero is None)
    assert refined.zero is None or torch.equal(refined.zero, plain.zero)
    assert torch.equal(dequantize(refined.to_quantized_weight(), K), refined.fake_quantized)
    damped = hessian.double() + 0.1 * hessian.double().diagonal().mean() * torch.eye(K, dtype=torch.float64)
    d_plain, d_refined = (weight - r.fake_quantized for r in (plain, refined))
    rows_plain = torch.einsum("nk,kl,nl->n", d_plain.double(), damped, d_plain.double())
    rows_refined = torch.einsum("nk,kl,nl->n", d_refined.double(), damped, d_refined.double())
    assert (rows_refined <= rows_plain * (1 + 1e-5)).all()
    assert rows_refined.sum() < 0.99 * rows_plain.sum()
    # More sweeps never undo the first ones.
    more = refine_codes(weight, hessian, plain, sweeps=4, percdamp=0.1)
    assert hessian_error(weight, more.fake_quantized, damped) <= hessian_error(weight, refined.fake_quantized, damped)


def test_refine_codes_leaves_rtn_fp8_and_zero_sweeps_alone(layer):
    weight, hessian, _ = layer
    fp8 = run_gptq(weight, hessian, parse_scheme("w8a8fp8"))
    assert refine_codes(weight, hessian, fp8, sweeps=2) is fp8
    unseen = run_gptq(weight, torch.zeros_like(hessian), parse_scheme("w2g128"))
    assert refine_codes(weight, torch.zeros_like(hessian), unseen, sweeps=2) is unseen
    plain = run_gptq(weight, hessian, parse_scheme("w2g128"))
    assert refine_codes(weight, hessian, plain, sweeps=0) is plain


# ---------------------------------------------------------------------------
# Batched GPTQ (an MoE layer's experts in one column loop)


@pytest.mark.parametrize("name", ["w2", "w3g128", "w4g128_sym", "w8a8fp8"])
@pytest.mark.parametrize("options", [{}, {"clip": "mse", "refine_sweeps": 1}, {"refit_rounds": 2}])
def test_batched_gptq_equals_one_weight_at_a_time(layer, name, options):
    """Every expert's result equals run_gptq of its weight alone, bit for bit, including an expert
    with an empty Hessian (RTN), one with a dead input, one whose Hessian differs in column order
    (act-order permutations differ per expert), and batches split by max_batch_elements."""
    weight, hessian, _ = layer
    scheme = parse_scheme(name)
    gen = torch.Generator().manual_seed(5)
    weights = [weight, torch.randn(N, K, generator=gen), weight * 0.5, torch.randn(N, K, generator=gen)]
    dead = hessian.clone()
    dead[7, :] = 0
    dead[:, 7] = 0
    scrambled = torch.randperm(K, generator=gen)
    hessians = [hessian, hessian[scrambled][:, scrambled], torch.zeros(K, K), dead]
    alone = [run_gptq(w, h, scheme, percdamp=0.1, **options) for w, h in zip(weights, hessians)]
    for max_elements in (4 * N * K, 2 * N * K + 1):  # one batch; batches of two
        batched = run_gptq_batch(weights, hessians, scheme, percdamp=0.1, max_batch_elements=max_elements, **options)
        assert [r.used_rtn for r in batched] == [False, False, True, False]
        for a, b in zip(alone, batched):
            assert torch.equal(a.fake_quantized, b.fake_quantized) and torch.equal(a.scale, b.scale)
            assert (a.zero is None and b.zero is None) or torch.equal(a.zero, b.zero)


def test_batched_gptq_runs_dynamic_groups_one_at_a_time(layer):
    weight, hessian, _ = layer
    scheme = parse_scheme("w4g128")
    alone = run_gptq(weight, hessian, scheme, act_order=False, static_groups=False)
    (batched,) = run_gptq_batch([weight], [hessian], scheme, act_order=False, static_groups=False)
    assert torch.equal(alone.fake_quantized, batched.fake_quantized)
    with pytest.raises(ValueError, match="2 weights but 1 Hessians"):
        run_gptq_batch([weight, weight], [hessian], scheme)
    with pytest.raises(ValueError, match="one shape"):
        run_gptq_batch([weight, weight[:32]], [hessian, hessian], scheme)
