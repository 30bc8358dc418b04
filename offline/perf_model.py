"""Predicted kernel time of one expert block GEMM, for the allocator's time term.

``PerfModel.time_us(scheme, n, k, tokens)`` is the time to apply one [n, k]
weight (n outputs, k inputs) quantized with ``scheme`` to ``tokens`` rows.

Two sources, best first:

* a measured table (JSON, produced by benchmarks/ on one GPU)::

      {"device": "NVIDIA H200",
       "entries": [{"scheme": "w4g128", "n": 2816, "k": 2048, "tokens": 16, "us": 12.3}, ...]}

  used for every scheme it has entries for;
* a roofline for the rest: ``max(bytes / bandwidth, flops / peak) + overhead``.

``tokens`` may be fractional (an expert's expected load: activation frequency x
batch). Zero tokens means the block never runs and costs nothing; the weight
is read in full as soon as any token reaches it, so time jumps at 0 and is
monotone non-decreasing in tokens everywhere.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from vllm_mxmoe.schemes import Scheme, UnknownSchemeError, parse_scheme

ACT_BYTES = 2  # activations enter and leave the GEMM as bf16/fp16


@dataclass(frozen=True)
class GpuSpec:
    """Roofline numbers of one GPU. Defaults: H200, as measured on our machine."""

    name: str = "NVIDIA H200"
    hbm_bytes_per_s: float = 4.3e12  # measured copy bandwidth (DESIGN.md)
    bf16_flops_per_s: float = 790e12  # measured dense bf16 matmul
    fp8_speedup: float = 2.0  # fp8 tensor cores run at twice the bf16 rate
    # Weight-only kernels dequantize int codes to bf16 in the inner loop; this
    # stretches the compute-bound time, not the memory-bound one.
    dequant_compute_penalty: float = 0.15
    # Fixed cost per block in a fused launch: tile scheduling, prologue, epilogue.
    block_overhead_us: float = 1.0

    def __post_init__(self) -> None:
        for field_name in ("hbm_bytes_per_s", "bf16_flops_per_s", "fp8_speedup"):
            if not getattr(self, field_name) > 0:
                raise ValueError(f"GpuSpec.{field_name} must be > 0, got {getattr(self, field_name)}")
        if self.dequant_compute_penalty < 0 or self.block_overhead_us < 0:
            raise ValueError("GpuSpec.dequant_compute_penalty and block_overhead_us must be >= 0")


H200 = GpuSpec()


@dataclass(frozen=True)
class Measurement:
    """One measured kernel time: ``scheme`` on an [n, k] weight with ``tokens`` rows."""

    scheme: str
    n: int
    k: int
    tokens: float
    us: float

    def __post_init__(self) -> None:
        if self.n <= 0 or self.k <= 0 or not (self.tokens > 0 and self.us > 0):
            raise ValueError(f"measurement needs positive n, k, tokens and us: {self}")
        if not (math.isfinite(self.tokens) and math.isfinite(self.us)):
            raise ValueError(f"measurement needs finite tokens and us: {self}")


class PerfTableError(ValueError):
    """A measured-time table is malformed; the message names the file and the entry."""


def _check_query(n: int, k: int, tokens: float) -> None:
    if n <= 0 or k <= 0:
        raise ValueError(f"weight shape must be positive, got n={n}, k={k}")
    if not (tokens >= 0 and math.isfinite(tokens)):
        raise ValueError(f"tokens must be finite and >= 0, got {tokens}")


def weight_bytes(scheme: Scheme, n: int, k: int) -> float:
    """Bytes of one packed [n, k] weight, scales and zero points included."""
    return scheme.storage_bits(n, k) / 8


def roofline_us(scheme: Scheme, n: int, k: int, tokens: float, gpu: GpuSpec = H200) -> float:
    """Roofline time of one block GEMM; 0 when no token reaches the block."""
    _check_query(n, k, tokens)
    if tokens == 0:
        return 0.0
    bytes_moved = weight_bytes(scheme, n, k) + ACT_BYTES * tokens * (n + k)
    peak = gpu.bf16_flops_per_s * (gpu.fp8_speedup if scheme.act == "fp8" else 1.0)
    compute_s = 2.0 * n * k * tokens / peak
    if not scheme.weight_is_fp8:
        # int codes are converted to the MMA's input format before each dot
        compute_s *= 1.0 + gpu.dequant_compute_penalty
    memory_s = bytes_moved / gpu.hbm_bytes_per_s
    return max(memory_s, compute_s) * 1e6 + gpu.block_overhead_us


@dataclass(frozen=True)
class _Curve:
    """Measured times of one (scheme, n, k) over token counts, ascending."""

    n: int
    k: int
    tokens: tuple[float, ...]
    us: tuple[float, ...]


class PerfModel:
    """Kernel time per block GEMM: measured table where it has the scheme, roofline otherwise."""

    def __init__(
        self,
        gpu: GpuSpec = H200,
        measurements: Iterable[Measurement] = (),
        device: str | None = None,
    ) -> None:
        self.gpu = gpu
        self.device = device if device is not None else gpu.name
        self._curves: dict[str, list[_Curve]] = _build_curves(list(measurements))

    @classmethod
    def from_json(cls, path: str | Path, gpu: GpuSpec = H200) -> "PerfModel":
        """Load a measured table; ``gpu`` gives the roofline for schemes it lacks."""
        device, measurements = load_table(path)
        return cls(gpu=gpu, measurements=measurements, device=device)

    @property
    def measured_schemes(self) -> frozenset[str]:
        return frozenset(self._curves)

    def time_us(self, scheme_name: str, n: int, k: int, tokens: float) -> float:
        """Predicted time (µs) of ``scheme_name`` on an [n, k] weight applied to ``tokens`` rows."""
        scheme = parse_scheme(scheme_name)
        _check_query(n, k, tokens)
        if tokens == 0:
            return 0.0
        curves = self._curves.get(scheme.name)
        if not curves:
            return roofline_us(scheme, n, k, tokens, self.gpu)
        curve = _closest_shape(curves, n, k)
        # A kernel's time grows with the weight it streams (memory bound) and
        # with n*k*tokens (compute bound): both are proportional to n*k.
        shape_scale = (n * k) / (curve.n * curve.k)
        return shape_scale * self._interpolate(scheme, curve, tokens)

    def _interpolate(self, scheme: Scheme, curve: _Curve, tokens: float) -> float:
        ts, us = curve.tokens, curve.us
        if tokens <= ts[0] or tokens >= ts[-1]:
            # Outside the measured range follow the roofline's shape, anchored at the
            # nearest measured point: flat below (memory bound), linear above (compute bound).
            anchor = 0 if tokens <= ts[0] else len(ts) - 1
            ratio = roofline_us(scheme, curve.n, curve.k, tokens, self.gpu) / roofline_us(
                scheme, curve.n, curve.k, ts[anchor], self.gpu
            )
            return us[anchor] * ratio
        hi = bisect.bisect_left(ts, tokens)
        if ts[hi] == tokens:
            return us[hi]
        lo = hi - 1
        # Log-log interpolation (a power law between points) is exact in both the
        # flat memory-bound and the linear compute-bound regimes.
        w = math.log(tokens / ts[lo]) / math.log(ts[hi] / ts[lo])
        value = math.exp((1 - w) * math.log(us[lo]) + w * math.log(us[hi]))
        return min(max(value, us[lo]), us[hi])  # rounding must not break monotonicity


def _closest_shape(curves: list[_Curve], n: int, k: int) -> _Curve:
    """The measured shape nearest in log space; ties go to the smaller shape (deterministic)."""
    return min(curves, key=lambda c: (abs(math.log(c.n / n)) + abs(math.log(c.k / k)), c.n, c.k))


def _build_curves(measurements: list[Measurement]) -> dict[str, list[_Curve]]:
    by_shape: dict[tuple[str, int, int], dict[float, float]] = {}
    for m in measurements:
        points = by_shape.setdefault((m.scheme, m.n, m.k), {})
        if m.tokens in points:
            raise ValueError(f"duplicate measurement for {m.scheme} n={m.n} k={m.k} tokens={m.tokens}")
        points[m.tokens] = m.us
    curves: dict[str, list[_Curve]] = {}
    for (scheme, n, k), points in sorted(by_shape.items()):
        tokens = tuple(sorted(points))
        # Running max: timing noise must not make more tokens look cheaper, or
        # the model would stop being monotone in tokens.
        us: list[float] = []
        for t in tokens:
            us.append(max(points[t], us[-1]) if us else points[t])
        curves.setdefault(scheme, []).append(_Curve(n, k, tokens, tuple(us)))
    return curves


def load_table(path: str | Path) -> tuple[str, list[Measurement]]:
    """Read and validate a measured table; raise PerfTableError naming the file and entry."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PerfTableError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise PerfTableError(f"{path}: expected an object with an 'entries' list")
    device = data.get("device")
    if not isinstance(device, str):
        raise PerfTableError(f"{path}: 'device' must be a string, got {device!r}")
    measurements = [_parse_entry(path, i, entry) for i, entry in enumerate(data["entries"])]
    seen: set[tuple[str, int, int, float]] = set()
    for i, m in enumerate(measurements):
        key = (m.scheme, m.n, m.k, m.tokens)
        if key in seen:
            raise PerfTableError(f"{path}: entry {i} {data['entries'][i]!r}: duplicate of an earlier entry")
        seen.add(key)
    return device, measurements


def _parse_entry(path: Path, index: int, entry: Any) -> Measurement:
    where = f"{path}: entry {index} {entry!r}"
    if not isinstance(entry, dict):
        raise PerfTableError(f"{where}: expected an object")
    missing = [key for key in ("scheme", "n", "k", "tokens", "us") if key not in entry]
    if missing:
        raise PerfTableError(f"{where}: missing field(s) {', '.join(missing)}")
    try:
        scheme = parse_scheme(entry["scheme"]).name
    except UnknownSchemeError as e:
        raise PerfTableError(f"{where}: {e}") from e
    for key in ("n", "k"):
        value = entry[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise PerfTableError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    for key in ("tokens", "us"):
        value = entry[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not (
            math.isfinite(value) and value > 0
        ):
            raise PerfTableError(f"{where}: '{key}' must be a positive finite number, got {value!r}")
    return Measurement(scheme, entry["n"], entry["k"], float(entry["tokens"]), float(entry["us"]))
