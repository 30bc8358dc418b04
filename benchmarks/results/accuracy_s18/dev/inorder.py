"""s18 dev: sensitivities Δ measured in model order with the quantizer that stores the blocks.

Today Δ comes from the profile (unquantized inputs, plain GPTQ with the profile's Hessian), while the blocks are
stored by GPTQ in model order fitting the unquantized model's outputs (fp target, GPTAQ). Here, per MoE layer in
model order:
  1. paired (H, C) of gate_up on the quantized stream (inputs from the already quantized layers) and, with gate_up
     still unquantized, of down; every candidate scheme of every (expert, unit) quantized as the pipeline stores it
     (GPTQ of the fp_target-shifted weight) and Δ measured as layer_sensitivity does, on the profile's sampled
     tokens (same routing weights, count/sample scale and Fisher token weights), but with the quantized block
     applied to the token's input in the quantized stream and the reference the unquantized expert on the token's
     fp input: Δ = scale Σ_t w_t² Σ_d f_td (ŷ_e(x̃_t) - y_e(x_t))_d². With no quantized layer upstream (x̃ = x, C = 0)
     this is exactly the profile's Δ.
  2. the layer's ILP (per-layer budget) on that Δ (pipeline._allocate on one layer);
  3. gate_up stored with the chosen candidate (already computed in 1), then down's (H, C) re-measured through the
     quantized gate_up and down quantized with its chosen scheme (as sequential.quantize_in_model_order does).
Order: down's Δ is measured on inputs from the unquantized gate_up (gate_up's scheme is not known before the ILP,
which allocates both units jointly; Δ is close to additive over the two units, RESULTS.md section 3).

Usage: python inorder.py NAME[,NAME...], NAME = {control,inorder,inorder2}-seed{0,1}[-test]. control: the whole
pipeline as today (Δ from the cached profile sensitivities); inorder: the above; inorder2: the above, then down's Δ
measured again through the quantized gate_up and down re-allocated with gate_up pinned (_reallocate_down). Session 12's best 2.25-bit setting with today's
default quantizer (fp target, damping 0.3), whole pipeline, 131072 calibration tokens. Caches: copies of sessions
16/17's caches (profile, token Fisher, Δ at damping 0.3) in /tmp/s18acc/cache_seed{0,1}; the in-order path never
reads or writes the sensitivity-*.pt files. Eval: 44 windows of valid.txt (every 20th), or test.txt with -test."""
import sys, json, time
sys.path.insert(0, "/work/main")
import numpy as np
import torch
torch.set_num_threads(1)
from pathlib import Path
from tqdm import tqdm
from offline import pipeline as P
from offline.evaluate import token_windows, perplexity_hf
from offline.model_spec import inspect_model
from offline.perf_model import PerfModel
from offline.profile import decoder_layers, find_moe_layers, _first_layer_inputs, _routing_arguments
from offline.sensitivity import expert_output, quantize_unit, weighted_error
from offline.profile import pre_hook as _pre_hook  # was sequential._pre_hook (moved in session 18)
from offline.sequential import fp_target, _advance, _record_paired
from vllm_mxmoe.schemes import parse_scheme

SH = Path("/work/shared"); MODEL = SH / "reference-moe"; CAL = SH / "corpus" / "calib.txt"
S3S = ("w2", "w2g128", "w3g128", "w4g128", "w8", "w3g128_sym", "w4g128_sym")
BEST225 = {"wbits": 2.25, "r": 1.0, "schemes": S3S, "token_weights": "fisher-diag", "refine_sweeps": 2,
           "sequential": True, "sequential_target": "fp", "percdamp": 0.3}
HERE = Path(__file__).parent


@torch.no_grad()
def allocate_in_model_order(model, moe_layers, sequences, batch_size, schemes, quantize, samples, solve,
                            hessian_weights="none", percdamp=0.3, diag=None, down_after_gate_up=False):
    """quantize(weight, hessian, scheme) -> QuantizedUnit; samples(moe, e) -> (token ids, routing weights, scale,
    fisher or None, fp inputs from the profile); solve(moe, loss [E, 2, S]) -> (gate_up schemes, down schemes).
    Returns ({(prefix, unit, e): QuantizedUnit}, {prefix: loss})."""
    model.eval()
    device = next(model.parameters()).device
    by_index = {layer.index: layer for layer in moe_layers}
    batches = _first_layer_inputs(model, sequences, batch_size, device)
    fp_batches = [[b[0].clone(), b[1], b[2]] for b in batches]
    units, losses = {}, {}
    for index, layer in enumerate(tqdm(decoder_layers(model)[: max(by_index) + 1], desc="Δ+quantize in order")):
        moe = by_index.get(index)
        if moe is None:
            _advance(layer, batches)
            _advance(layer, fp_batches)
            continue
        experts = moe.experts
        act = experts.act_fn
        original = {name: getattr(experts, name).data.clone() for name in ("gate_up_proj", "down_proj")}
        fp_inputs = _advance(layer, fp_batches, capture=experts)
        try:
            q_inputs = []

            def keep(module, args, kwargs):
                q_inputs.append(_routing_arguments(args, kwargs)[0].detach().clone())

            with _pre_hook(experts, keep):  # the quantized stream's expert inputs, in the same pass
                h_gu, c_gu = _record_paired(layer, moe, batches, fp_inputs, "gate_up", original["gate_up_proj"],
                                            hessian_weights)
            # down's (H, C) with gate_up unquantized: its scheme is chosen below, jointly with down's
            h_d, c_d = _record_paired(layer, moe, batches, fp_inputs, "down", original["gate_up_proj"],
                                      hessian_weights)
            hidden = experts.gate_up_proj.shape[2]
            x_q_all = torch.cat([t.reshape(-1, hidden) for t in q_inputs])
            x_fp_all = torch.cat([t.reshape(-1, hidden) for t in fp_inputs])
            num_experts = experts.gate_up_proj.shape[0]
            loss = np.zeros((num_experts, 2, len(schemes)))
            gate_up_candidates = {}
            for e in range(num_experts):
                ids, weights, scale, fisher, profile_x = samples(moe, e)
                g, d = original["gate_up_proj"][e].float(), original["down_proj"][e].float()
                g_target = fp_target(g, h_gu[e], c_gu[e], percdamp)
                d_target = fp_target(d, h_d[e], c_d[e], percdamp)
                measured = ids.numel() > 0
                if measured:
                    x_q, x_fp = x_q_all[ids], x_fp_all[ids]
                    if diag is not None:  # the fp stream must be the profile's inputs (position mapping check)
                        diag.setdefault("fp_input_maxdiff", []).append(float((x_fp - profile_x).abs().max()))
                        diag.setdefault("input_rel_err", {}).setdefault(moe.prefix, []).append(
                            float((x_q - x_fp).norm() / x_fp.norm()))
                    reference = expert_output(x_fp, g, d, act)
                for s, name in enumerate(schemes):
                    q = gate_up_candidates[(e, name)] = quantize(g_target, h_gu[e], name)
                    qd = quantize(d_target, h_d[e], name)
                    if measured:
                        loss[e, 0, s] = scale * weighted_error(expert_output(x_q, q.fake_quantized, d, act),
                                                               reference, weights, fisher)
                        loss[e, 1, s] = scale * weighted_error(expert_output(x_q, g, qd.fake_quantized, act),
                                                               reference, weights, fisher)
            losses[moe.prefix] = loss
            gate_up_schemes, down_schemes = solve(moe, loss)
            for e, name in enumerate(gate_up_schemes):
                q = units[(moe.prefix, "gate_up", e)] = gate_up_candidates[(e, name)]
                experts.gate_up_proj.data[e] = q.fake_quantized.to(experts.gate_up_proj.dtype)
            del gate_up_candidates
            # down fitted through the quantized gate_up, as quantize_in_model_order does
            h_d, c_d = _record_paired(layer, moe, batches, fp_inputs, "down", original["gate_up_proj"],
                                      hessian_weights)
            if down_after_gate_up:  # variant: down's Δ again, now through the quantized gate_up; down re-allocated
                down_schemes = _reallocate_down(moe, experts, original, loss, gate_up_schemes, schemes, h_d, c_d,
                                                x_q_all, x_fp_all, samples, quantize, solve, percdamp)
            for e, name in enumerate(down_schemes):
                w = fp_target(original["down_proj"][e], h_d[e], c_d[e], percdamp)
                q = units[(moe.prefix, "down", e)] = quantize(w, h_d[e], name)
                experts.down_proj.data[e] = q.fake_quantized.to(experts.down_proj.dtype)
            _advance(layer, batches)
        finally:
            for name, tensor in original.items():
                getattr(experts, name).data.copy_(tensor)
    return units, losses


def _reallocate_down(moe, experts, original, loss, gate_up_schemes, schemes, h_d, c_d, x_q_all, x_fp_all, samples,
                     quantize, solve, percdamp):
    """Down's Δ with the layer's gate_up already quantized (experts.gate_up_proj), every candidate fitted as it
    would be stored, then the layer's ILP again with gate_up pinned to its chosen schemes (a penalty on the
    others). ``loss`` [E, 2, S] gets the new down Δ in place."""
    act = experts.act_fn
    for e in range(loss.shape[0]):
        ids, weights, scale, fisher, _ = samples(moe, e)
        if ids.numel() == 0:
            continue
        g, d = original["gate_up_proj"][e].float(), original["down_proj"][e].float()
        g_q = experts.gate_up_proj[e].float()
        x_q, reference = x_q_all[ids], expert_output(x_fp_all[ids], g, d, act)
        d_target = fp_target(d, h_d[e], c_d[e], percdamp)
        for s, name in enumerate(schemes):
            qd = quantize(d_target, h_d[e], name)
            loss[e, 1, s] = scale * weighted_error(expert_output(x_q, g_q, qd.fake_quantized, act), reference,
                                                   weights, fisher)
    pinned = loss.copy()
    penalty = 1e3 * (float(loss.max()) + 1.0)
    for e, name in enumerate(gate_up_schemes):
        pinned[e, 0, :] = penalty
        pinned[e, 0, schemes.index(name)] = 0.0
    gate_up_again, down_schemes = solve(moe, pinned, loss)
    assert list(gate_up_again) == list(gate_up_schemes), "gate_up moved in the down-only re-solve"
    return down_schemes


class InOrderPipeline(P._Pipeline):
    """The pipeline with Δ, allocation and quantization in one pass in model order (fixed budget, r given)."""

    down_after_gate_up = False

    @torch.no_grad()
    def run(self):
        o = self.opts
        assert o.scheme_map is None and o.budget_scope == "layer" and o.r != "auto" and o.sequential
        assert o.sequential_target == "fp" and o.effective_holdout == 0
        self.spec = spec = inspect_model(self.model_dir)
        P.check_budget(spec, o.schemes, o.wbits, o.granularity)
        perf = PerfModel.from_json(o.perf_table) if o.perf_table else PerfModel()
        sequences = self._calibration()
        model, rotation = self._load_model()
        moe_layers = find_moe_layers(model, spec)
        store = self._profile(model, moe_layers, sequences)
        fisher = self._token_fisher(model, moe_layers, store, sequences)
        profiles, results = {}, {}

        def samples(moe, e):
            if moe.prefix not in profiles:
                p = store.load(moe.prefix)
                profiles[moe.prefix] = (p, None if fisher is None else self._expert_fisher(fisher, moe, p))
            p, f = profiles[moe.prefix]
            x, w = p.samples(e)
            scale = float(p.counts[e]) / max(x.shape[0], 1)
            return p.sample_token_ids(e), w, scale, None if f is None else f[e], x

        def quantize(weight, hessian, scheme):
            return quantize_unit(weight.float(), hessian, parse_scheme(scheme), o.method, o.clip, o.percdamp,
                                 o.refit_rounds, o.refine_sweeps)

        def solve(moe, loss, report_loss=None):
            (result,) = self._allocate([moe], store, {moe.prefix: loss}, perf)
            if report_loss is not None:  # the pinned re-solve: report the measured Δ, not the penalties
                result.loss = report_loss
            results[moe.prefix] = result
            return result.gate_up, result.down

        self.diag = {}
        fitted, self.inorder_losses = allocate_in_model_order(
            model, moe_layers, sequences, o.batch_size, o.schemes, quantize, samples, solve, o.hessian_weights,
            o.percdamp, self.diag, self.down_after_gate_up)
        self.stages["sensitivity"] = "in model order"
        layers = [results[m.prefix] for m in moe_layers]
        packed = self._quantize(moe_layers, store, layers, fitted)
        self._export(model, rotation, layers, packed)
        report = self._report(layers, rotation)
        return P.PipelineResult(self.out, report, dict(self.stages))


def allocation(report):
    return {L["prefix"]: ([e["gate_up"]["scheme"] for e in L["experts"]], [e["down"]["scheme"] for e in L["experts"]])
            for L in report["layers"]}


def main():
    for name in sys.argv[1].split(","):
        mode, seed, *test = name.split("-")
        seed = int(seed.removeprefix("seed"))
        opts = P.QuantizeOptions(**BEST225, seed=seed, cache_dir=f"/tmp/s18acc/cache_seed{seed}")
        opts.validate()
        out = Path("/tmp/s18acc/out") / name
        t0 = time.time()
        cls = InOrderPipeline if mode.startswith("inorder") else P._Pipeline
        pipe = cls(MODEL, CAL, out, opts)
        pipe.down_after_gate_up = mode == "inorder2"
        r = pipe.run()
        quantize_s = time.time() - t0
        row = dict(name=name, mode=mode, seed=seed, avg_bits=r.report["achieved_avg_bits"], stages=r.stages,
                   quantize_s=round(quantize_s, 1))
        if mode.startswith("inorder"):
            control = Path(f"/tmp/s18acc/out/control-seed{seed}/report.json")
            if control.is_file():  # blocks whose scheme changed against today's Δ
                a, b = allocation(json.load(open(control))), allocation(r.report)
                row["changed_blocks"] = sum(x != y for p in a for u in (0, 1) for x, y in zip(a[p][u], b[p][u]))
                row["blocks"] = sum(len(a[p][u]) for p in a for u in (0, 1))
            d = pipe.diag
            row["fp_input_maxdiff"] = max(d["fp_input_maxdiff"])
            row["input_rel_err_by_layer"] = {p.split(".")[2]: round(float(np.mean(v)), 4)
                                             for p, v in d["input_rel_err"].items()}
            torch.save({k: torch.from_numpy(v) for k, v in pipe.inorder_losses.items()},
                       f"/tmp/s18acc/inorder_loss_{name}.pt")
        text = "test.txt" if test else "valid.txt"
        windows = token_windows(MODEL, SH / "corpus" / text, 512, None)
        p = perplexity_hf(r.out_dir, windows if test else windows[::20])
        row.update(ppl=round(p.perplexity, 4), windows=p.windows, total_s=round(time.time() - t0, 1))
        print(json.dumps(row), flush=True)
        with open(HERE / ("results.jsonl" if not test else "../test_results.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
