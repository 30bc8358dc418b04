"""The scheme table: how one linear block of one expert is quantized.

Shared by the runtime (vllm_mxmoe) and the offline pipeline (offline/), so it
imports nothing but the standard library.

A scheme name reads ``w{bits}[g{group}][a8fp8][_sym]``:

* ``w4g128``   4-bit weights, one fp16 scale and zero point per 128 inputs
* ``w8``       8-bit weights, one scale and zero point per output channel
* ``w3g128_sym`` symmetric (no zero point)
* ``w8a8fp8``  fp8 (e4m3) weights with a per-channel scale; activations are
  quantized to fp8 per token at run time
* ``w4a8fp8``  int4 weights (group 128, symmetric), fp8 activations

Bits per weight are always counted with their scale and zero-point overhead
(w2g128 asymmetric = 2 + 16/128 + 16/128 = 2.25), identically for the
allocator's budget, the report and the benchmarks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

WEIGHT_BITS = (2, 3, 4, 8)
SCALE_BITS = 16  # scales and zero points are stored as float16
ACT_FORMATS = ("none", "fp8")
# Packed int weights go 32 bits a word; int kernels need whole words per row.
K_ALIGN = 32

_NAME_RE = re.compile(r"^w(?P<bits>\d+)(?:g(?P<group>\d+))?(?P<act>a8fp8)?(?P<sym>_sym)?$")


class UnknownSchemeError(ValueError):
    pass


@dataclass(frozen=True)
class Scheme:
    """One quantization format for a [out_features, in_features] weight."""

    name: str
    bits: int
    group_size: int | None  # None: one group per output channel (group = in_features)
    symmetric: bool
    act: str = "none"  # "none": activations stay fp16/bf16; "fp8": per-token fp8

    @property
    def weight_is_fp8(self) -> bool:
        """8-bit weight-activation schemes keep fp8 weights (Hopper fp8 MMA)."""
        return self.act == "fp8" and self.bits == 8

    @property
    def has_zero_point(self) -> bool:
        return not self.symmetric

    def group(self, in_features: int) -> int:
        return in_features if self.group_size is None else self.group_size

    def num_groups(self, in_features: int) -> int:
        return in_features // self.group(in_features)

    def bits_per_weight(self, in_features: int) -> float:
        """Storage bits per weight element, scale and zero point included."""
        per_group = SCALE_BITS * (1 if self.symmetric else 2)
        return self.bits + per_group / self.group(in_features)

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Exact bits this scheme takes for one [out, in] matrix."""
        groups = self.num_groups(in_features)
        tensors = 1 if self.symmetric else 2
        return out_features * (in_features * self.bits + groups * tensors * SCALE_BITS)

    def check_shape(self, out_features: int, in_features: int, where: str = "") -> None:
        """Raise ValueError if a matrix of this shape cannot use this scheme."""
        at = f" ({where})" if where else ""
        if in_features % K_ALIGN:
            raise ValueError(
                f"scheme {self.name}{at}: in_features={in_features} is not a multiple of {K_ALIGN}"
            )
        if self.group_size is not None and in_features % self.group_size:
            raise ValueError(
                f"scheme {self.name}{at}: group size {self.group_size} does not divide "
                f"in_features={in_features}"
            )

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1


def parse_scheme(name: str) -> Scheme:
    """Build a Scheme from its name; raise UnknownSchemeError naming the problem."""
    if not isinstance(name, str):
        raise UnknownSchemeError(f"scheme name must be a string, got {name!r}")
    m = _NAME_RE.match(name)
    if not m:
        raise UnknownSchemeError(
            f"unknown scheme {name!r}: expected w{{2,3,4,8}}[g{{group}}][a8fp8][_sym], "
            f"e.g. w4g128, w8, w8a8fp8"
        )
    bits = int(m["bits"])
    group = int(m["group"]) if m["group"] else None
    act = "fp8" if m["act"] else "none"
    if bits not in WEIGHT_BITS:
        raise UnknownSchemeError(f"unknown scheme {name!r}: weight bits must be one of {WEIGHT_BITS}")
    if group is not None and (group < K_ALIGN or group % K_ALIGN):
        raise UnknownSchemeError(
            f"unknown scheme {name!r}: group size must be a positive multiple of {K_ALIGN}"
        )
    if act == "fp8":
        if name not in ("w8a8fp8", "w4a8fp8"):
            raise UnknownSchemeError(
                f"unknown scheme {name!r}: the weight-activation schemes are w8a8fp8 and w4a8fp8"
            )
        # fp8 weights are symmetric per channel; int4 weights for fp8 MMA are symmetric g128.
        return Scheme(name, bits, None if bits == 8 else 128, True, "fp8")
    return Scheme(name, bits, group, bool(m["sym"]), act)


# The schemes the allocator considers by default, cheapest first. Per-channel w2
# (2 + 32/K bits) is the one scheme below 2.25 bits: without it a 2.25-bit budget
# leaves no choice but w2g128 everywhere.
DEFAULT_SCHEMES = ("w2", "w2g128", "w3g128", "w4g128", "w8")
KNOWN_SCHEMES = (
    "w2g128", "w3g128", "w4g128", "w8g128",
    "w2", "w3", "w4", "w8",
    "w4g128_sym", "w8_sym",
    "w8a8fp8", "w4a8fp8",
)  # fmt: skip

