"""The inline-PTX decoders of fragment-order blocks against the layout, on the CPU.

The interpreter cannot run inline asm, so CI tests the kernels through their pure-Triton
twins; here a small emulator of the few PTX instructions the decoders use runs the asm
strings themselves on words that layout.to_kernel_order packed, and each decoded pair
must be exactly code - zero of the weights the MMA expects in that register.
"""

from __future__ import annotations

import re

import pytest
import torch

from vllm_mxmoe.format import pack
from vllm_mxmoe.kernels import grouped_gemm as gg
from vllm_mxmoe.kernels.layout import to_kernel_order
from vllm_mxmoe.schemes import parse_scheme

MASK32 = 0xFFFFFFFF


def _half_to_float(bits: int, dtype: torch.dtype) -> float:
    return torch.tensor([bits - (1 << 16) if bits >= 1 << 15 else bits], dtype=torch.int16).view(dtype).item()


def _float_to_half(x: float, dtype: torch.dtype) -> int:
    return torch.tensor([x], dtype=dtype).view(torch.int16).item() & 0xFFFF


def _fma_pair(a: int, b: int, c: int, dtype: torch.dtype) -> int:
    out = 0
    for shift in (0, 16):
        x, y, z = (_half_to_float((v >> shift) & 0xFFFF, dtype) for v in (a, b, c))
        out |= _float_to_half(x * y + z, dtype) << shift  # the decoders' products are exact
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for idx in range(8):
        if (lut >> idx) & 1:
            out |= (a if idx & 4 else ~a) & (b if idx & 2 else ~b) & (c if idx & 1 else ~c)
    return out & MASK32


def run_ptx(asm: str, inputs: dict[int, int], dtype: torch.dtype) -> dict[int, int]:
    """Run the decoder's straight-line PTX; registers $i start as ``inputs``; returns every $ register."""
    regs: dict[str, int] = {f"${i}": v & MASK32 for i, v in inputs.items()}

    def val(tok: str) -> int:
        return int(tok, 0) & MASK32 if tok[0].isdigit() else regs[tok]

    for line in asm.splitlines():
        line = line.strip()
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.rstrip(";").split(None, 1)
        args = [t.strip() for t in rest.split(",")]
        if op == "mov.b32":
            regs[args[0]] = val(args[1])
        elif op == "shr.u32":
            regs[args[0]] = val(args[1]) >> val(args[2])
        elif op == "lop3.b32":
            regs[args[0]] = _lop3(val(args[1]), val(args[2]), val(args[3]), val(args[4]))
        elif re.fullmatch(r"fma\.rn\.(bf16x2|f16x2)", op):
            regs[args[0]] = _fma_pair(val(args[1]), val(args[2]), val(args[3]), dtype)
        else:
            raise AssertionError(f"the emulator does not know {op!r}")
    return {int(k[1:]): v for k, v in regs.items() if k.startswith("$")}


def _k(k0: int, c: int, k3: int, k4: int, k5: int, k6: int) -> int:
    """K position of a 128-chunk from its bits (c = k1 + 2 k2, the MMA lane's pair of K bits)."""
    return k0 + 2 * c + 8 * k3 + 16 * k4 + 32 * k5 + 64 * k6


def _pair(dtype: torch.dtype, value: float) -> int:
    h = _float_to_half(value, dtype)
    return h | (h << 16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_decoder_asm_gives_code_minus_zero_of_the_mma_pair(bits, dtype):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (1, 128), generator=gen, dtype=torch.int32)
    words = [w & MASK32 for w in to_kernel_order(parse_scheme(f"w{bits}g128"), pack(codes, bits))[0].tolist()]
    fp16 = dtype == torch.float16
    magic = 1024.0 if fp16 else 128.0
    zero = int(torch.randint(0, 1 << bits, (1,), generator=gen))
    nz = {s: _pair(dtype, -(zero + magic / (1 << s))) for s in (0, 2, 4)}
    asm = {2: gg._asm_w2_in_word, 3: gg._asm_w3_in_word, 4: gg._asm_w4_in_word}[bits](fp16)
    for c in range(4):
        for j in range(4 if bits == 4 else 2):  # the lane's low words: j = k5 + 2 k6 (4 bits) or k6
            if bits == 4:
                outs = run_ptx(asm, {4: words[4 * c + j], 5: words[4 * c + j], 6: nz[0]}, dtype)
                fields = {i: {"k3": i & 1, "k4": i >> 1, "k5": j & 1, "k6": j >> 1} for i in range(4)}
            else:
                word = words[2 * c + j]
                inputs = {8: word, 9: word}
                if bits == 2:
                    inputs.update({10: nz[0], 11: nz[2], 12: nz[4]})
                else:
                    high = words[8 + c] >> (8 * j)
                    inputs.update({10: high, 11: high, 12: nz[0], 13: nz[4]})
                outs = run_ptx(asm, inputs, dtype)
                fields = {f: {"k3": f & 1, "k4": (f >> 1) & 1, "k5": f >> 2, "k6": j} for f in range(8)}
            for out, pos in fields.items():
                for k0 in (0, 1):
                    got = _half_to_float((outs[out] >> (16 * k0)) & 0xFFFF, dtype)
                    want = int(codes[0, _k(k0, c, **pos)]) - zero
                    assert got == want, (bits, c, j, out, k0, got, want)
