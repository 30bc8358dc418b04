"""Checkpoint format v1: scheme names, packing, encode/dequantize, config validation."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

from vllm_mxmoe.format import (
    CheckpointFormatError,
    dequantize,
    encode,
    pack,
    parse_quant_config,
    tensor_specs,
    unpack,
)
from vllm_mxmoe.schemes import KNOWN_SCHEMES, UnknownSchemeError, parse_scheme
from offline.quant_grid import quantize_rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_roundtrip_and_size(bits):
    q = torch.randint(0, 1 << bits, (6, 256), dtype=torch.int32)
    packed = pack(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (6, 256 * bits // 32)
    assert torch.equal(unpack(packed, bits), q)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_is_compressed_tensors_order(bits):
    q = torch.randint(0, 1 << bits, (4, 128), dtype=torch.int32)
    theirs = unpack_from_int32(pack(q, bits), bits, torch.Size((4, 128))).to(torch.int32)
    assert torch.equal(theirs + (1 << (bits - 1)), q)


def test_three_bit_chunks_slice_along_inputs():
    """A slice of whole 32-input chunks is a slice of whole words (tensor parallel)."""
    q = torch.randint(0, 8, (3, 128), dtype=torch.int32)
    packed = pack(q, 3)
    assert torch.equal(unpack(packed[:, 3:6], 3), q[:, 32:64])


def test_bits_count_scale_and_zero():
    assert parse_scheme("w2g128").bits_per_weight(4096) == 2.25
    assert parse_scheme("w4g128_sym").bits_per_weight(4096) == 4.125
    assert parse_scheme("w8").bits_per_weight(1024) == 8 + 32 / 1024
    s = parse_scheme("w3g128")
    assert s.storage_bits(10, 256) == 10 * (256 * 3 + 2 * 2 * 16)


@pytest.mark.parametrize("bad", ["w5g128", "w4g100", "w4g0", "int4", "w3a8fp8", "", 4])
def test_unknown_schemes_are_rejected_by_name(bad):
    with pytest.raises(UnknownSchemeError, match="scheme"):
        parse_scheme(bad)


@pytest.mark.parametrize("name", KNOWN_SCHEMES)
def test_encode_dequantize_matches_specs_and_error_shrinks_with_bits(name):
    scheme = parse_scheme(name)
    w = torch.randn(64, 256)
    qw = quantize_rtn(w, scheme)
    for suffix, tensor in qw.tensors().items():
        shape, dtype = tensor_specs(scheme, 64, 256)[suffix]
        assert tensor.shape == shape and tensor.dtype == dtype, suffix
    err = (dequantize(qw, 256) - w).norm() / w.norm()
    assert torch.isfinite(err)
    # Rough ceilings per bit width (RTN on Gaussian weights).
    assert err < {2: 0.6, 3: 0.3, 4: 0.15, 8: 0.03}[scheme.bits], (name, float(err))


def test_encode_clamps_to_grid():
    scheme = parse_scheme("w2g128")
    w = torch.full((2, 128), 10.0)
    scale = torch.ones(2, 1)
    zero = torch.zeros(2, 1)
    assert dequantize(encode(w, scale, zero, scheme), 128).max() == 3.0


def _cfg(**over):
    cfg = {
        "quant_method": "mxmoe",
        "format_version": 1,
        "schemes": {"w4g128": {}, "w8": {}},
        "experts": {"model.layers.0.mlp.experts": {"gate_up": ["w4g128", "w8"], "down": ["w8", "w8"]}},
    }
    cfg.update(over)
    return cfg


def test_config_roundtrip():
    parsed = parse_quant_config(_cfg())
    again = parse_quant_config(parsed.to_dict())
    assert again.experts == parsed.experts and again.schemes == parsed.schemes


@pytest.mark.parametrize(
    "override, message",
    [
        ({"quant_method": "gptq"}, "quant_method"),
        ({"format_version": 7}, "format_version 7"),
        ({"schemes": {"w4g128": {}, "w9": {}}}, "w9"),
        ({"experts": {"m.experts": {"gate_up": ["w4g128"], "down": ["w2g128"]}}}, "unknown scheme 'w2g128'"),
        ({"experts": {"m.experts": {"gate_up": ["w4g128"], "down": []}}}, "gate_up lists 1 experts but down lists 0"),
        ({"experts": {"m.experts": {"gate_up": ["w4g128"]}}}, "missing key 'down'"),
        ({"schemes": {"w4g128": {"bits": 3, "group_size": 128, "symmetric": False, "act": "none"}}}, "declared"),
    ],
)
def test_config_errors_name_the_problem(override, message):
    with pytest.raises(CheckpointFormatError, match=message):
        parse_quant_config(_cfg(**override))
