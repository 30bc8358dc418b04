"""``mxmoe-quantize``: HF MoE checkpoint -> MxMoE checkpoint.

Two modes:

* MxMoE (``--wbits B --calib FILE``): profile, sensitivity, ILP allocation under
  a budget of B bits per expert weight, optional Hadamard rotation, GPTQ/RTN
  (offline.pipeline).
* Given allocation (``--scheme S`` or ``--scheme-map MAP``): without --calib,
  plain RTN of the source weights (also shared experts with
  --shared-expert-scheme); with --calib (and/or --hadamard, --method gptq) the
  same allocation goes through the pipeline's rotation and GPTQ.
"""

from __future__ import annotations

import argparse
import sys

from vllm_mxmoe.format import read_quant_config
from vllm_mxmoe.schemes import DEFAULT_SCHEMES, UnknownSchemeError, parse_scheme
from vllm_mxmoe.sharding import describe_problems, max_tp_degree, shard_problems

from .calibration import DEFAULT_CALIB_TOKENS, DEFAULT_SEQ_LEN
from .export import build_quant_config, export_checkpoint
from .gptq import CLIP_MODES, DEFAULT_PERCDAMP
from .model_spec import ModelSpecError, inspect_model
from .pipeline import (
    BUDGET_SCOPES,
    DEFAULT_BATCH_TOKENS,
    DEFAULT_BUDGET_SCOPE,
    DEFAULT_CLIP,
    DEFAULT_LAYER_WEIGHTS,
    DEFAULT_R,
    DEFAULT_TOKEN_WEIGHTS,
    LAYER_WEIGHTS,
    TOKEN_WEIGHTS,
    quantize_mxmoe,
)
from .profile import DEFAULT_HOLDOUT, DEFAULT_SAMPLE_TOKENS, HESSIAN_WEIGHTS
from .quant_grid import quantize_rtn
from .scheme_map import SchemeMapError, load_scheme_map, resolve_scheme_map, uniform_map
from .sequential import FP_TARGET_PERCDAMP, SEQUENTIAL_TARGETS


def _r_value(text: str) -> float | str:
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'auto', got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'auto', got {text!r}")
    return value


def _scheme_list(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    for name in names:
        try:
            parse_scheme(name)
        except UnknownSchemeError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return names


def _tp_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(t < 1 for t in sizes):
        raise argparse.ArgumentTypeError(f"tensor-parallel sizes must be >= 1, got {text!r}")
    return sizes


def report_sharding(out_dir: str, model: str, tp_sizes: tuple[int, ...]) -> list[str]:
    """Print which TP degrees the written checkpoint can be served at; return the warnings."""
    qcfg = read_quant_config(out_dir)
    spec = inspect_model(model)
    args = (qcfg.experts, qcfg.schemes, spec.hidden_size, spec.expert_intermediate_size)
    warnings = describe_problems(shard_problems(*args, list(tp_sizes)))
    for line in warnings:
        print(f"mxmoe-quantize: warning: {line}", file=sys.stderr)
    print(f"experts shard up to --tensor-parallel-size {max_tp_degree(*args)} (any degree with --enable-expert-parallel)")
    return warnings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mxmoe-quantize",
        description="Quantize the experts of a Hugging Face MoE model, each block in its own scheme.",
    )
    p.add_argument("--model", required=True, help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output folder for the MxMoE checkpoint")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--wbits", type=float, help="MxMoE: average bits per expert weight (scales/zeros counted)"
    )
    which.add_argument("--scheme", help="one scheme for every expert block, e.g. w4g128")
    which.add_argument("--scheme-map", help="JSON file with per-layer / per-expert schemes")
    p.add_argument(
        "--method", choices=["gptq", "rtn"],
        help="weight rounding (default: gptq with --wbits or --calib, else rtn)",
    )  # fmt: skip
    p.add_argument(
        "--tp-sizes", type=_tp_sizes, default=(),
        help="tensor-parallel degrees you plan to serve at, e.g. 2,4: warn if a chosen down scheme cannot be split "
        "that many ways (expert parallelism has no such limit)",
    )  # fmt: skip
    p.add_argument(
        "--shared-expert-scheme",
        help="also quantize shared-expert linears with this scheme (RTN mode only; default: keep them unquantized)",
    )

    mx = p.add_argument_group("MxMoE pipeline")
    mx.add_argument("--calib", help="calibration text file (needed for --wbits and --method gptq)")
    mx.add_argument(
        "--schemes", type=_scheme_list, default=DEFAULT_SCHEMES,
        help=f"candidate schemes for --wbits, comma separated (default: {','.join(DEFAULT_SCHEMES)})",
    )  # fmt: skip
    mx.add_argument(
        "--r", type=_r_value, default=DEFAULT_R,
        help=f"accuracy/speed trade-off in [0, 1] (1: accuracy only) or 'auto' (Pareto knee); default {DEFAULT_R}",
    )  # fmt: skip
    mx.add_argument(
        "--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
        help="tokens per forward pass the time model assumes (expert load = activation frequency x this)",
    )  # fmt: skip
    mx.add_argument("--perf-table", help="measured kernel times (JSON from benchmarks/); roofline without")
    mx.add_argument(
        "--hadamard", action=argparse.BooleanOptionalAction, default=None,
        help="rotate the residual stream with a randomized Hadamard before quantizing (default: on in the pipeline)",
    )  # fmt: skip
    mx.add_argument("--seed", type=int, default=0, help="seed of the Hadamard signs and of token sampling")
    mx.add_argument("--granularity", choices=["block", "expert"], default="block",
                    help="one scheme per block (gate_up, down) or per expert")  # fmt: skip
    mx.add_argument(
        "--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS, help="calibration tokens to use"
    )
    mx.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="calibration sequence length")
    mx.add_argument(
        "--sample-tokens", type=int, default=DEFAULT_SAMPLE_TOKENS,
        help="routed tokens kept per expert to measure sensitivities",
    )  # fmt: skip
    mx.add_argument(
        "--holdout", type=float, default=DEFAULT_HOLDOUT,
        help="share of calibration sequences that only measure sensitivities, not fit GPTQ "
        "(default 0: measure on GPTQ's own tokens, as the paper does)",
    )  # fmt: skip
    mx.add_argument(
        "--percdamp", type=float, default=None,
        help=f"GPTQ dampening as a share of the Hessian's mean diagonal (default {FP_TARGET_PERCDAMP} with "
        f"--sequential-target fp, the default, else {DEFAULT_PERCDAMP})",
    )  # fmt: skip
    mx.add_argument(
        "--refit-scales", type=int, default=0, metavar="ROUNDS",
        help="after GPTQ, re-solve each row's group scales by least squares on its codes (output "
        "error under the Hessian), ROUNDS times, with another GPTQ pass between rounds (default 0: off)",
    )  # fmt: skip
    mx.add_argument(
        "--refine-codes", type=int, default=0, metavar="SWEEPS",
        help="after GPTQ, SWEEPS sweeps of coordinate descent on the codes of 2-bit blocks: each code "
        "moves one step where that lowers the output error under the Hessian (default 0: off)",
    )  # fmt: skip
    mx.add_argument(
        "--sequential", action=argparse.BooleanOptionalAction, default=None,
        help="GPTQ in model order (default with --method gptq): each MoE layer's Hessians come from the "
        "already quantized layers before it, not from the unquantized model; about 2-2.5x the "
        "quantization time of --no-sequential, which uses the profile's Hessians (the paper's)",
    )  # fmt: skip
    mx.add_argument(
        "--sequential-target", choices=SEQUENTIAL_TARGETS, default=None,
        help="with --sequential, what GPTQ fits: fp = the unquantized model's outputs (default; GPTAQ: "
        "the weight is shifted by W C (H + λI)^-1, C the cross-covariance of fp and quantized inputs); "
        "quantized = the unquantized weights on the quantized model's inputs (GPTQ's own loop)",
    )  # fmt: skip
    mx.add_argument(
        "--hessian-weights", choices=HESSIAN_WEIGHTS, default="none",
        help="GPTQ Hessians: none = X^T X over an expert's routed tokens (default); routing = each "
        "token weighted by its squared routing weight (the MoE layer's output error, as Δ measures it)",
    )  # fmt: skip
    mx.add_argument(
        "--budget-scope", choices=BUDGET_SCOPES, default=DEFAULT_BUDGET_SCOPE,
        help="layer: every MoE layer meets --wbits on its own (one ILP per layer, the paper's); "
        "model: --wbits is the average over all MoE layers (one ILP, bits move between layers). "
        f"Default {DEFAULT_BUDGET_SCOPE}",
    )  # fmt: skip
    mx.add_argument(
        "--layer-weights", choices=LAYER_WEIGHTS, default=DEFAULT_LAYER_WEIGHTS,
        help="with --budget-scope model: fisher weighs each layer's sensitivities by the mean squared loss "
        f"gradient at its output (one backward pass over a few calibration sequences); none: raw. "
        f"Default {DEFAULT_LAYER_WEIGHTS}",
    )  # fmt: skip
    mx.add_argument(
        "--token-weights", choices=TOKEN_WEIGHTS, default=DEFAULT_TOKEN_WEIGHTS,
        help="weigh each sampled token's output error in the sensitivities by its own squared loss "
        "gradient at the layer output: fisher-diag per dimension, fisher its mean (one backward pass per "
        "calibration sequence; replaces --layer-weights). Default none",
    )  # fmt: skip
    mx.add_argument(
        "--clip", choices=CLIP_MODES, default=DEFAULT_CLIP,
        help="quantization grid per group: mse (clipping search minimising the rounding error) or minmax; "
        f"default {DEFAULT_CLIP}",
    )  # fmt: skip
    mx.add_argument("--cache-dir", help="where profile/sensitivity caches live (default: OUT/cache)")
    mx.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    return p


def _uses_pipeline(args: argparse.Namespace) -> bool:
    return args.wbits is not None or bool(args.calib) or bool(args.hadamard) or args.method == "gptq"


def quantize(args: argparse.Namespace) -> str:
    """The RTN path: a given allocation, source weights as they are."""
    spec = inspect_model(args.model)
    if args.scheme:
        parse_scheme(args.scheme)
        raw = uniform_map(args.scheme, args.shared_expert_scheme)
    else:
        raw = load_scheme_map(args.scheme_map)
        if args.shared_expert_scheme:
            raw = {**raw, "shared_experts": args.shared_expert_scheme}
    experts, linears = resolve_scheme_map(raw, spec)
    qcfg = build_quant_config(spec, experts, linears)
    out = export_checkpoint(
        args.model, args.out, spec, qcfg, lambda _name, w, scheme: quantize_rtn(w, scheme)
    )
    return str(out)


def run_pipeline(args: argparse.Namespace) -> str:
    if args.shared_expert_scheme:
        raise ValueError(
            "--shared-expert-scheme works only in the RTN mode (--scheme/--scheme-map without --calib)"
        )
    if args.scheme:
        parse_scheme(args.scheme)
        scheme_map = uniform_map(args.scheme)
    elif args.scheme_map:
        scheme_map = load_scheme_map(args.scheme_map)
    else:
        scheme_map = None
    result = quantize_mxmoe(
        args.model, args.calib, args.out,
        wbits=args.wbits, scheme_map=scheme_map, schemes=args.schemes, r=args.r,
        batch_tokens=args.batch_tokens, perf_table=args.perf_table, method=args.method or "gptq",
        hadamard=True if args.hadamard is None else args.hadamard, seed=args.seed,
        granularity=args.granularity, calib_tokens=args.calib_tokens, seq_len=args.seq_len,
        sample_tokens=args.sample_tokens, holdout=args.holdout, cache_dir=args.cache_dir, device=args.device,
        budget_scope=args.budget_scope, clip=args.clip, layer_weights=args.layer_weights,
        token_weights=args.token_weights,
        hessian_weights=args.hessian_weights, percdamp=args.percdamp, sequential=args.sequential,
        sequential_target=args.sequential_target,
        refit_rounds=args.refit_scales, refine_sweeps=args.refine_codes,
    )  # fmt: skip
    report = result.report
    print(
        f"expert weights: {report['achieved_avg_bits']:.4f} bits on average"
        + (f" (budget {args.wbits})" if args.wbits is not None else "")
        + f"; stages: {', '.join(f'{k} {v}' for k, v in result.stages.items())}"
    )
    seconds = report.get("stage_seconds", {})
    print(f"time on {report.get('device')}: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if v >= 0.5))
    return str(result.out_dir)


def quantize_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = run_pipeline(args) if _uses_pipeline(args) else quantize(args)
        report_sharding(out, args.model, args.tp_sizes)
    except (ModelSpecError, SchemeMapError, UnknownSchemeError, ValueError, OSError) as e:
        print(f"mxmoe-quantize: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(quantize_main())
