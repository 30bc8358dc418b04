"""``mxmoe-quantize``: HF MoE checkpoint -> MxMoE checkpoint."""

from __future__ import annotations

import argparse
import sys

from vllm_mxmoe.schemes import UnknownSchemeError, parse_scheme

from .export import build_quant_config, export_checkpoint
from .model_spec import ModelSpecError, inspect_model
from .quant_grid import quantize_rtn
from .scheme_map import SchemeMapError, load_scheme_map, resolve_scheme_map, uniform_map


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mxmoe-quantize",
        description="Quantize the experts of a Hugging Face MoE model, each block in its own scheme.",
    )
    p.add_argument("--model", required=True, help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output folder for the MxMoE checkpoint")
    p.add_argument("--method", choices=["rtn"], default="rtn", help="weight rounding method")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--scheme", help="one scheme for every expert block, e.g. w4g128")
    which.add_argument("--scheme-map", help="JSON file with per-layer / per-expert schemes")
    p.add_argument(
        "--shared-expert-scheme",
        help="also quantize shared-expert linears with this scheme (default: keep them unquantized)",
    )
    return p


def quantize(args: argparse.Namespace) -> str:
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
    out = export_checkpoint(args.model, args.out, spec, qcfg, lambda _name, w, scheme: quantize_rtn(w, scheme))
    return str(out)


def quantize_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = quantize(args)
    except (ModelSpecError, SchemeMapError, UnknownSchemeError, ValueError) as e:
        print(f"mxmoe-quantize: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(quantize_main())
