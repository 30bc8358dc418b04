"""GPTQ in model order with the fp target (offline.sequential, GPTAQ): GPTQ of the shifted weight
W' = W + W C (H + λI)^-1 fits Ŵ X̃ to the unquantized model's W X instead of W X̃."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tiny_models import REFERENCE_MOE, build_tiny_model

from offline.cli import quantize_main
from offline.model_spec import inspect_model
from offline.pipeline import PipelineError, QuantizeOptions, quantize_mxmoe
from offline.profile import find_moe_layers
from offline.scheme_map import uniform_map
from offline.sensitivity import quantize_unit
from offline.sequential import fp_target, quantize_in_model_order
from vllm_mxmoe.schemes import parse_scheme

CORPUS = REFERENCE_MOE.parent / "corpus" / "calib.txt"
FAST = {"calib_tokens": 1024, "seq_len": 128, "sample_tokens": 128}
SCHEME = parse_scheme("w3g128")
PERCDAMP = 0.1


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return build_tiny_model("qwen3_moe", tmp_path_factory.mktemp("tiny") / "fp")


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CORPUS.read_text()[:120_000])
    return path


def _load(source: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    return model, find_moe_layers(model, inspect_model(source))


def _in_model_order(model, moe_layers, target: str, hessian_weights: str = "none"):
    """{(layer index, unit, expert): (weight given to quantize, hessian, fake-quantized result)}."""
    seen = {}

    def quantize(moe, unit, experts, weights, hessians):
        out = []
        for expert, weight, hessian in zip(experts, weights, hessians):
            q = quantize_unit(weight.float(), hessian, SCHEME, "gptq", "minmax", PERCDAMP)
            seen[(moe.index, unit, expert)] = (weight.detach().float().clone(), hessian.clone(), q.fake_quantized)
            out.append(q)
        return out

    torch.manual_seed(0)
    sequences = torch.randint(2, 8000, (4, 32))
    quantize_in_model_order(model, moe_layers, sequences, quantize, batch_size=2,
                            hessian_weights=hessian_weights, target=target, percdamp=PERCDAMP)
    return seen, sequences


@pytest.mark.parametrize("hessian_weights", ["none", "routing"])
def test_first_layer_gate_up_target_is_w_and_down_shift_is_gptaq(source, hessian_weights):
    """Only layer 0 quantized: its gate_up inputs are the same in both streams, so C = 0 and the
    fp target is exactly W (and everything matches the quantized target). down's inputs differ
    (quantized vs original gate_up): its target is W + W C (H + λI)^-1 with H, C recomputed here
    from the routed tokens."""
    torch.set_num_threads(1)
    model, moe_layers = _load(source)
    experts = moe_layers[0].experts
    original_gate_up = experts.gate_up_proj.detach().clone()
    original_down = experts.down_proj.detach().clone()
    fp, sequences = _in_model_order(model, moe_layers[:1], "fp", hessian_weights)
    plain, _ = _in_model_order(model, moe_layers[:1], "quantized", hessian_weights)
    assert torch.equal(experts.gate_up_proj, original_gate_up)  # the model is restored
    num_experts = original_gate_up.shape[0]
    assert set(fp) == set(plain) == {(0, u, e) for u in ("gate_up", "down") for e in range(num_experts)}
    for e in range(num_experts):
        w, h, q = fp[(0, "gate_up", e)]
        assert torch.equal(w, original_gate_up[e])
        torch.testing.assert_close(h, plain[(0, "gate_up", e)][1], rtol=1e-6, atol=1e-7)
        assert torch.equal(q, plain[(0, "gate_up", e)][2])
        torch.testing.assert_close(fp[(0, "down", e)][1], plain[(0, "down", e)][1], rtol=1e-6, atol=1e-7)

    # Independent H and C of down: the tokens layer 0 routes to each expert, x from the original
    # gate_up, x̃ from the quantized one (what quantize returned), weighted as the Hessian.
    captured = []
    handle = experts.register_forward_pre_hook(
        lambda m, a, kw: captured.append((kw.get("hidden_states", a[0] if a else None),
                                          kw.get("top_k_index", a[1] if len(a) > 1 else None),
                                          kw.get("top_k_weights", a[2] if len(a) > 2 else None))),
        with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=sequences, use_cache=False)
    finally:
        handle.remove()
    hidden, ids, weights = (torch.cat([c[i].reshape(-1, c[i].shape[-1]) for c in captured]) for i in range(3))
    shifted = 0
    for e in range(num_experts):
        token, slot = torch.where(ids == e)
        if len(token) == 0:
            assert torch.equal(fp[(0, "down", e)][0], original_down[e])
            continue
        x = hidden[token]

        def act(gate_up):
            gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
            return experts.act_fn(gate) * up

        x_fp, x_q = act(original_gate_up[e]).double(), act(fp[(0, "gate_up", e)][2]).double()
        if hessian_weights == "routing":
            r = weights[token, slot].double().unsqueeze(-1)
            x_fp, x_q = x_fp * r, x_q * r
        h = 2 * x_q.T @ x_q / len(token)
        c = 2 * (x_fp - x_q).T @ x_q / len(token)
        w_given, h_given, _ = fp[(0, "down", e)]
        torch.testing.assert_close(h_given.double(), h, rtol=1e-4, atol=1e-6)
        damped = h + PERCDAMP * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
        want = original_down[e].double() + original_down[e].double() @ c @ torch.linalg.inv(damped)
        torch.testing.assert_close(w_given.double(), want, rtol=1e-3, atol=1e-5)
        shifted += int(not torch.equal(w_given, original_down[e]))
    assert shifted >= num_experts // 2  # down's target really moved


def test_later_layer_gate_up_target_moves(source):
    model, moe_layers = _load(source)
    assert [m.index for m in moe_layers] == [0, 1]
    fp, _ = _in_model_order(model, moe_layers, "fp")
    plain, _ = _in_model_order(model, moe_layers, "quantized")
    gate_up = moe_layers[1].experts.gate_up_proj
    moved = [e for e in range(gate_up.shape[0]) if not torch.equal(fp[(1, "gate_up", e)][0], gate_up[e])]
    assert len(moved) >= gate_up.shape[0] // 2
    assert all(torch.equal(plain[(1, "gate_up", e)][0], gate_up[e]) for e in range(gate_up.shape[0]))
    # layer 0's down was fitted to another target, so layer 1's quantized inputs differ too
    assert not torch.allclose(fp[(1, "gate_up", 0)][1], plain[(1, "gate_up", 0)][1])


def _output_error(w_hat, w, x_q, x):
    return float((x_q.double() @ w_hat.double().T - x.double() @ w.double().T).pow(2).sum())


@pytest.mark.parametrize("scheme", ["w2g128", "w3g128"])
def test_fp_target_lowers_the_gptaq_objective(scheme):
    """X ≠ X̃ (X̃ = X plus correlated noise, as after quantized layers): GPTQ of W' gives a lower
    ||Ŵ X̃ - W X||² than GPTQ of W, and W' solves W' (H + λI) = W (H + C + λI)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    n, k, t = 64, 256, 2048
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(t, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k**0.5)
    x_q = x + 0.3 * x @ (torch.randn(k, k, generator=g) / k**0.5) + 0.1 * torch.randn(t, k, generator=g)
    h = 2 * x_q.double().T @ x_q.double() / t
    c = 2 * (x - x_q).double().T @ x_q.double() / t
    target = fp_target(w, h.float(), c.float(), PERCDAMP)
    damped = h + PERCDAMP * h.diagonal().mean() * torch.eye(k, dtype=h.dtype)
    torch.testing.assert_close((target.double() @ damped), w.double() @ (h + c) + w.double() @ (damped - h),
                               rtol=1e-4, atol=1e-4)
    assert torch.equal(fp_target(w, h.float(), torch.zeros(k, k), PERCDAMP), w)  # C = 0: W itself
    assert torch.equal(fp_target(w, torch.zeros(k, k), c.float(), PERCDAMP), w)  # no sample: W
    s = parse_scheme(scheme)
    plain = quantize_unit(w, h.float(), s, "gptq", "minmax", PERCDAMP).fake_quantized
    shifted = quantize_unit(target, h.float(), s, "gptq", "minmax", PERCDAMP).fake_quantized
    err_plain, err_shifted = _output_error(plain, w, x_q, x), _output_error(shifted, w, x_q, x)
    assert err_shifted < 0.9 * err_plain, (err_shifted, err_plain)
    # also with refinement and clipping, as the pipeline runs it
    plain = quantize_unit(w, h.float(), s, "gptq", "mse", PERCDAMP, refine_sweeps=2).fake_quantized
    shifted = quantize_unit(target, h.float(), s, "gptq", "mse", PERCDAMP, refine_sweeps=2).fake_quantized
    assert _output_error(shifted, w, x_q, x) < _output_error(plain, w, x_q, x)


def _expert_tensors(out_dir: Path, layer: int) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in out_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                if f"layers.{layer}.mlp.experts." in name:
                    tensors[name] = st.get_tensor(name)
    return tensors


def test_pipeline_fp_target_end_to_end(source, calib, tmp_path):
    torch.set_num_threads(1)
    opts = dict(scheme_map=uniform_map("w3g128"), sequential=True, cache_dir=str(tmp_path / "cache"),
                percdamp=PERCDAMP, **FAST)
    fp = quantize_mxmoe(source, calib, tmp_path / "fp", sequential_target="fp", **opts)
    plain = quantize_mxmoe(source, calib, tmp_path / "q", sequential_target="quantized", **opts)
    assert fp.report["options"]["sequential_target"] == "fp"
    assert plain.report["options"]["sequential_target"] == "quantized"
    assert plain.stages["profile"] == "cached"
    fp0, plain0 = _expert_tensors(fp.out_dir, 0), _expert_tensors(plain.out_dir, 0)
    assert fp0 and fp0.keys() == plain0.keys()
    gate = [n for n in fp0 if ".gate_proj." in n or ".up_proj." in n]
    down = [n for n in fp0 if ".down_proj." in n]
    assert gate and down
    assert all(torch.equal(fp0[n], plain0[n]) for n in gate)  # layer 0 gate_up: same inputs, same fit
    assert not all(torch.equal(fp0[n], plain0[n]) for n in down)
    fp1, plain1 = _expert_tensors(fp.out_dir, 1), _expert_tensors(plain.out_dir, 1)
    assert not all(torch.equal(fp1[n], plain1[n]) for n in fp1 if ".gate_proj." in n)


def test_fp_target_needs_sequential(source, calib, tmp_path, capsys):
    with pytest.raises(PipelineError, match="needs --sequential"):
        QuantizeOptions(scheme_map=uniform_map("w3g128"), sequential=False, sequential_target="fp").validate()
    with pytest.raises(PipelineError, match="needs --sequential"):  # RTN leaves GPTQ in model order off
        QuantizeOptions(scheme_map=uniform_map("w3g128"), method="rtn", sequential_target="quantized").validate()
    with pytest.raises(PipelineError, match="--sequential-target must be one of"):
        QuantizeOptions(scheme_map=uniform_map("w3g128"), sequential=True, sequential_target="full").validate()
    QuantizeOptions(scheme_map=uniform_map("w3g128"), sequential=True, sequential_target="fp").validate()
    code = quantize_main(["--model", str(source), "--calib", str(calib), "--scheme", "w3g128", "--no-sequential",
                          "--sequential-target", "fp", "--out", str(tmp_path / "q")])  # fmt: skip
    assert code == 2
    assert "--sequential-target fp" in capsys.readouterr().err and not (tmp_path / "q").exists()
    with pytest.raises(SystemExit):
        quantize_main(["--model", str(source), "--calib", str(calib), "--scheme", "w3g128", "--sequential",
                       "--sequential-target", "full", "--out", str(tmp_path / "q2")])  # fmt: skip
    shutil.rmtree(tmp_path / "q", ignore_errors=True)


@pytest.mark.parametrize("options, expected", [
    ({}, (True, "fp", 0.3)),  # the default quantizer: GPTQ in model order, fp target, dampening 0.3
    ({"method": "rtn"}, (False, None, 0.01)),
    ({"sequential": False}, (False, None, 0.01)),  # GPTQ on the profile's Hessians, GPTQ's own dampening
    ({"sequential_target": "quantized"}, (True, "quantized", 0.01)),
    ({"percdamp": 0.05}, (True, "fp", 0.05)),
])
def test_defaults_resolve_to_the_measured_best_quantizer(options, expected):
    o = QuantizeOptions(wbits=3.25, **options)
    o.validate()
    assert (o.sequential, o.sequential_target, o.percdamp) == expected


def test_cli_defaults_match_the_python_api():
    """mxmoe-quantize without quantizer flags passes None, so both front ends resolve the same defaults."""
    from offline.cli import build_parser

    args = build_parser().parse_args(["--model", "m", "--calib", "c", "--wbits", "3.25", "--out", "o"])
    assert (args.sequential, args.sequential_target, args.percdamp) == (None, None, None)
    assert build_parser().parse_args(["--model", "m", "--wbits", "3", "--out", "o", "--no-sequential"]).sequential is False
