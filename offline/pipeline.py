"""The offline MxMoE pipeline: HF MoE checkpoint + calibration text -> MxMoE checkpoint.

    rotate (optional) -> profile -> sensitivity -> allocate (ILP per layer) -> GPTQ/RTN -> export + report

* rotate: a randomized Hadamard rotation of the residual stream, applied to the
  float32 transformers model BEFORE profiling, so Hessians and sensitivities
  belong to the rotated weights, which are the ones exported.
* profile: Hessians and sensitivity samples from the calibration tokens, or
  (``holdout`` > 0) samples from held-out sequences only, so that Δ is GPTQ's
  error on tokens it did not fit.
* profile / sensitivity: cached under ``<out>/cache`` (or ``cache_dir``), keyed
  by a hash of everything they depend on; another --wbits, --r, --granularity
  or --batch-tokens reuses both.
* allocate: ``ilp.allocate`` at a fixed r, or the knee of the Pareto front
  (r="auto"); times come from the perf model at the tokens each expert sees
  (activation frequency x batch_tokens). By default (budget_scope="layer")
  every layer is solved alone within the budget (the paper's per-layer ILP);
  budget_scope="model" solves one ILP over all MoE layers, so the budget holds
  for the model's expert weights as a whole and bits can move between layers,
  with each layer's Δ weighted by its Fisher gain (layer_weights="fisher",
  profile.layer_output_gains) so that Δ of different layers is comparable. On
  the reference model the model-wide budget helped with min/max grids but not
  with the MSE-clipped ones (benchmarks/RESULTS.md), hence not the default.
  token_weights="fisher-diag" / "fisher" instead weighs every sampled token's
  output error by its own squared loss gradient (profile.token_output_fisher,
  one backward pass per calibration sequence, cached next to the profile):
  Δ is then comparable across layers by itself, and layer gains are not applied.
* grids: every scheme's per-group scale/zero come from an MSE clipping search
  (clip="mse", Hessian-diagonal weighted; "minmax" = the full range), the same
  for the sensitivity measurement, the allocation's quantization and a given
  (uniform) allocation.
* quantize: each block with its scheme through ``sensitivity.quantize_units``,
  the same function that measured Δ. By default (``sequential``, with GPTQ) the
  GPTQ Hessians are re-measured in model order through the already quantized
  layers and GPTQ fits the unquantized model's outputs there
  (``sequential_target="fp"``, GPTAQ; sequential.py), with dampening 0.3: the
  most accurate quantizer measured on the reference model at 2.25 and 3.25 bits,
  at about 2-2.5x the quantization time. What is stored then differs from what
  Δ predicted. ``sequential=False`` quantizes with the profile's Hessians (the
  paper's way), so the checkpoint holds exactly what Δ predicted;
  ``sequential_target="quantized"`` is GPTQ's own loop (W on the quantized inputs).

Instead of a budget, an allocation can be given (``scheme_map``: uniform or per
expert, as ``--scheme`` / ``--scheme-map``); then sensitivity and ILP are skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from vllm_mxmoe.format import ExpertLayerSchemes, QuantizedWeight
from vllm_mxmoe.schemes import DEFAULT_SCHEMES, Scheme, UnknownSchemeError, parse_scheme

from .calibration import (
    DEFAULT_CALIB_TOKENS,
    DEFAULT_SEQ_LEN,
    check_seq_len,
    load_calibration,
    model_max_positions,
)
from .export import build_quant_config, export_checkpoint
from .gptq import CLIP_MODES, DEFAULT_PERCDAMP, refines_codes_of
from .ilp import (
    UNITS,
    LayerProblem,
    allocate,
    joint_problem,
    knee_point,
    pareto_front,
    split_allocation,
    unit_shapes,
)
from .model_spec import MoEModelSpec, inspect_model, tensor_names
from .perf_model import PerfModel
from .profile import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_HOLDOUT,
    DEFAULT_SAMPLE_TOKENS,
    HESSIAN_WEIGHTS,
    MoELayer,
    ProfileStore,
    find_moe_layers,
    holdout_mask,
    layer_output_gains,
    profile_model,
    token_output_fisher,
)
from .report import LayerResult, build_report, plot_report, write_report
from .rotation import rotate_model_
from .scheme_map import resolve_scheme_map
from .sensitivity import METHODS, QuantizedUnit, layer_sensitivity, quantize_units
from .sequential import FP_TARGET_PERCDAMP, SEQUENTIAL_TARGETS, quantize_in_model_order

# Bump when what the caches hold changes meaning, so old caches are not reused.
# 3: profiles record the calibration position of every sampled token.
CACHE_VERSION = 3
DEFAULT_R = 0.75
DEFAULT_BATCH_TOKENS = 1024
GRANULARITIES = ("block", "expert")
BUDGET_SCOPES = ("layer", "model")
DEFAULT_BUDGET_SCOPE = "layer"
DEFAULT_CLIP = "mse"
LAYER_WEIGHTS = ("fisher", "none")
DEFAULT_LAYER_WEIGHTS = "fisher"
DEFAULT_HESSIAN_WEIGHTS = "none"
# Δ per token weighted by the loss's squared gradient at the layer output: per
# dimension ("fisher-diag"), its mean over dimensions ("fisher"), or not at all.
TOKEN_WEIGHTS = ("none", "fisher", "fisher-diag")
DEFAULT_TOKEN_WEIGHTS = "none"


class PipelineError(ValueError):
    """Options or inputs the pipeline cannot work with; the message says which."""


@dataclass(frozen=True)
class QuantizeOptions:
    """Options of quantize_mxmoe; the CLI flags of the same names."""

    wbits: float | None = None  # average bits per expert weight (scales/zeros counted)
    scheme_map: dict | None = None  # a fixed allocation instead of a budget (scheme_map.py format)
    schemes: tuple[str, ...] = DEFAULT_SCHEMES  # the allocator's candidates
    r: float | str = DEFAULT_R  # 1: accuracy only, 0: speed only, "auto": knee of the Pareto front
    batch_tokens: int = DEFAULT_BATCH_TOKENS  # tokens per forward the time model assumes
    perf_table: str | None = None  # measured kernel times (JSON); roofline without
    method: str = "gptq"
    hadamard: bool = True
    seed: int = 0  # of the Hadamard signs and the profile's token sampling
    granularity: str = "block"  # "expert": one scheme for all blocks of an expert
    # "layer": one ILP per layer, each within the budget (the paper's); "model": one ILP,
    # the budget holds for all MoE layers together (bits move between layers)
    budget_scope: str = DEFAULT_BUDGET_SCOPE
    clip: str = DEFAULT_CLIP  # quantization grid: "mse" clipping search or "minmax"
    # with budget_scope="model": "fisher" weighs each layer's Δ by the mean squared
    # gradient of the loss at its output (profile.layer_output_gains); "none": raw Δ
    layer_weights: str = DEFAULT_LAYER_WEIGHTS
    # "fisher-diag" / "fisher": each sampled token's error in Δ weighted by its own squared
    # loss gradient (diagonal / isotropic); replaces layer_weights' per-layer gains
    token_weights: str = DEFAULT_TOKEN_WEIGHTS
    calib_tokens: int = DEFAULT_CALIB_TOKENS
    seq_len: int = DEFAULT_SEQ_LEN
    sample_tokens: int = DEFAULT_SAMPLE_TOKENS  # routed tokens kept per expert for Δ
    holdout: float = DEFAULT_HOLDOUT  # share of calibration sequences measuring Δ, not fitting GPTQ
    # GPTQ Hessians: "none" = X^T X over an expert's routed tokens; "routing" = each token
    # weighted by its squared routing weight (the MoE layer's output error, as Δ measures it)
    hessian_weights: str = DEFAULT_HESSIAN_WEIGHTS
    # GPTQ dampening, a share of the Hessian's mean diagonal; None: FP_TARGET_PERCDAMP when GPTQ fits
    # the unquantized model's outputs (the default), else DEFAULT_PERCDAMP (GPTQ's own 0.01)
    percdamp: float | None = None
    # least-squares scale refits after GPTQ (gptq.refit_scales), GPTQ re-run between them
    refit_rounds: int = 0
    # coordinate-descent sweeps over GPTQ's codes of <= 2-bit blocks (gptq.refine_codes)
    refine_sweeps: int = 0
    # GPTQ Hessians from the already quantized layers before each MoE layer (sequential.py)
    # instead of the unquantized model's profile; None: on with GPTQ, off with RTN
    sequential: bool | None = None
    # with sequential: what GPTQ fits, "fp" = the unquantized model's outputs (W X, GPTAQ; the
    # default), "quantized" = the unquantized weights on the quantized inputs (W X̃, GPTQ's own loop)
    sequential_target: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE  # calibration sequences per forward
    cache_dir: str | None = None  # default: <out>/cache
    device: str | None = None  # default: cuda if available, else cpu

    def __post_init__(self) -> None:
        """Fill the options whose default depends on others (None above). The defaults are the quantizer
        measured best on the reference model at 2.25 and 3.25 bits (benchmarks/RESULTS.md section 3,
        sessions 16-17): GPTQ in model order fitting the unquantized model's outputs, dampening 0.3."""
        def fill(name: str, value) -> None:
            object.__setattr__(self, name, value)  # frozen: set once, here

        if self.sequential is None:
            fill("sequential", self.method == "gptq")
        if self.sequential_target is None and self.sequential:
            fill("sequential_target", "fp")
        if self.percdamp is None:
            fits_fp = self.sequential and self.sequential_target == "fp"
            fill("percdamp", FP_TARGET_PERCDAMP if fits_fp else DEFAULT_PERCDAMP)

    def validate(self) -> None:
        if (self.wbits is None) == (self.scheme_map is None):
            raise PipelineError("give exactly one of wbits (a budget) or scheme_map (a fixed allocation)")
        if self.wbits is not None and not (
            isinstance(self.wbits, (int, float)) and math.isfinite(self.wbits)
        ):
            raise PipelineError(f"wbits must be a finite number, got {self.wbits!r}")
        if not self.schemes:
            raise PipelineError("schemes: need at least one candidate scheme")
        for name in self.schemes:
            try:
                parse_scheme(name)
            except UnknownSchemeError as e:
                raise PipelineError(f"--schemes: {e}") from None
        if len(set(self.schemes)) != len(self.schemes):
            raise PipelineError(f"--schemes lists a scheme twice: {list(self.schemes)}")
        if self.r != "auto" and not (isinstance(self.r, (int, float)) and 0.0 <= self.r <= 1.0):
            raise PipelineError(f"--r must be a number in [0, 1] or 'auto', got {self.r!r}")
        if self.method not in METHODS:
            raise PipelineError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.granularity not in GRANULARITIES:
            raise PipelineError(
                f"--granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}"
            )
        if self.budget_scope not in BUDGET_SCOPES:
            raise PipelineError(
                f"--budget-scope must be one of {', '.join(BUDGET_SCOPES)}, got {self.budget_scope!r}"
            )
        if self.layer_weights not in LAYER_WEIGHTS:
            raise PipelineError(
                f"--layer-weights must be one of {', '.join(LAYER_WEIGHTS)}, got {self.layer_weights!r}"
            )
        if self.token_weights not in TOKEN_WEIGHTS:
            raise PipelineError(
                f"--token-weights must be one of {', '.join(TOKEN_WEIGHTS)}, got {self.token_weights!r}"
            )
        if not self.percdamp > 0:
            raise PipelineError(f"--percdamp must be positive, got {self.percdamp}")
        if not (isinstance(self.refit_rounds, int) and self.refit_rounds >= 0):
            raise PipelineError(f"--refit-scales must be a whole number >= 0, got {self.refit_rounds!r}")
        if self.refit_rounds and self.method != "gptq":
            raise PipelineError(
                f"--refit-scales refits GPTQ's grid; it needs --method gptq, not {self.method!r}"
            )
        if not (isinstance(self.refine_sweeps, int) and self.refine_sweeps >= 0):
            raise PipelineError(f"--refine-codes must be a whole number >= 0, got {self.refine_sweeps!r}")
        if self.refine_sweeps and self.method != "gptq":
            raise PipelineError(
                f"--refine-codes refines GPTQ's codes; it needs --method gptq, not {self.method!r}"
            )
        if self.hessian_weights not in HESSIAN_WEIGHTS:
            raise PipelineError(
                f"--hessian-weights must be one of {', '.join(HESSIAN_WEIGHTS)}, got {self.hessian_weights!r}"
            )
        if self.clip not in CLIP_MODES:
            raise PipelineError(f"--clip must be one of {', '.join(CLIP_MODES)}, got {self.clip!r}")
        for name in ("batch_tokens", "calib_tokens", "seq_len", "sample_tokens", "batch_size"):
            if not getattr(self, name) > 0:
                raise PipelineError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.holdout < 1.0:
            raise PipelineError(f"--holdout must be in [0, 1), got {self.holdout}")
        if self.sequential and self.method != "gptq":
            raise PipelineError(f"--sequential changes GPTQ's Hessians; it needs --method gptq, not {self.method!r}")
        if self.sequential_target is not None and not self.sequential:
            raise PipelineError(
                f"--sequential-target {self.sequential_target} chooses what GPTQ in model order fits; "
                "it needs --sequential (the default with --method gptq)"
            )
        if self.sequential_target is not None and self.sequential_target not in SEQUENTIAL_TARGETS:
            raise PipelineError(
                f"--sequential-target must be one of {', '.join(SEQUENTIAL_TARGETS)}, got {self.sequential_target!r}"
            )

    @property
    def effective_holdout(self) -> float:
        """Held-out tokens only measure sensitivities; a given allocation needs none."""
        return self.holdout if self.scheme_map is None else 0.0

    @property
    def needs_calibration(self) -> bool:
        """RTN with a given allocation needs no statistics; everything else does."""
        return self.wbits is not None or self.method == "gptq"


@dataclass
class PipelineResult:
    out_dir: Path
    report: dict[str, Any]
    stages: dict[str, str] = field(default_factory=dict)  # stage -> computed | cached | skipped


def quantize_mxmoe(model: str | Path, calib: str | Path | None, out: str | Path, **options) -> PipelineResult:
    """Quantize the HF MoE model in folder ``model`` into an MxMoE checkpoint in ``out``.

    ``options`` are the fields of QuantizeOptions (e.g. wbits=3.25, r="auto").
    Raises PipelineError / ModelSpecError / CalibrationError (all ValueError)
    with a message naming the problem.
    """
    if "schemes" in options:
        options["schemes"] = tuple(options["schemes"])
    opts = QuantizeOptions(**options)
    opts.validate()
    if calib is None and opts.needs_calibration:
        raise PipelineError("a calibration text (--calib) is needed for --wbits and for --method gptq")
    return _Pipeline(Path(model), None if calib is None else Path(calib), Path(out), opts).run()


def check_budget(spec: MoEModelSpec, schemes: tuple[str, ...], wbits: float, granularity: str) -> None:
    """Raise PipelineError unless some allocation of ``schemes`` meets ``wbits`` in every layer."""
    hidden, inter = spec.hidden_size, spec.expert_intermediate_size
    for unit, (n, k) in unit_shapes(hidden, inter).items():
        for name in schemes:
            try:
                parse_scheme(name).check_shape(n, k, where=f"expert {unit} [{n}, {k}]")
            except ValueError as e:
                raise PipelineError(f"--schemes: {e}") from None
    experts = next(iter(spec.expert_layers.values()))
    zeros = np.zeros((experts, len(UNITS), len(schemes)))
    lo, hi = LayerProblem.from_shapes(schemes, hidden, inter, zeros, zeros, 1.0).achievable_avg_bits(
        granularity
    )
    if wbits < lo:
        raise PipelineError(
            f"--wbits {wbits} is below the cheapest allocation ({lo:.4f} bits per weight, "
            f"scales and zeros included) of schemes {', '.join(schemes)}"
        )
    if wbits > hi:
        raise PipelineError(
            f"--wbits {wbits} is above the richest allocation ({hi:.4f} bits per weight) of schemes "
            f"{', '.join(schemes)}: add a wider scheme or lower the budget"
        )


# ---------------------------------------------------------------------------


class _Pipeline:
    def __init__(self, model_dir: Path, calib: Path | None, out: Path, opts: QuantizeOptions):
        self.model_dir, self.calib, self.out, self.opts = model_dir, calib, out, opts
        self.cache = Path(opts.cache_dir) if opts.cache_dir else out / "cache"
        self.device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.stages: dict[str, str] = {}
        self.seconds: dict[str, float] = {}  # wall time of each step of run(), for the report

    @contextlib.contextmanager
    def _timed(self, step: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = round(self.seconds.get(step, 0.0) + time.perf_counter() - start, 3)

    @torch.no_grad()
    def run(self) -> PipelineResult:
        opts = self.opts
        self.spec = spec = inspect_model(self.model_dir)
        fixed = self._fixed_allocation() if opts.scheme_map is not None else None
        if fixed is None:  # cheap checks first: fail before hours of profiling
            check_budget(spec, opts.schemes, opts.wbits, opts.granularity)
            perf = PerfModel.from_json(opts.perf_table) if opts.perf_table else PerfModel()
        with self._timed("calibration"):
            sequences = self._calibration() if opts.needs_calibration else None
        with self._timed("load"):
            model, rotation = self._load_model()
        moe_layers = find_moe_layers(model, spec)
        with self._timed("profile"):
            store = self._profile(model, moe_layers, sequences) if opts.needs_calibration else None
        if fixed is None:
            with self._timed("sensitivity"):  # token Fisher weights included (computed on demand)
                losses = self._sensitivity(
                    moe_layers, store, lambda: self._token_fisher(model, moe_layers, store, sequences)
                )
            with self._timed("layer_gains"):
                gains = self.gains = self._layer_gains(model, moe_layers, store, sequences)
            with self._timed("allocate"):
                layers = self._allocate(moe_layers, store, losses, perf, gains)
        else:
            self.stages["sensitivity"] = self.stages["allocate"] = "skipped"
            layers = self._given(moe_layers, store, fixed)
        with self._timed("quantize"):
            fitted = self._quantize_in_model_order(model, moe_layers, layers, sequences) if opts.sequential else {}
            packed = self._quantize(moe_layers, store, layers, fitted)
        with self._timed("export"):
            self._export(model, rotation, layers, packed)
        report = self._report(layers, rotation)
        return PipelineResult(self.out, report, dict(self.stages))

    # -- inputs ---------------------------------------------------------------

    def _fixed_allocation(self) -> dict[str, ExpertLayerSchemes]:
        raw = self.opts.scheme_map
        if raw.get("shared_experts") or raw.get("linears"):
            raise PipelineError(
                "this pipeline quantizes routed experts only; shared experts / linears need the RTN path "
                "(--scheme/--scheme-map without --calib)"
            )
        experts, _ = resolve_scheme_map(raw, self.spec)
        return experts

    def _calibration(self) -> torch.Tensor:
        from transformers import AutoConfig

        max_positions = model_max_positions(AutoConfig.from_pretrained(str(self.model_dir)))
        check_seq_len(self.opts.seq_len, max_positions)
        return load_calibration(
            self.model_dir, self.calib, self.opts.seq_len, self.opts.calib_tokens, max_positions
        )

    def _load_model(self):
        from transformers import AutoModelForCausalLM

        # Read in the checkpoint's own dtype, widened to float32 tensor by tensor as it moves to the device:
        # the same values as a float32 read, with the host holding the weights at their stored size (half of
        # float32 for a bf16 model: 29 instead of 57 GB for Qwen1.5-MoE-A2.7B).
        model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype="auto")
        check_fits_device(model, self.device)
        model = model.to(device=self.device, dtype=torch.float32).eval()
        model.config.dtype = torch.float32
        rotation = None
        if self.opts.hadamard:
            rotation = rotate_model_(model, seed=self.opts.seed)
            self.stages["rotate"] = "computed"
        else:
            self.stages["rotate"] = "skipped"
        return model, rotation

    # -- cached stages --------------------------------------------------------

    def _profile_key(self) -> str:
        o = self.opts
        return _hash(
            {
                "version": CACHE_VERSION,
                "model": _model_fingerprint(self.model_dir),
                "calib": _file_sha256(self.calib),
                "seq_len": o.seq_len,
                "calib_tokens": o.calib_tokens,
                "hadamard": o.hadamard,
                "seed": o.seed,
                "sample_tokens": o.sample_tokens,
                "holdout": o.effective_holdout,
                # only when set, so that the keys of existing caches stay valid
                **({"hessian_weights": o.hessian_weights} if o.hessian_weights != "none" else {}),
            }
        )

    def _profile(self, model, moe_layers: list[MoELayer], sequences: torch.Tensor) -> ProfileStore:
        store = ProfileStore(self.cache / f"profile-{self._profile_key()}")
        if store.exists():
            self.stages["profile"] = "cached"
            return store
        self.stages["profile"] = "computed"
        o = self.opts
        return profile_model(
            model, moe_layers, sequences, store, o.sample_tokens, o.batch_size, o.seed, o.effective_holdout,
            o.hessian_weights,
        )

    def _sensitivity(
        self, moe_layers: list[MoELayer], store: ProfileStore, token_fisher=lambda: None
    ) -> dict[str, np.ndarray]:
        """Δ [experts, units, schemes] per layer. Cached one file per scheme (keyed by
        profile, scheme, method and clip), so a run with more or other candidates
        computes only the schemes no earlier run measured (Δ of a scheme does not
        depend on the other candidates). ``token_fisher()`` gives the token weights
        (_token_fisher); it is called only when some scheme's Δ must be computed."""
        o = self.opts

        def path_of(scheme: str) -> Path:
            damp = {"percdamp": o.percdamp} if o.percdamp != DEFAULT_PERCDAMP else {}  # old keys stay valid
            refit = {"refit_rounds": o.refit_rounds} if o.refit_rounds else {}
            refines = o.refine_sweeps and refines_codes_of(parse_scheme(scheme))  # Δ of other schemes is unchanged
            refine = {"refine_sweeps": o.refine_sweeps} if refines else {}
            tokens = {"token_weights": o.token_weights} if o.token_weights != "none" else {}
            key = _hash({"profile": store.folder.name, "scheme": scheme, "method": o.method, "clip": o.clip,
                         **damp, **refit, **refine, **tokens})
            return self.cache / f"sensitivity-{key}.pt"

        per_scheme: dict[str, dict[str, np.ndarray]] = {}
        for scheme in o.schemes:
            if path_of(scheme).is_file():
                saved = torch.load(path_of(scheme), weights_only=True)["loss"]
                per_scheme[scheme] = {k: v.numpy() for k, v in saved.items()}
        missing = [s for s in o.schemes if s not in per_scheme]
        self.stages["sensitivity"] = "computed" if missing else "cached"
        if not missing:
            self.stages["token_fisher"] = "skipped"  # the token weights only feed Δ
        else:
            fisher = token_fisher()
            computed: dict[str, np.ndarray] = {}
            total = sum(layer.experts.gate_up_proj.shape[0] for layer in moe_layers)
            with tqdm(total=total, desc=f"sensitivity ({len(missing)} schemes)", unit="expert") as bar:
                for layer in moe_layers:
                    experts, profile = layer.experts, store.load(layer.prefix)
                    computed[layer.prefix] = layer_sensitivity(
                        experts.gate_up_proj, experts.down_proj, experts.act_fn,
                        profile, missing, o.method, bar, o.clip, o.percdamp, o.refit_rounds,
                        o.refine_sweeps, None if fisher is None else self._expert_fisher(fisher, layer, profile),
                    )  # fmt: skip
            path_of(missing[0]).parent.mkdir(parents=True, exist_ok=True)
            for i, scheme in enumerate(missing):
                per_scheme[scheme] = {k: v[..., i] for k, v in computed.items()}
                tmp = path_of(scheme).with_suffix(".tmp")
                loss = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in per_scheme[scheme].items()}
                torch.save({"scheme": scheme, "loss": loss}, tmp)
                tmp.rename(path_of(scheme))
        return {
            layer.prefix: np.stack([per_scheme[s][layer.prefix] for s in o.schemes], axis=-1)
            for layer in moe_layers
        }

    def _token_fisher(self, model, moe_layers, store: ProfileStore, sequences) -> dict | None:
        """{prefix: (sampled token ids, their squared output gradients [n, H])} and
        "mean", the mean square over all of them (cached next to the profile)."""
        if self.opts.token_weights == "none":
            self.stages["token_fisher"] = "skipped"
            return None
        path = self.cache / f"token-fisher-{store.folder.name}.pt"
        if path.is_file():
            self.stages["token_fisher"] = "cached"
            return torch.load(path, weights_only=True)
        self.stages["token_fisher"] = "computed"
        wanted = {}
        for layer in moe_layers:
            positions = store.load(layer.prefix).sample_positions
            if positions is None:
                raise PipelineError(f"profile {store.folder} has no sample positions: delete it to recompute")
            wanted[layer.prefix] = positions[positions >= 0].unique()  # sorted
        grads = token_output_fisher(model, moe_layers, sequences, wanted)
        total = sum(float(g.double().sum()) for g in grads.values())
        count = sum(g.numel() for g in grads.values())
        fisher = {"mean": total / max(count, 1), **{p: (wanted[p], grads[p]) for p in wanted}}
        tmp = path.with_suffix(".tmp")
        torch.save(fisher, tmp)
        tmp.rename(path)
        return fisher

    def _expert_fisher(self, fisher: dict, layer: MoELayer, profile) -> list[torch.Tensor]:
        """Per expert, the Fisher weights of its sampled tokens, [m, H] (diagonal) or [m, 1]
        (isotropic), over the model-wide mean (one scale for all layers keeps Δ's magnitude)."""
        ids, grads = fisher[layer.prefix]
        weights = []
        for e in range(profile.sample_sizes.shape[0]):
            f = grads[torch.searchsorted(ids, profile.sample_token_ids(e))] / fisher["mean"]
            weights.append(f if self.opts.token_weights == "fisher-diag" else f.mean(dim=-1, keepdim=True))
        return weights

    def _layer_gains(self, model, moe_layers, store: ProfileStore, sequences) -> dict[str, float] | None:
        """Fisher weight of every layer's Δ (model-wide budget only; cached next to the profile)."""
        o = self.opts
        if o.budget_scope != "model" or o.layer_weights == "none" or o.token_weights != "none":
            self.stages["layer_gains"] = "skipped"
            return None
        path = self.cache / f"gains-{store.folder.name}.json"
        if path.is_file():
            self.stages["layer_gains"] = "cached"
            return json.loads(path.read_text())
        self.stages["layer_gains"] = "computed"
        gains = layer_output_gains(model, moe_layers, sequences)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(gains))
        tmp.rename(path)
        return gains

    # -- allocation -----------------------------------------------------------

    def _expected_tokens(
        self, store: ProfileStore | None, prefix: str, experts: int
    ) -> tuple[list[int], int, list[float]]:
        if store is None:
            return [0] * experts, 0, [0.0] * experts
        counts, num_tokens = store.counts(prefix).tolist(), store.num_tokens()
        return counts, num_tokens, [c / num_tokens * self.opts.batch_tokens for c in counts]

    def _allocate(
        self,
        moe_layers: list[MoELayer],
        store: ProfileStore,
        losses: dict,
        perf: PerfModel,
        gains: dict[str, float] | None = None,
    ) -> list[LayerResult]:
        o = self.opts
        hidden, inter = self.spec.hidden_size, self.spec.expert_intermediate_size
        problems, stats = [], []
        mean_gain = None if not gains else float(np.mean(list(gains.values())))
        weights = []
        for layer in moe_layers:
            # Fisher weight: makes Δ comparable across layers (the mean keeps Δ's scale)
            weights.append(gains[layer.prefix] / mean_gain if mean_gain else 1.0)
            loss = losses[layer.prefix] * weights[-1]
            counts, num_tokens, tokens = self._expected_tokens(store, layer.prefix, loss.shape[0])
            problems.append(
                LayerProblem.from_perf_model(o.schemes, hidden, inter, loss, tokens, perf, o.wbits)
            )
            stats.append((counts, num_tokens, tokens))

        def solve(problem: LayerProblem):
            front = pareto_front(problem, granularity=o.granularity)
            if o.r == "auto":
                return knee_point(front).allocation, front
            return allocate(problem, float(o.r), o.granularity), front

        self.model_front = None
        if o.budget_scope == "model":
            chosen, self.model_front = solve(joint_problem(problems))
            solved = [(part, None) for part in split_allocation(chosen, problems)]
        else:
            solved = [solve(problem) for problem in tqdm(problems, desc="allocate", unit="layer")]
        results = []
        for layer, problem, (counts, num_tokens, tokens), (chosen, front), weight in zip(
            moe_layers, problems, stats, solved, weights
        ):
            results.append(
                LayerResult(
                    prefix=layer.prefix, gate_up=list(chosen.gate_up), down=list(chosen.down),
                    counts=counts, num_tokens=num_tokens, tokens=tokens, schemes=list(o.schemes),
                    loss=problem.loss, time_us=problem.time_us, r=chosen.r, front=front,
                    loss_weight=weight,
                )
            )  # fmt: skip
        self.stages["allocate"] = "computed"
        return results

    def _given(self, moe_layers, store, fixed: dict[str, ExpertLayerSchemes]) -> list[LayerResult]:
        results = []
        for layer in moe_layers:
            schemes = fixed[layer.prefix]
            counts, num_tokens, tokens = self._expected_tokens(store, layer.prefix, len(schemes.gate_up))
            results.append(
                LayerResult(
                    layer.prefix, list(schemes.gate_up), list(schemes.down), counts, num_tokens, tokens
                )
            )
        return results

    # -- quantize and write ---------------------------------------------------

    def _quantize_in_model_order(self, model, moe_layers, layers: list[LayerResult], sequences) -> dict:
        """Every unit GPTQ-fitted in model order (sequential.py), keyed (prefix, unit, expert)."""
        schemes = {r.prefix: {"gate_up": r.gate_up, "down": r.down} for r in layers}
        fit = sequences[~holdout_mask(sequences.shape[0], self.opts.effective_holdout)]

        def quantize(moe: MoELayer, unit: str, experts: list[int], weights, hessians) -> list[QuantizedUnit]:
            chosen = schemes[moe.prefix][unit]
            return self._quantize_by_scheme(weights, hessians, [chosen[e] for e in experts])

        return quantize_in_model_order(model, moe_layers, fit, quantize, self.opts.batch_size,
                                       self.opts.hessian_weights, self.opts.sequential_target, self.opts.percdamp)

    def _quantize(
        self, moe_layers, store: ProfileStore | None, layers: list[LayerResult], fitted: dict
    ) -> dict[str, QuantizedWeight]:
        """Stored tensors of every expert block, by checkpoint module name (from ``fitted`` where
        it holds the unit, else quantized now with the profile's Hessian)."""
        gate_name, up_name, down_name = self.spec.proj_names
        packed: dict[str, QuantizedWeight] = {}
        total = sum(len(r.gate_up) for r in layers)
        with tqdm(total=total, desc=f"quantize ({self.opts.method})", unit="expert") as bar:
            for layer, result in zip(moe_layers, layers):
                profile = store.load(layer.prefix) if store is not None else None
                experts = layer.experts
                inter = experts.down_proj.shape[2]
                units = {}
                for unit, source, chosen in (("gate_up", experts.gate_up_proj, result.gate_up),
                                             ("down", experts.down_proj, result.down)):
                    units[unit] = {e: fitted[(layer.prefix, unit, e)] for e in range(len(chosen))
                                   if (layer.prefix, unit, e) in fitted}
                    todo = [e for e in range(len(chosen)) if e not in units[unit]]
                    hessians = [self._hessian(profile, unit, e, source.shape[2]).to(source.device) for e in todo]
                    quantized = self._quantize_by_scheme([source[e] for e in todo], hessians, [chosen[e] for e in todo])
                    units[unit].update(zip(todo, quantized))
                for e in range(len(result.gate_up)):
                    base = f"{layer.prefix}.{e}"
                    gate_up = units["gate_up"][e]
                    packed[f"{base}.{gate_name}"] = gate_up.encode_rows(slice(0, inter))
                    packed[f"{base}.{up_name}"] = gate_up.encode_rows(slice(inter, 2 * inter))
                    packed[f"{base}.{down_name}"] = units["down"][e].encode_rows(slice(None))
                    bar.update()
        self.stages["quantize"] = "computed"
        return packed

    @staticmethod
    def _hessian(profile, unit: str, expert: int, in_features: int) -> torch.Tensor:
        if profile is None:  # RTN needs no Hessian
            return torch.zeros(in_features, in_features)
        return (profile.gate_up_hessian if unit == "gate_up" else profile.down_hessian)[expert]

    def _quantize_by_scheme(self, weights: list, hessians: list, chosen: list[str]) -> list[QuantizedUnit]:
        """Each weight quantized with its scheme ``chosen[i]``; the weights of one scheme as one batch."""
        out: list[QuantizedUnit | None] = [None] * len(weights)
        for scheme in dict.fromkeys(chosen):
            idx = [i for i, c in enumerate(chosen) if c == scheme]
            results = quantize_units(
                [weights[i].float() for i in idx], [hessians[i] for i in idx], parse_scheme(scheme),
                self.opts.method, self.opts.clip, self.opts.percdamp, self.opts.refit_rounds, self.opts.refine_sweeps,
            )
            for i, q in zip(idx, results):
                out[i] = q
        return out

    def _export(self, model, rotation, layers: list[LayerResult], packed: dict[str, QuantizedWeight]) -> None:
        experts = {r.prefix: ExpertLayerSchemes(r.gate_up, r.down) for r in layers}
        qcfg = build_quant_config(self.spec, experts, {}, rotation)
        source_names = tensor_names(self.model_dir)
        tensors = _checkpoint_tensors(model)
        missing = sorted(set(source_names) - set(tensors))
        if missing:
            raise PipelineError(
                f"cannot map {len(missing)} checkpoint tensors onto the transformers model, e.g. {missing[:3]}"
            )
        dtypes = _source_dtypes(self.model_dir, source_names)

        def source_tensor(name: str) -> torch.Tensor:
            if name in experts_names:
                return tensors[name]  # replaced by its packed tensors below
            return tensors[name].detach().to("cpu", dtypes[name]).contiguous()

        def quantize_block(module: str, _weight: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
            qw = packed[module]
            if qw.scheme != scheme:
                raise RuntimeError(
                    f"internal error: {module} quantized as {qw.scheme.name}, config says {scheme.name}"
                )
            return qw

        experts_names = {f"{m}.weight" for m in packed}
        extra = {"tie_word_embeddings": False} if rotation else None
        export_checkpoint(self.model_dir, self.out, self.spec, qcfg, quantize_block, source_tensor, extra)
        if rotation and "lm_head.weight" not in source_names:
            # The source tied lm_head to the embedding; rotation untied it (the final
            # norm is fused into lm_head only), so the checkpoint needs its own copy.
            lm_head = tensors["lm_head.weight"].detach().to("cpu", dtypes["model.embed_tokens.weight"])
            _append_tensors(self.out, {"lm_head.weight": lm_head.contiguous()})
        self.stages["export"] = "computed"

    def _report(self, layers: list[LayerResult], rotation) -> dict[str, Any]:
        options = asdict(self.opts)
        options["schemes"] = list(self.opts.schemes)
        header = {
            "model": str(self.model_dir),
            "calibration": None if self.calib is None else str(self.calib),
            "options": options,
            "rotation": rotation or {"kind": "none"},
            "stages": dict(self.stages),
            "stage_seconds": dict(self.seconds),
            "device": str(self.device),
            "budget_bits": self.opts.wbits,
        }
        if self.device.type == "cuda":
            header["peak_device_memory_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        if getattr(self, "gains", None) is not None:
            header["layer_gains"] = self.gains
        report = build_report(
            layers, self.spec.hidden_size, self.spec.expert_intermediate_size, header,
            model_front=getattr(self, "model_front", None),
        )  # fmt: skip
        write_report(report, self.out)
        report["plots"] = [p.name for p in plot_report(report, self.out)]
        write_report(report, self.out)
        return report


# ---------------------------------------------------------------------------
# Helpers


def check_fits_device(model: torch.nn.Module, device: torch.device) -> None:
    """PipelineError unless the model's float32 weights fit in the CUDA device's free memory (the pipeline
    keeps the whole model there; its Hessians and activations come on top)."""
    if device.type != "cuda":
        return
    need = sum(t.numel() for t in [*model.parameters(), *model.buffers()]) * 4
    free, total = torch.cuda.mem_get_info(device)
    if need > free:
        raise PipelineError(
            f"the model needs {need / 2**30:.1f} GiB for its float32 weights on {device}, which has "
            f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free; use a GPU with more memory or --device cpu"
        )


def _hash(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_fingerprint(model_dir: Path) -> dict:
    """config.json's content and the weight files' sizes and times (hashing the
    weights themselves would cost a full read of a large model)."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".json"))
    return {
        "path": str(model_dir.resolve()),
        "config": _file_sha256(model_dir / "config.json"),
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def _checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """The model's tensors under checkpoint names (per-expert gate/up/down, Mixtral's
    block_sparse_moe ...): the renaming save_pretrained applies."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, model.state_dict())


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _source_dtypes(model_dir: Path, names: dict[str, str]) -> dict[str, torch.dtype]:
    """dtype of every source tensor, read from the safetensors headers only."""
    dtypes = {}
    for file in sorted(set(names.values())):
        with safe_open(str(model_dir / file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                dtypes[name] = _SAFETENSORS_DTYPES[f.get_slice(name).get_dtype()]
    return dtypes


def _append_tensors(out_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Add tensors to a written checkpoint as one more shard listed in its index."""
    shard = "model-extra.safetensors"
    save_file(tensors, str(out_dir / shard), metadata={"format": "pt"})
    index_path = out_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for name, tensor in tensors.items():
        index["weight_map"][name] = shard
        index["metadata"]["total_size"] += tensor.numel() * tensor.element_size()
    index_path.write_text(json.dumps(index, indent=2))
