"""The offline MxMoE pipeline (offline.pipeline, mxmoe-quantize --wbits) on tiny random models.

One pipeline run on a tiny Qwen3-MoE (tied embeddings, so the rotation must
write lm_head; expert 0 of layer 0 never routed) is shared by most tests; a
second run with another budget must come from the caches. One slow test serves
the output of the full command with vLLM.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import hf_greedy, vllm_generate
from safetensors import safe_open
from tiny_models import REFERENCE_MOE, TOKENIZER_FILES, build_tiny_model, make_config

from offline import pipeline as pipeline_module
from offline.calibration import CalibrationError, load_calibration
from offline.cli import quantize_main
from offline.dequantize import dequantize_checkpoint
from offline.ilp import unit_shapes
from offline.model_spec import ModelSpecError, inspect_model, tensor_names
from offline.pipeline import PipelineError, quantize_mxmoe
from offline.profile import (
    LayerProfile,
    ProfileStore,
    find_moe_layers,
    holdout_mask,
    layer_output_gains,
    profile_model,
    token_output_fisher,
)
from offline.rotation import rotate_model_
from offline.sensitivity import expert_output, layer_sensitivity, quantize_unit, weighted_error
from vllm_mxmoe.format import read_quant_config
from vllm_mxmoe.schemes import parse_scheme

CORPUS = REFERENCE_MOE.parent / "corpus" / "calib.txt"
# Small calibration for speed: 8 sequences of 128 tokens, 128 sampled tokens per expert.
FAST = {"calib_tokens": 1024, "seq_len": 128, "sample_tokens": 128}
# The run fixture's quantizer: GPTQ on the profile's Hessians (dampening 0.01), so that its export is exactly what
# Δ predicted. Runs that reuse its caches pass it too (Δ is cached per dampening). The default quantizer, GPTQ in
# model order, is covered by test_sequential_target.py and the CLI test here.
AS_RUN = {"sequential": False}
UNROUTED = 0  # expert of layer 0 the router can never pick


def build_tied_model(out_dir: Path) -> Path:
    """Tiny Qwen3-MoE with tied embeddings whose layer-0 router never picks expert 0.

    Router rows (a, -a, b, -b) give every token at least two positive logits, and
    expert 0's row is 0, so with top-2 routing it is never chosen.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = make_config("qwen3_moe")
    cfg.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
        router = model.model.layers[0].mlp.gate.weight
        router[UNROUTED] = 0.0
        router[2], router[4] = -router[1], -router[3]
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(REFERENCE_MOE / name, out_dir / name)
    return out_dir


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CORPUS.read_text()[:120_000])
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return build_tied_model(tmp_path_factory.mktemp("tied") / "fp")


@pytest.fixture(scope="module")
def run(source, calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("mx") / "q"
    return quantize_mxmoe(source, calib, out, wbits=3.25, r=1.0, **AS_RUN, **FAST)


def test_budget_met_exactly_as_counted(run):
    qcfg = read_quant_config(str(run.out_dir))
    cfg = json.loads((run.out_dir / "config.json").read_text())
    shapes = unit_shapes(cfg["hidden_size"], cfg["moe_intermediate_size"])
    total_bits = total_elements = 0
    for layer in qcfg.experts.values():
        bits = sum(parse_scheme(s).storage_bits(*shapes["gate_up"]) for s in layer.gate_up)
        bits += sum(parse_scheme(s).storage_bits(*shapes["down"]) for s in layer.down)
        elements = len(layer.gate_up) * 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"]
        total_bits += bits
        total_elements += elements
    assert total_bits <= 3.25 * total_elements  # within the budget, exactly counted (per layer: below)
    assert run.report["achieved_avg_bits"] == total_bits / total_elements
    assert run.report["achieved_avg_bits"] > 3.25 - 0.1  # the budget is used, not wasted
    used = {s for layer in qcfg.experts.values() for s in layer.gate_up + layer.down}
    assert len(used) >= 2  # a mixed allocation
    assert set(run.report["plots"]) == {"bits_heatmap.png", "activation_frequency.png", "pareto_front.png"}
    seconds = run.report["stage_seconds"]  # where a run's time went, per step
    assert {"load", "profile", "sensitivity", "allocate", "quantize", "export"} <= set(seconds)
    assert all(v >= 0 for v in seconds.values()) and seconds["sensitivity"] > 0
    assert run.report["device"] == "cpu" and "peak_device_memory_gib" not in run.report


def test_second_run_reuses_profile_and_sensitivity(run, source, calib, tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("stage re-run although cached")

    monkeypatch.setattr(pipeline_module, "profile_model", must_not_run)
    monkeypatch.setattr(pipeline_module, "layer_sensitivity", must_not_run)
    again = quantize_mxmoe(
        source, calib, tmp_path / "q2", wbits=2.75, r="auto", cache_dir=str(run.out_dir / "cache"), **AS_RUN, **FAST
    )
    assert again.stages["profile"] == again.stages["sensitivity"] == "cached"
    assert run.stages["profile"] == run.stages["sensitivity"] == "computed"
    assert again.report["achieved_avg_bits"] <= 2.75


def test_sensitivity_cached_per_scheme(run, source, calib, tmp_path, monkeypatch):
    """Δ is cached one scheme at a time: more candidates compute only the new scheme,
    a subset of measured candidates computes nothing, and Δ is the same either way."""
    cache = tmp_path / "cache"
    shutil.copytree(run.out_dir / "cache", cache)
    real_sensitivity, real_allocate = pipeline_module.layer_sensitivity, pipeline_module._Pipeline._allocate
    calls, losses = [], []

    def recording(*args, **kwargs):
        calls.append(list(args[4]))
        return real_sensitivity(*args, **kwargs)

    def allocate(self, moe_layers, store, loss, *args, **kwargs):
        losses.append((self.opts.schemes, loss))
        return real_allocate(self, moe_layers, store, loss, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "layer_sensitivity", recording)
    monkeypatch.setattr(pipeline_module._Pipeline, "_allocate", allocate)
    common = {"wbits": 3.25, "r": 1.0, "cache_dir": str(cache), **AS_RUN, **FAST}
    more = quantize_mxmoe(
        source, calib, tmp_path / "more", schemes=(*pipeline_module.DEFAULT_SCHEMES, "w2g64"), **common
    )
    assert more.stages["sensitivity"] == "computed" and calls and all(c == ["w2g64"] for c in calls)
    calls.clear()
    fewer = quantize_mxmoe(source, calib, tmp_path / "fewer", schemes=("w2", "w2g64", "w4g128"), **common)
    assert fewer.stages["sensitivity"] == "cached" and not calls
    (all_schemes, full), (subset, part) = losses
    for prefix, loss in part.items():
        assert loss.shape[-1] == len(subset)
        for i, scheme in enumerate(subset):
            assert (loss[..., i] == full[prefix][..., all_schemes.index(scheme)]).all()


def test_percdamp_reaches_gptq_and_keys_the_sensitivity_cache(run, source, calib, tmp_path, monkeypatch):
    """--percdamp is passed to every GPTQ call (sensitivity and export) and is part of
    the sensitivity cache key, so Δ measured with another dampening is not reused."""
    cache = tmp_path / "cache"
    shutil.copytree(run.out_dir / "cache", cache)
    real, seen = pipeline_module.quantize_units, set()

    def recording(*args, **kwargs):
        seen.add(args[5] if len(args) > 5 else kwargs.get("percdamp"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "quantize_units", recording)
    import offline.sensitivity as sensitivity_module

    monkeypatch.setattr(sensitivity_module, "quantize_units", recording)
    damped = quantize_mxmoe(source, calib, tmp_path / "q", wbits=3.25, r=1.0, percdamp=0.1, cache_dir=str(cache), **FAST)
    assert damped.stages["sensitivity"] == "computed" and seen == {0.1}
    with pytest.raises(PipelineError, match="percdamp"):
        quantize_mxmoe(source, calib, tmp_path / "bad", wbits=3.25, percdamp=0.0, **FAST)
    # --refit-scales the same way: every GPTQ call gets it, and Δ measured without it is not reused
    seen.clear()
    measured = set()

    def record_argument(index: int, name: str) -> set:
        """Patch quantize_units to note its argument ``index`` (keyword ``name``) and the scheme."""
        values = set()

        def record(*args, **kwargs):
            values.add(args[index] if len(args) > index else kwargs.get(name, 0))
            measured.add(args[2].name)
            return recording(*args, **kwargs)

        monkeypatch.setattr(pipeline_module, "quantize_units", record)
        monkeypatch.setattr(sensitivity_module, "quantize_units", record)
        return values

    refits = record_argument(6, "refit_rounds")
    refit = quantize_mxmoe(source, calib, tmp_path / "r", wbits=3.25, r=1.0, percdamp=0.1, refit_rounds=1,
                           cache_dir=str(cache), **FAST)
    assert refit.stages["sensitivity"] == "computed" and refits == {1}
    bad_options = (({"refit_rounds": -1}, "refit-scales"), ({"refit_rounds": 1, "method": "rtn"}, "gptq"),
                   ({"refine_sweeps": -1}, "refine-codes"), ({"refine_sweeps": 1, "method": "rtn"}, "gptq"))
    for bad, match in bad_options:
        with pytest.raises(PipelineError, match=match):
            quantize_mxmoe(source, calib, tmp_path / "bad", wbits=3.25, **bad, **FAST)
    # --refine-codes too; Δ is re-measured only for the 2-bit schemes it changes
    measured.clear()
    refines = record_argument(7, "refine_sweeps")
    refined = quantize_mxmoe(source, calib, tmp_path / "cd", wbits=3.25, r=1.0, percdamp=0.1, refine_sweeps=1,
                             cache_dir=str(cache), **FAST)
    assert refined.stages["sensitivity"] == "computed" and refines == {1}
    two_bit = {s for s in refined.report["options"]["schemes"] if parse_scheme(s).bits <= 2}
    allocated = {e[unit]["scheme"] for entry in refined.report["layers"] for e in entry["experts"] for unit in ("gate_up", "down")}
    assert two_bit <= measured <= two_bit | allocated


def test_model_budget_scope_moves_bits_between_layers(run, source, calib, tmp_path):
    """Default budget_scope="layer" (one ILP per layer, the paper's) keeps each layer
    within the budget; budget_scope="model" (one ILP over all layers) keeps only the
    model-wide average, and with raw Δ predicts a ΣΔ no larger (every per-layer
    allocation is feasible for it). layer_weights="fisher" weighs each layer's Δ."""
    for entry in run.report["layers"]:
        assert entry["storage_bits"] <= 3.25 * entry["weight_elements"], entry["prefix"]
        assert "pareto_front" in entry and entry["loss_weight"] == 1.0
    assert run.stages["layer_gains"] == "skipped"
    common = {
        "wbits": 3.25,
        "r": 1.0,
        "budget_scope": "model",
        "cache_dir": str(run.out_dir / "cache"),
        **AS_RUN,
        **FAST,
    }
    raw = quantize_mxmoe(source, calib, tmp_path / "raw", layer_weights="none", **common)
    assert raw.stages["sensitivity"] == "cached" and raw.stages["layer_gains"] == "skipped"
    total = sum(e["storage_bits"] for e in raw.report["layers"])
    assert total <= 3.25 * sum(e["weight_elements"] for e in raw.report["layers"])
    assert raw.report["predicted_loss"] <= run.report["predicted_loss"] * (1 + 1e-9)
    assert "pareto_front" in raw.report and all("pareto_front" not in e for e in raw.report["layers"])

    fisher = quantize_mxmoe(source, calib, tmp_path / "fisher", **common)
    assert fisher.stages["layer_gains"] == "computed"
    gains = fisher.report["layer_gains"]
    weights = [e["loss_weight"] for e in fisher.report["layers"]]
    assert set(gains) == {e["prefix"] for e in fisher.report["layers"]}
    assert sum(weights) / len(weights) == pytest.approx(1.0)
    for entry, weight in zip(fisher.report["layers"], weights):
        assert weight == pytest.approx(gains[entry["prefix"]] / (sum(gains.values()) / len(gains)))
    with pytest.raises(PipelineError, match="budget-scope"):
        quantize_mxmoe(source, calib, tmp_path / "x", wbits=3.25, budget_scope="global", **FAST)
    with pytest.raises(PipelineError, match="clip"):
        quantize_mxmoe(source, calib, tmp_path / "y", wbits=3.25, clip="percentile", **FAST)
    with pytest.raises(PipelineError, match="layer-weights"):
        quantize_mxmoe(source, calib, tmp_path / "z", wbits=3.25, layer_weights="hessian", **FAST)


def test_rotated_gptq_export_is_what_the_pipeline_predicted(run, source):
    """Dequantized checkpoint = GPTQ of the rotated weights with the profiled Hessians,
    and the Δ measured on it is the Δ the allocator was given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    rotate_model_(model, seed=0)
    store = ProfileStore(next((run.out_dir / "cache").glob("profile-*")))
    deq = dequantize_checkpoint(run.out_dir, run.out_dir.parent / "dq")
    names = tensor_names(deq)
    handles = {f: safe_open(str(deq / f), "pt") for f in set(names.values())}

    def exported(name):
        return handles[names[name]].get_tensor(name)

    for layer_entry in run.report["layers"]:
        prefix = layer_entry["prefix"]
        experts = model.model.layers[int(prefix.split(".")[2])].mlp.experts
        profile = store.load(prefix)
        inter = experts.down_proj.shape[2]
        for e in (0, 3):
            entry = layer_entry["experts"][e]
            gate_up = quantize_unit(
                experts.gate_up_proj[e],
                profile.gate_up_hessian[e],
                parse_scheme(entry["gate_up"]["scheme"]),
                "gptq",
                run.report["options"]["clip"],
            ).fake_quantized
            down = quantize_unit(
                experts.down_proj[e],
                profile.down_hessian[e],
                parse_scheme(entry["down"]["scheme"]),
                "gptq",
                run.report["options"]["clip"],
            ).fake_quantized
            base = f"{prefix}.{e}"
            assert torch.equal(exported(f"{base}.gate_proj.weight"), gate_up[:inter])
            assert torch.equal(exported(f"{base}.up_proj.weight"), gate_up[inter:])
            assert torch.equal(exported(f"{base}.down_proj.weight"), down)
            # Δ of the exported down block, measured again, is the predicted one
            x, w = profile.samples(e)
            if x.shape[0]:
                w_gu, w_down = experts.gate_up_proj[e], experts.down_proj[e]
                ref = expert_output(x, w_gu, w_down, experts.act_fn)
                delta = weighted_error(expert_output(x, w_gu, down, experts.act_fn), ref, w)
                delta *= float(profile.counts[e]) / x.shape[0] * layer_entry["loss_weight"]
                assert delta == pytest.approx(entry["down"]["predicted_loss"], rel=1e-6)
    # rotated, non-expert tensors (lm_head untied and written) come from the rotated model
    torch.testing.assert_close(exported("lm_head.weight"), model.lm_head.weight, rtol=0, atol=0)
    assert json.loads((run.out_dir / "config.json").read_text())["tie_word_embeddings"] is False


def test_sequential_gptq_takes_hessians_through_the_quantized_layers(run, source, calib, tmp_path):
    """--sequential: each block is GPTQ of the rotated weight with the Hessian its inputs have
    in the model whose earlier blocks are already quantized. Checked against an independent
    profile of the dequantized sequential checkpoint: its layer-0 gate_up inputs are the
    unquantized model's (nothing runs before them), its layer-1 inputs pass through quantized
    layer-0 experts, and down's inputs through the quantized gate_up of the same expert."""
    from transformers import AutoModelForCausalLM

    seq = quantize_mxmoe(source, calib, tmp_path / "seq", wbits=3.25, r=1.0, sequential=True,
                         sequential_target="quantized", cache_dir=str(run.out_dir / "cache"), **FAST)
    assert seq.stages["profile"] == "cached" and seq.stages["sensitivity"] == "cached"
    assert [x["experts"] for x in seq.report["layers"]] == [x["experts"] for x in run.report["layers"]]
    deq = dequantize_checkpoint(seq.out_dir, tmp_path / "dq")
    quantized = AutoModelForCausalLM.from_pretrained(str(deq), dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    rotate_model_(original, seed=0)
    spec = inspect_model(source)
    sequences = load_calibration(source, calib, seq_len=FAST["seq_len"], num_tokens=FAST["calib_tokens"])
    store = profile_model(quantized, find_moe_layers(quantized, spec), sequences, ProfileStore(tmp_path / "p"))
    plain = ProfileStore(next((run.out_dir / "cache").glob("profile-*")))
    clip = seq.report["options"]["clip"]
    for layer_entry in seq.report["layers"]:
        prefix = layer_entry["prefix"]
        index = int(prefix.split(".")[2])
        rotated = original.model.layers[index].mlp.experts
        stored = quantized.model.layers[index].mlp.experts
        profile = store.load(prefix)
        for e in (1, 3):
            entry = layer_entry["experts"][e]
            want_gate_up = quantize_unit(rotated.gate_up_proj[e], profile.gate_up_hessian[e],
                                         parse_scheme(entry["gate_up"]["scheme"]), "gptq", clip).fake_quantized
            # the quantized model's own down Hessian is taken after its (quantized) gate_up
            want_down = quantize_unit(rotated.down_proj[e], profile.down_hessian[e],
                                      parse_scheme(entry["down"]["scheme"]), "gptq", clip).fake_quantized
            torch.testing.assert_close(stored.gate_up_proj[e], want_gate_up, rtol=0, atol=0)
            torch.testing.assert_close(stored.down_proj[e], want_down, rtol=0, atol=0)
        if index == 0:  # same inputs as the unquantized profile: same Hessian
            torch.testing.assert_close(profile.gate_up_hessian, plain.load(prefix).gate_up_hessian)
        else:
            assert not torch.allclose(profile.gate_up_hessian, plain.load(prefix).gate_up_hessian)
    with pytest.raises(PipelineError, match="sequential"):
        quantize_mxmoe(source, calib, tmp_path / "bad", wbits=3.25, sequential=True, method="rtn", **FAST)


def test_unrouted_expert_gets_finite_rtn_weights(run, source):
    layer0 = run.report["layers"][0]
    expert = layer0["experts"][UNROUTED]
    assert expert["activation_frequency"] == 0
    assert expert["gate_up"]["predicted_loss"] == expert["down"]["predicted_loss"] == 0
    deq = dequantize_checkpoint(run.out_dir, run.out_dir.parent / "dq_unrouted")
    names = tensor_names(deq)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        name = f"{layer0['prefix']}.{UNROUTED}.{proj}.weight"
        with safe_open(str(deq / names[name]), "pt") as f:
            weight = f.get_tensor(name)
        assert torch.isfinite(weight).all() and weight.abs().sum() > 0


def test_quantized_model_tracks_the_original(run, source):
    """Same function as the source up to quantization noise: rotation and lm_head are right."""
    from transformers import AutoModelForCausalLM

    deq = dequantize_checkpoint(run.out_dir, run.out_dir.parent / "dq_logits")
    ids = torch.tensor([[5, 17, 300, 42, 7, 1999, 100, 200]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(deq), dtype=torch.float32)(ids).logits
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.95


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral", "olmoe", "deepseek_v2"])
def test_rotated_gptq_w8_keeps_every_architecture(arch, calib, tmp_path):
    """Uniform w8 through rotation + GPTQ: the checkpoint computes what the source does."""
    from transformers import AutoModelForCausalLM

    src = build_tiny_model(arch, tmp_path / "fp")
    out = quantize_mxmoe(src, calib, tmp_path / "q", scheme_map={"gate_up": "w8", "down": "w8"}, **FAST)
    assert out.stages["sensitivity"] == "skipped"
    deq = dequantize_checkpoint(out.out_dir, tmp_path / "dq")
    ids = torch.tensor([[5, 17, 300, 42, 7, 1999]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(deq), dtype=torch.float32)(ids).logits
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_sensitivity_tokens_are_held_out_from_the_hessians(source, calib, tmp_path):
    """Hessians come from the fitting sequences only, counts and samples from all / the held-out ones."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    layers = find_moe_layers(model, inspect_model(source))
    sequences = load_calibration(source, calib, seq_len=64, num_tokens=8 * 64)
    held_out = holdout_mask(len(sequences), 0.25)
    assert held_out.sum() == 2
    split = profile_model(model, layers, sequences, ProfileStore(tmp_path / "split"), holdout=0.25)
    fit_only = profile_model(model, layers, sequences[~held_out], ProfileStore(tmp_path / "fit"), holdout=0)
    a, b = split.load(layers[1].prefix), fit_only.load(layers[1].prefix)
    torch.testing.assert_close(a.gate_up_hessian, b.gate_up_hessian)
    torch.testing.assert_close(a.down_hessian, b.down_hessian)
    assert a.counts.sum() == 2 * 8 * 64 and b.counts.sum() == 2 * 6 * 64  # top-2 of all tokens
    assert a.sample_sizes.sum() == 2 * 2 * 64  # every routed token of the 2 held-out sequences


def test_routing_weighted_hessians(source, calib, tmp_path):
    """hessian_weights="routing": H = 2/n sum_t w_t^2 x_t x_t^T over an expert's routed
    tokens (w_t its routing weight); "none" (default): 2/n sum_t x_t x_t^T. Checked
    against every routed token, kept as the sample (sample_tokens above the count)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    layers = find_moe_layers(model, inspect_model(source))
    sequences = load_calibration(source, calib, seq_len=64, num_tokens=4 * 64)
    stores = {
        kind: profile_model(model, layers, sequences, ProfileStore(tmp_path / kind), 10_000, hessian_weights=kind)
        for kind in ("none", "routing")
    }  # fmt: skip
    experts = layers[1].experts
    plain, weighted = (stores[k].load(layers[1].prefix) for k in ("none", "routing"))
    torch.testing.assert_close(plain.sample_inputs, weighted.sample_inputs)
    checked = 0
    for e in range(experts.gate_up_proj.shape[0]):
        x, w = weighted.samples(e)
        n = x.shape[0]
        if n == 0:
            continue
        assert n == weighted.counts[e]  # all routed tokens are in the sample
        gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e].detach()).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
        for got, inputs in ((weighted.gate_up_hessian[e], x), (weighted.down_hessian[e], h)):
            expected = 2 * (inputs * w[:, None]).T @ (inputs * w[:, None]) / n
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(plain.gate_up_hessian[e], 2 * x.T @ x / n, rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked >= 2
    with pytest.raises(PipelineError, match="hessian-weights"):
        quantize_mxmoe(source, calib, tmp_path / "bad", wbits=3.25, hessian_weights="gate", **FAST)


def test_report_json_and_plots_are_written(tmp_path, monkeypatch):
    """report.py on a small solved allocation: report.json, then the three PNGs
    (bits heatmap layer x expert per block, activation frequency, Pareto front
    with the chosen point); without matplotlib only report.json."""
    pytest.importorskip("matplotlib")
    import builtins

    import numpy as np

    from offline.ilp import LayerProblem, allocate, joint_problem, pareto_front, split_allocation
    from offline.report import LayerResult, build_report, plot_report, write_report

    schemes = ["w2g128", "w4g128", "w8"]
    rng = np.random.default_rng(0)
    problems = [
        LayerProblem.from_shapes(
            schemes, 256, 128, rng.gamma(2.0, 1.0, (4, 2, 1)) * [[[16, 1, 0.01]]], rng.uniform(1, 2, (4, 2, 3)), 4.25
        )
        for _ in range(2)
    ]  # fmt: skip
    joint = joint_problem(problems)
    front = pareto_front(joint)
    parts = split_allocation(allocate(joint, 1.0), problems)
    layers = [
        LayerResult(
            f"model.layers.{i}.mlp.experts", list(a.gate_up), list(a.down), [5, 0, 3, 8], 8, [1.0, 0, 0.6, 1.6],
            schemes, p.loss, p.time_us, 1.0,
        )
        for i, (a, p) in enumerate(zip(parts, problems))
    ]  # fmt: skip
    report = build_report(layers, 256, 128, {"model": "m"}, model_front=front)
    assert [p["r"] for p in report["pareto_front"]] == [p.r for p in front]
    assert report["predicted_loss"] == pytest.approx(sum(a.loss for a in parts))
    assert write_report(report, tmp_path) == tmp_path / "report.json"
    assert (
        json.loads((tmp_path / "report.json").read_text())["layers"][1]["experts"][3]["down"]["scheme"]
        in schemes
    )
    written = plot_report(report, tmp_path)
    assert {p.name for p in written} == {"bits_heatmap.png", "activation_frequency.png", "pareto_front.png"}
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plot_report(report, tmp_path / "none") == []


def test_layer_output_gains_are_the_mean_squared_output_gradients(source, calib):
    """Fisher weights of the MoE layers: mean over tokens of ||dNLL/d(experts output)||^2,
    checked against torch.autograd.grad on the same sequences; the model is left as it was."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    layers = find_moe_layers(model, inspect_model(source))
    sequences = load_calibration(source, calib, seq_len=32, num_tokens=5 * 32)
    gains = layer_output_gains(model, layers, sequences, max_sequences=3)
    assert set(gains) == {layer.prefix for layer in layers}

    outputs = {}
    handles = [
        layer.experts.register_forward_hook(
            lambda m, a, o, p=layer.prefix: outputs.setdefault(p, []).append(o)
        )
        for layer in layers
    ]
    expected = dict.fromkeys(gains, 0.0)
    for index in (0, 2, 4):  # the 3 evenly spread sequences of 5
        ids = sequences[index][None]
        logits = model(ids, use_cache=False).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        grads = torch.autograd.grad(nll, [outputs[p][-1] for p in expected])
        for prefix, g in zip(expected, grads):
            expected[prefix] += float(g.double().pow(2).sum()) / (3 * 32)
    for h in handles:
        h.remove()
    for prefix in gains:
        assert gains[prefix] == pytest.approx(expected[prefix], rel=1e-4) and gains[prefix] > 0
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_sample_positions_and_token_fisher(source, calib, tmp_path):
    """The profile records each sampled token's calibration index (sequence * seq_len +
    position), also with held-out sequences reordering the batches; token_output_fisher
    returns (dNLL/d(experts output))² at those tokens, checked against autograd."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    layers = find_moe_layers(model, inspect_model(source))
    sequences = load_calibration(source, calib, seq_len=32, num_tokens=4 * 32)
    store = profile_model(model, layers, sequences, ProfileStore(tmp_path / "p"), 10_000, holdout=0.5)
    inputs, outputs = {}, {}
    handles = [h for layer in layers for h in (
        layer.experts.register_forward_pre_hook(lambda m, a, k, p=layer.prefix: inputs.__setitem__(p, (a or (k["hidden_states"],))[0]), with_kwargs=True),
        layer.experts.register_forward_hook(lambda m, a, o, p=layer.prefix: outputs.__setitem__(p, o)),
    )]  # fmt: skip
    expected = {}
    for index in range(len(sequences)):
        ids = sequences[index][None]
        logits = model(ids, use_cache=False).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        grads = torch.autograd.grad(nll, [outputs[layer.prefix] for layer in layers])
        for layer, g in zip(layers, grads):
            x = inputs[layer.prefix].detach().reshape(32, -1)
            expected.setdefault(layer.prefix, []).append((x, g.detach().reshape(32, -1).pow(2)))
    for h in handles:
        h.remove()
    wanted = {}
    for layer in layers:
        profile = store.load(layer.prefix)
        x_all = torch.cat([x for x, _ in expected[layer.prefix]])
        for e in range(profile.counts.shape[0]):
            x, _ = profile.samples(e)
            ids = profile.sample_token_ids(e)
            assert (ids >= 0).all() and (ids // 32).unique().tolist() in ([], [0, 3], [0], [3])
            torch.testing.assert_close(x, x_all[ids], rtol=1e-4, atol=1e-5)
        wanted[layer.prefix] = profile.sample_positions[profile.sample_positions >= 0].unique()
    got = token_output_fisher(model, layers, sequences, wanted)
    for layer in layers:
        g_all = torch.cat([g for _, g in expected[layer.prefix]])
        torch.testing.assert_close(got[layer.prefix], g_all[wanted[layer.prefix]], rtol=1e-4, atol=1e-10)
        assert got[layer.prefix].sum() > 0
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_token_fisher_weights_in_the_sensitivity():
    """Δ with per-token Fisher weights: equal weights c give c times the plain Δ (isotropic
    [m, 1] and diagonal [m, H] alike); a token with zero gradient contributes nothing, as
    if its routing weight were 0; a weight on one output dimension counts only there."""
    torch.manual_seed(0)
    experts, hidden, inter, m = 2, 64, 32, 6
    gate_up, down = torch.randn(experts, 2 * inter, hidden), torch.randn(experts, hidden, inter)
    x = torch.randn(experts, m, hidden)

    def profile(weights):
        return LayerProfile(
            prefix="l", num_tokens=m, counts=torch.full((experts,), m), gate_up_hessian=torch.zeros(experts, hidden, hidden),
            down_hessian=torch.zeros(experts, inter, inter), sample_inputs=x, sample_weights=weights,
            sample_sizes=torch.full((experts,), m),
        )  # fmt: skip

    weights = torch.rand(experts, m) + 0.5
    act = torch.nn.functional.silu

    def delta(p, fisher=None):
        return layer_sensitivity(gate_up, down, act, p, ["w2g32"], "rtn", token_fisher=fisher)

    plain = delta(profile(weights))
    assert (plain > 0).all()
    np.testing.assert_allclose(delta(profile(weights), [torch.full((m, 1), 2.5)] * experts), 2.5 * plain, rtol=1e-12)
    np.testing.assert_allclose(delta(profile(weights), [torch.full((m, hidden), 2.5)] * experts), 2.5 * plain, rtol=1e-12)
    one_off = torch.ones(m, 1)
    one_off[2] = 0
    dropped = weights.clone()
    dropped[:, 2] = 0
    np.testing.assert_allclose(delta(profile(weights), [one_off] * experts), delta(profile(dropped)), rtol=1e-12)
    assert (delta(profile(dropped)) < plain).all()
    # weight only on dimension 0: Δ = Σ_t w_t² δ_{t,0}², directly from the quantized outputs
    only = torch.zeros(m, hidden)
    only[:, 0] = 1
    got = delta(profile(weights), [only] * experts)
    fake = quantize_unit(down[1], torch.zeros(inter, inter), parse_scheme("w2g32"), "rtn").fake_quantized
    err = expert_output(x[1], gate_up[1], fake, act) - expert_output(x[1], gate_up[1], down[1], act)
    assert got[1, 1, 0] == pytest.approx(float((weights[1].double() ** 2 * err[:, 0].double() ** 2).sum()), rel=1e-6)


def test_token_weights_in_the_pipeline(run, source, calib, tmp_path):
    """token_weights="fisher"/"fisher-diag": the per-token Fisher is computed once next to the
    profile, Δ gets its own cache entries, and no per-layer gains are applied on top."""
    common = {"wbits": 3.25, "r": 1.0, "cache_dir": str(run.out_dir / "cache"), **FAST}
    iso = quantize_mxmoe(source, calib, tmp_path / "iso", token_weights="fisher", budget_scope="model", **common)
    assert iso.stages["profile"] == "cached" and iso.stages["token_fisher"] == "computed"
    assert iso.stages["sensitivity"] == "computed" and iso.stages["layer_gains"] == "skipped"
    assert all(e["loss_weight"] == 1.0 for e in iso.report["layers"])
    diag = quantize_mxmoe(source, calib, tmp_path / "diag", token_weights="fisher-diag", **common)
    assert diag.stages["token_fisher"] == "cached" and diag.stages["sensitivity"] == "computed"
    assert diag.report["predicted_loss"] != run.report["predicted_loss"]
    again = quantize_mxmoe(source, calib, tmp_path / "again", token_weights="fisher-diag", **common)
    assert again.stages["sensitivity"] == "cached" and again.stages["token_fisher"] == "skipped"  # not loaded
    assert again.report["predicted_loss"] == diag.report["predicted_loss"]
    assert run.stages["token_fisher"] == "skipped"
    with pytest.raises(PipelineError, match="token-weights"):
        quantize_mxmoe(source, calib, tmp_path / "bad", wbits=3.25, token_weights="hessian", **FAST)


# -- errors ---------------------------------------------------------------------------


def test_budget_outside_the_schemes_is_rejected(source, calib, tmp_path):
    with pytest.raises(PipelineError, match="below the cheapest"):
        quantize_mxmoe(source, calib, tmp_path / "a", wbits=2.0, **FAST)
    with pytest.raises(PipelineError, match="above the richest"):
        quantize_mxmoe(source, calib, tmp_path / "b", wbits=4.5, schemes=["w2g128", "w4g128"], **FAST)


def test_unknown_scheme_is_rejected(source, calib, tmp_path, capsys):
    with pytest.raises(PipelineError, match="unknown scheme 'w5g128'"):
        quantize_mxmoe(source, calib, tmp_path / "a", wbits=3.0, schemes=["w2g128", "w5g128"], **FAST)
    with pytest.raises(SystemExit):  # argparse rejects it at the command line
        quantize_main(["--model", str(source), "--calib", str(calib), "--wbits", "3", "--schemes", "w5g128",
                       "--out", str(tmp_path / "b")])  # fmt: skip
    assert "w5g128" in capsys.readouterr().err


def test_wbits_and_scheme_are_mutually_exclusive(source, tmp_path):
    with pytest.raises(SystemExit):
        quantize_main(["--model", str(source), "--wbits", "3", "--scheme", "w4g128", "--out", str(tmp_path)])


def test_calibration_errors(source, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(CalibrationError, match="empty"):
        quantize_mxmoe(source, empty, tmp_path / "a", wbits=3.25, **FAST)
    with pytest.raises(CalibrationError, match="too short"):
        quantize_mxmoe(source, short, tmp_path / "b", wbits=3.25, **FAST)
    with pytest.raises(CalibrationError, match="max_position_embeddings=512"):
        quantize_mxmoe(source, short, tmp_path / "c", wbits=3.25, **{**FAST, "seq_len": 1024})
    with pytest.raises(PipelineError, match="--calib"):
        quantize_mxmoe(source, None, tmp_path / "d", wbits=3.25, **FAST)


def test_model_without_moe_layers_is_rejected(calib, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = make_config("qwen3_moe")
    cfg.mlp_only_layers = list(range(cfg.num_hidden_layers))  # dense MLPs everywhere
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    with pytest.raises(ModelSpecError, match="no MoE expert weights"):
        quantize_mxmoe(tmp_path / "dense", calib, tmp_path / "q", wbits=3.25, **FAST)
    code = quantize_main(["--model", str(tmp_path / "dense"), "--calib", str(calib), "--wbits", "3.25",
                          "--out", str(tmp_path / "q")])  # fmt: skip
    assert code == 2


def test_scheme_without_calibration_keeps_the_rtn_path(source, tmp_path):
    assert quantize_main(["--model", str(source), "--scheme", "w4g128", "--out", str(tmp_path / "q")]) == 0
    assert not (tmp_path / "q" / "report.json").exists()  # the plain RTN export, no pipeline
    assert read_quant_config(str(tmp_path / "q")).rotation == {"kind": "none"}


# -- end to end -----------------------------------------------------------------------


@pytest.mark.slow
def test_mxmoe_quantize_command_output_serves_in_vllm(source, calib, tmp_path):
    out = tmp_path / "q"
    argv = ["--model", str(source), "--calib", str(calib), "--wbits", "3.25", "--r", "auto",
            "--calib-tokens", "1024", "--seq-len", "128", "--out", str(out)]  # fmt: skip
    assert quantize_main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["achieved_avg_bits"] <= 3.25 and report["rotation"]["kind"] == "hadamard"

    prompts = [[5, 17, 300, 42, 7, 1999], [100, 200, 300]]
    got = vllm_generate(out, prompts, 8, tmp_path)
    deq = dequantize_checkpoint(out, tmp_path / "dq")
    for result, prompt in zip(got, prompts):
        tokens, logprobs = hf_greedy(deq, prompt, 8)
        assert result["token_ids"] == tokens
        torch.testing.assert_close(
            torch.tensor(result["logprobs"]), torch.tensor(logprobs), atol=2e-3, rtol=1e-3
        )


def test_model_too_large_for_the_gpu_is_a_clear_error(source, monkeypatch):
    from transformers import AutoModelForCausalLM

    from offline.pipeline import check_fits_device

    model = AutoModelForCausalLM.from_pretrained(str(source))
    need = sum(t.numel() for t in [*model.parameters(), *model.buffers()]) * 4
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (need - 1, 2 * need))
    with pytest.raises(PipelineError, match=r"float32 weights on cuda:0.*--device cpu"):
        check_fits_device(model, torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (need, 2 * need))
    check_fits_device(model, torch.device("cuda:0"))  # fits exactly
    check_fits_device(model, torch.device("cpu"))  # no check on the host
