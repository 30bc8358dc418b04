"""Profile a transformers MoE model on calibration sequences, one decoder layer at a time.

Only one layer's activations exist at any time: the inputs of decoder layer 0
are captured once (the embedding and whatever precedes the first layer), then
every layer turns its inputs into its outputs, which become the next layer's
inputs. While an MoE layer runs, a hook on its experts module sees the routing
exactly as the model computes it (hidden states, top-k ids and weights) and
records per expert:

* how often the router picked it (top-k counts);
* the GPTQ Hessian of gate_up, from X_e (the tokens routed to e), and of down,
  from the intermediate activation act(X_e W_gate^T) * (X_e W_up^T);
* a uniform random sample of at most ``sample_tokens`` routed tokens and their
  routing weights, from which the sensitivity stage measures output errors.

Held-out sensitivity tokens (optional, ``holdout`` > 0). By default (the
paper's measure) the sample comes from the tokens the Hessians are built from,
and GPTQ fits those: on the reference model its error on them is 1.2x (hot
experts) to 10x (experts with a few hundred tokens) smaller than on unseen
text. With ``holdout`` a share of the calibration sequences (evenly spaced)
feeds only the sensitivity sample and the others only the Hessians (routing
counts come from all). On the reference model this unbiased measure did not
improve perplexity (the Hessians lose those tokens), hence not the default.

Each layer's record is written to a ``ProfileStore`` folder as soon as the
layer is done, so memory holds one layer's statistics, not the model's.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .gptq import HessianAccumulator
from .model_spec import MoEModelSpec

DEFAULT_SAMPLE_TOKENS = 512
DEFAULT_BATCH_SIZE = 8
DEFAULT_HOLDOUT = 0.0
HESSIAN_WEIGHTS = ("none", "routing")  # GPTQ Hessians: plain X^T X, or tokens weighted by routing weight
_LAYER_INDEX_RE = re.compile(r"\.layers\.(\d+)\.")


class ProfileError(ValueError):
    pass


@dataclass
class MoELayer:
    """One MoE layer: its checkpoint experts prefix and its transformers modules."""

    prefix: str  # e.g. model.layers.3.mlp.experts (Mixtral: ...block_sparse_moe.experts)
    index: int  # decoder layer index
    experts: nn.Module  # fused experts: gate_up_proj [E, 2I, H], down_proj [E, H, I], act_fn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ProfileError(f"{type(model).__name__}: expected decoder layers at model.model.layers")
    return layers


def find_moe_layers(model: nn.Module, spec: MoEModelSpec) -> list[MoELayer]:
    """Match the checkpoint's expert layers (spec) with the model's experts modules."""
    layers = decoder_layers(model)
    found = []
    for prefix, num_experts in spec.expert_layers.items():
        m = _LAYER_INDEX_RE.search(prefix)
        if m is None or int(m[1]) >= len(layers):
            raise ProfileError(f"cannot find the decoder layer of experts {prefix}")
        index = int(m[1])
        experts = getattr(getattr(layers[index], "mlp", None), "experts", None)
        gate_up = getattr(experts, "gate_up_proj", None)
        if not isinstance(gate_up, nn.Parameter) or getattr(experts, "is_transposed", False):
            raise ProfileError(
                f"layer {index}: expected fused experts (gate_up_proj [E, 2*inter, hidden]) for {prefix}"
            )
        if getattr(experts, "has_bias", False):
            raise ProfileError(f"layer {index}: experts with biases are not supported")
        if gate_up.shape[0] != num_experts:
            raise ProfileError(
                f"{prefix}: checkpoint has {num_experts} experts, the model {gate_up.shape[0]}"
            )
        found.append(MoELayer(prefix, index, experts))
    return found


# ---------------------------------------------------------------------------
# What is recorded per layer


@dataclass
class LayerProfile:
    """Calibration statistics of one MoE layer (all tensors on CPU)."""

    prefix: str
    num_tokens: int  # calibration tokens that passed through the layer
    counts: torch.Tensor  # int64 [E]: top-k selections per expert
    gate_up_hessian: torch.Tensor  # float32 [E, H, H], 2 X^T X / n (zeros: expert never routed)
    down_hessian: torch.Tensor  # float32 [E, I, I]
    sample_inputs: torch.Tensor  # float32 [E, M, H]: sampled routed tokens, zero padded
    sample_weights: torch.Tensor  # float32 [E, M]: their routing weights, 0 for padding
    sample_sizes: torch.Tensor  # int64 [E]: valid rows of sample_inputs
    # int64 [E, M]: calibration token index (sequence * seq_len + position) of each sampled
    # row, -1 for padding; lets Δ weigh a token by its loss gradient (token_output_fisher)
    sample_positions: torch.Tensor | None = None

    def samples(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = int(self.sample_sizes[expert])
        return self.sample_inputs[expert, :m], self.sample_weights[expert, :m]

    def sample_token_ids(self, expert: int) -> torch.Tensor:
        if self.sample_positions is None:
            raise ProfileError(f"{self.prefix}: profile has no sample positions (made by an older version)")
        return self.sample_positions[expert, : int(self.sample_sizes[expert])]

    def activation_frequency(self) -> torch.Tensor:
        """Share of tokens routed to each expert (sums to top_k)."""
        return self.counts.double() / max(self.num_tokens, 1)


class _ExpertRecorder:
    """Forward pre-hook on one experts module; accumulates a LayerProfile."""

    def __init__(
        self, prefix: str, experts: nn.Module, sample_tokens: int, seed: int, hessian_weights: str = "none"
    ):
        if hessian_weights not in HESSIAN_WEIGHTS:
            raise ValueError(f"hessian_weights must be one of {HESSIAN_WEIGHTS}, got {hessian_weights!r}")
        self.hessian_weights = hessian_weights
        self.prefix = prefix
        self.experts = experts
        num_experts, two_inter, hidden = experts.gate_up_proj.shape
        self.num_experts, self.inter = num_experts, two_inter // 2
        self.num_tokens = 0
        self.counts = torch.zeros(num_experts, dtype=torch.long)
        self.gate_up = [HessianAccumulator(hidden) for _ in range(num_experts)]
        self.down = [HessianAccumulator(self.inter) for _ in range(num_experts)]
        self.sample_tokens = sample_tokens
        # per expert (inputs, weights, token ids, priorities): the rows with the smallest random
        # priorities seen so far form a uniform sample without replacement
        self.samples: list[tuple[torch.Tensor, ...] | None] = [None] * num_experts
        self.generator = torch.Generator().manual_seed(seed)

    # What the tokens of the batch now running are for: Hessians ("fit"),
    # the sensitivity sample ("holdout") or both ("both": no held-out sequences).
    role = "both"
    # Calibration token index of each row of the batch now running (set by profile_model).
    token_ids: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, top_k_index, top_k_weights = _routing_arguments(args, kwargs)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        self.num_tokens += hidden.shape[0]
        ids = top_k_index.reshape(hidden.shape[0], -1)
        weights = top_k_weights.reshape(hidden.shape[0], -1)
        valid = ids[(ids >= 0) & (ids < self.num_experts)]  # ids == E marks "no expert" in some routers
        self.counts += torch.bincount(valid.cpu(), minlength=self.num_experts)
        for expert in valid.unique().tolist():
            token, slot = torch.where(ids == expert)
            x = hidden[token].float()
            if self.role != "holdout":
                h = expert_activation(x, self.experts.gate_up_proj[expert].float(), self.experts.act_fn)
                if self.hessian_weights == "routing":  # H = sum_t w_t^2 x_t x_t^T
                    r = weights[token, slot].float().unsqueeze(-1).to(x.device)
                    self.gate_up[expert].add(x * r)
                    self.down[expert].add(h * r)
                else:
                    self.gate_up[expert].add(x)
                    self.down[expert].add(h)
            if self.role != "fit":
                if self.token_ids is None:
                    where = torch.full((len(token),), -1, device=x.device)
                else:
                    where = self.token_ids.to(x.device)[token]
                self._sample(expert, x, weights[token, slot].float(), where)

    def _sample(self, expert: int, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> None:
        # Kept on the activations' device until finish(): a copy to the host per expert and batch
        # waited for the GPU each time (most of the profile's time on an H200). The priorities come
        # from the CPU generator, so every device draws the same sample.
        priority = torch.rand(x.shape[0], generator=self.generator).to(x.device)
        new = (x, w, ids.to(x.device), priority)
        if self.samples[expert] is not None:
            new = tuple(torch.cat([old, part]) for old, part in zip(self.samples[expert], new))
        if new[0].shape[0] > self.sample_tokens:
            keep = torch.topk(new[3], self.sample_tokens, largest=False).indices.sort().values
            new = tuple(part[keep] for part in new)
        self.samples[expert] = new

    def finish(self) -> LayerProfile:
        hidden = self.experts.gate_up_proj.shape[2]
        size = max([0] + [s[0].shape[0] for s in self.samples if s is not None])
        inputs = torch.zeros(self.num_experts, size, hidden)
        weights = torch.zeros(self.num_experts, size)
        sizes = torch.zeros(self.num_experts, dtype=torch.long)
        positions = torch.full((self.num_experts, size), -1, dtype=torch.long)
        for e, sample in enumerate(self.samples):
            if sample is not None:
                x, w, ids = (part.cpu() for part in sample[:3])
                m = x.shape[0]
                inputs[e, :m], weights[e, :m], positions[e, :m], sizes[e] = x, w, ids, m
        return LayerProfile(
            prefix=self.prefix,
            num_tokens=self.num_tokens,
            counts=self.counts.clone(),
            gate_up_hessian=torch.stack([a.finalize().float().cpu() for a in self.gate_up]),
            down_hessian=torch.stack([a.finalize().float().cpu() for a in self.down]),
            sample_inputs=inputs,
            sample_weights=weights,
            sample_sizes=sizes,
            sample_positions=positions,
        )


def expert_activation(x: torch.Tensor, gate_up: torch.Tensor, act_fn) -> torch.Tensor:
    """act(gate · x) * (up · x), the down projection's input, for x [T, H] and gate_up [2I, H] (gate rows first)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return act_fn(gate) * up


def _routing_arguments(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden_states, top_k_index, top_k_weights) of an experts call, positional or named."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]) :]]
    if any(v is None for v in values):
        raise ProfileError(f"experts module called without {names}: cannot observe the routing")
    return values[0], values[1], values[2]


# ---------------------------------------------------------------------------
# Running the model layer by layer


class _StopForward(Exception):
    pass


def holdout_mask(num_sequences: int, holdout: float) -> torch.Tensor:
    """Bool [num_sequences]: the evenly spaced sequences held out for sensitivities.
    All False when holdout is 0 or there is a single sequence (nothing to split)."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    mask = torch.zeros(num_sequences, dtype=torch.bool)
    count = min(round(num_sequences * holdout), num_sequences - 1)
    if count > 0:
        mask[torch.linspace(0, num_sequences - 1, count).round().long()] = True
    return mask


@contextlib.contextmanager
def pre_hook(module: nn.Module | None, hook):
    """``hook`` as a forward pre-hook (with kwargs) on ``module`` inside the block; nothing if module is None."""
    handle = module.register_forward_pre_hook(hook, with_kwargs=True) if module is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _first_layer_inputs(model: nn.Module, sequences: torch.Tensor, batch_size: int, device) -> list[list]:
    """[hidden_states, other args, kwargs] of decoder layer 0, per batch of sequences."""
    captured: list[list] = []

    def catch(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append([hidden, tuple(args[1:]), kwargs])
        raise _StopForward  # the rest of the model runs layer by layer later

    with pre_hook(decoder_layers(model)[0], catch):
        for batch in sequences.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    return captured


class ProfileStore:
    """A folder of per-layer profiles (``layer-XXX.pt``) and ``meta.json`` (counts per layer).

    Written into ``<folder>.tmp`` and renamed when complete, so an interrupted
    run never leaves a folder that looks finished.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def exists(self) -> bool:
        return (self.folder / "meta.json").is_file()

    def meta(self) -> dict:
        return json.loads((self.folder / "meta.json").read_text())

    @property
    def prefixes(self) -> list[str]:
        return [layer["prefix"] for layer in self.meta()["layers"]]

    def counts(self, prefix: str) -> torch.Tensor:
        return torch.tensor(self._layer_meta(prefix)["counts"], dtype=torch.long)

    def num_tokens(self) -> int:
        return int(self.meta()["num_tokens"])

    def load(self, prefix: str) -> LayerProfile:
        data = torch.load(self.folder / self._layer_meta(prefix)["file"], weights_only=True)
        return LayerProfile(**data)

    def _layer_meta(self, prefix: str) -> dict:
        for layer in self.meta()["layers"]:
            if layer["prefix"] == prefix:
                return layer
        raise KeyError(f"profile {self.folder} has no layer {prefix}")


@torch.no_grad()
def profile_model(
    model: nn.Module,
    moe_layers: list[MoELayer],
    sequences: torch.Tensor,
    store: ProfileStore,
    sample_tokens: int = DEFAULT_SAMPLE_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    holdout: float = DEFAULT_HOLDOUT,
    hessian_weights: str = "none",
) -> ProfileStore:
    """Run ``sequences`` [n, seq_len] through ``model`` layer by layer and write the
    per-MoE-layer statistics to ``store``. Returns the (complete) store.

    ``hessian_weights``: "none" (H = 2 X^T X / n over an expert's routed tokens) or
    "routing" (each token's input scaled by its routing weight w_t, so H ~ sum_t w_t^2
    x_t x_t^T: GPTQ then minimises the error of the MoE layer's output, w_t y_e(x_t),
    which is what the sensitivity Δ measures, instead of the expert's own output)."""
    if sample_tokens < 1:
        raise ValueError(f"sample_tokens must be >= 1, got {sample_tokens}")
    held_out = holdout_mask(sequences.shape[0], holdout)
    if holdout > 0 and not held_out.any():
        warnings.warn("one calibration sequence: sensitivities are measured on the Hessian's own tokens")
    model.eval()
    device = next(model.parameters()).device
    tmp = store.folder.with_name(store.folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    by_index = {layer.index: layer for layer in moe_layers}
    last = max(by_index)  # layers after the last MoE layer need not run
    # Held-out and fitting sequences never share a batch, so each batch has one role.
    groups = [("fit", ~held_out), ("holdout", held_out)] if held_out.any() else [("both", ~held_out)]
    batches, roles, token_ids = [], [], []
    seq_len = sequences.shape[1]
    for role, mask in groups:
        group = _first_layer_inputs(model, sequences[mask], batch_size, device)
        batches += group
        roles += [role] * len(group)
        for seqs in torch.nonzero(mask).flatten().split(batch_size):
            token_ids.append((seqs[:, None] * seq_len + torch.arange(seq_len)).flatten())
    layer_meta = []
    for index, layer in enumerate(tqdm(decoder_layers(model)[: last + 1], desc="profile", unit="layer")):
        moe = by_index.get(index)
        recorder = None
        if moe is not None:
            recorder = _ExpertRecorder(moe.prefix, moe.experts, sample_tokens, seed + index, hessian_weights)
        with pre_hook(moe.experts if moe is not None else None, recorder):
            for batch, role, ids in zip(batches, roles, token_ids):
                if recorder is not None:
                    recorder.role, recorder.token_ids = role, ids.to(device)
                out = layer(batch[0], *batch[1], **batch[2])
                batch[0] = out[0] if isinstance(out, tuple) else out
        if recorder is not None:
            profile = recorder.finish()
            name = f"layer-{index:03d}.pt"
            torch.save(profile.__dict__, tmp / name)
            layer_meta.append({"prefix": profile.prefix, "file": name, "counts": profile.counts.tolist()})
    meta = {"num_tokens": int(sequences.numel()), "layers": layer_meta}
    (tmp / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(store.folder, ignore_errors=True)
    tmp.rename(store.folder)
    return store


# ---------------------------------------------------------------------------
# How much each MoE layer's output error costs at the model's output

DEFAULT_GAIN_SEQUENCES = 8


def layer_output_gains(
    model: nn.Module,
    moe_layers: list[MoELayer],
    sequences: torch.Tensor,
    max_sequences: int = DEFAULT_GAIN_SEQUENCES,
) -> dict[str, float]:
    """Per MoE layer, the mean over calibration tokens of ||dNLL/dy_t||^2, y_t the
    layer's experts output at token t (the empirical Fisher of that output).

    To second order an output error δ_t of a layer raises the model's loss by
    about ½ δ_tᵀ F_t δ_t; for an error not aligned with the gradient that is
    ½ ||g_t||² ||δ_t||² / hidden, so a layer's ΣΔ times its gain is comparable
    across layers, which raw ΣΔ is not (errors of deeper layers live on a
    larger residual stream). Costs one forward and backward pass per sequence
    (at most ``max_sequences``, evenly spread), one sequence at a time; weights
    get no gradients.
    """
    chosen = torch.linspace(0, len(sequences) - 1, min(max_sequences, len(sequences))).round().long().unique()
    sums = {layer.prefix: 0.0 for layer in moe_layers}

    def add(prefix: str, _index: int, g: torch.Tensor) -> None:
        sums[prefix] += float(g.double().pow(2).sum())

    _output_gradients(model, moe_layers, sequences, chosen.tolist(), add)
    tokens = len(chosen) * sequences.shape[1]
    return {prefix: total / max(tokens, 1) for prefix, total in sums.items()}


def token_output_fisher(
    model: nn.Module, moe_layers: list[MoELayer], sequences: torch.Tensor, wanted: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per MoE layer, (dNLL/dy_t)² [len(ids), hidden] (float32) at the calibration
    token indices ``wanted[prefix]`` (sequence * seq_len + position, sorted, unique):
    the per-token diagonal empirical Fisher of the layer's experts output, for
    the tokens of the sensitivity sample. One forward and backward pass per
    sequence holding such a token; memory is the wanted rows only.
    """
    seq_len = sequences.shape[1]
    hidden = moe_layers[0].experts.gate_up_proj.shape[2]
    out = {p: torch.zeros(len(ids), hidden) for p, ids in wanted.items()}

    def store(prefix: str, index: int, g: torch.Tensor) -> None:
        ids = wanted[prefix]
        lo, hi = torch.searchsorted(ids, torch.tensor([index * seq_len, (index + 1) * seq_len]))
        rows = g.reshape(-1, g.shape[-1])[ids[lo:hi] - index * seq_len]
        out[prefix][lo:hi] = rows.detach().float().pow(2).cpu()

    needed = torch.cat([ids // seq_len for ids in wanted.values()]).unique()
    _output_gradients(model, moe_layers, sequences, needed.tolist(), store)
    return out


def _output_gradients(model: nn.Module, moe_layers: list[MoELayer], sequences: torch.Tensor,
                      indices: list[int], on_grad) -> None:
    """For each sequence index, one forward and backward pass of its NLL; calls
    ``on_grad(prefix, index, dNLL/d(experts output))`` for every MoE layer. Weights get no
    gradients, and their requires_grad flags are restored."""
    device = next(model.parameters()).device
    flags = [(p, p.requires_grad) for p in model.parameters()]
    handles = []
    current = [0]

    def watch(prefix):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if out.requires_grad:
                out.register_hook(lambda g: on_grad(prefix, current[0], g))

        return hook

    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for layer in moe_layers:
            handles.append(layer.experts.register_forward_hook(watch(layer.prefix)))
        embed = model.get_input_embeddings()
        with torch.enable_grad():
            for index in tqdm(indices, desc="loss gradients", unit="seq", disable=len(indices) < 32):
                current[0] = index
                ids = sequences[index][None].to(device)
                inputs = embed(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=inputs, use_cache=False).logits[0, :-1].float()
                F.cross_entropy(logits, ids[0, 1:], reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
