"""Randomized (block-)Hadamard matrices and the online fast transform."""

import math

import pytest
import torch

from offline.hadamard import (
    fwht_blocked,
    hadamard_block_size,
    hadamard_matrix,
    hadamard_signs,
    sylvester_hadamard,
)
from offline.quant_grid import fake_quantize
from vllm_mxmoe.schemes import parse_scheme

# (n, block chosen by default): powers of two get one full block; real MoE
# sizes that are not get the largest power-of-two divisor up to 128.
SIZES = [(2, 2), (64, 64), (128, 128), (1024, 1024), (768, 128), (1408, 128), (2880, 64), (96, 32)]


@pytest.mark.parametrize("n,block", SIZES)
def test_default_block_size(n, block):
    assert hadamard_block_size(n, None) == block


def test_block_size_cap():
    assert hadamard_block_size(4096, 128) == 128
    assert hadamard_block_size(768, 256) == 256
    assert hadamard_block_size(2880, 128) == 64
    with pytest.raises(ValueError, match="no power-of-two block"):
        hadamard_block_size(45)


@pytest.mark.parametrize("n,block", SIZES)
def test_hadamard_matrix_is_orthogonal_block_hadamard(n, block):
    q = hadamard_matrix(n, seed=7, dtype=torch.float64)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    # Structure: entries ±1/sqrt(block) inside diagonal blocks, 0 elsewhere.
    blocks = torch.block_diag(*[torch.ones(block, block, dtype=torch.float64)] * (n // block))
    assert torch.equal(q.abs() > 0, blocks > 0)
    assert torch.allclose(q.abs()[blocks > 0], torch.full_like(q[blocks > 0], 1 / math.sqrt(block)))


def test_explicit_block_and_errors():
    q = hadamard_matrix(256, seed=1, block=32)
    assert torch.allclose(q @ q.T, torch.eye(256), atol=1e-6)
    assert q[0, 32:].abs().sum() == 0
    with pytest.raises(ValueError, match="power of two dividing"):
        hadamard_matrix(96, block=64)
    with pytest.raises(ValueError, match="powers of two"):
        sylvester_hadamard(12)


def test_seed_makes_the_rotation_random_and_reproducible():
    a, b, c = (hadamard_matrix(128, seed=s) for s in (0, 0, 1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    signs = hadamard_signs(128, 0)
    assert set(signs.tolist()) == {-1.0, 1.0}
    assert torch.equal(a, signs.unsqueeze(1) * sylvester_hadamard(128) / math.sqrt(128))


@pytest.mark.parametrize("n,block", SIZES)
def test_fwht_blocked_equals_matrix_product(n, block):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    q = hadamard_matrix(n, seed=3, dtype=torch.float64)
    y = fwht_blocked(x, block, hadamard_signs(n, 3, dtype=torch.float64))
    assert y.shape == x.shape
    assert torch.allclose(y, x @ q, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_fwht_blocked_low_precision(dtype, tol):
    n, block = 1408, 128
    x = torch.randn(4, n)
    signs = hadamard_signs(n, 0)
    y = fwht_blocked(x.to(dtype), block, signs)
    assert y.dtype == dtype
    ref = x @ hadamard_matrix(n, 0)
    assert ((y.float() - ref).abs().max() / ref.abs().max()) < tol


def test_fwht_rejects_bad_block():
    with pytest.raises(ValueError, match="dividing the last dim"):
        fwht_blocked(torch.randn(2, 96), 64)


def test_rotation_spreads_outliers_and_helps_quantization():
    """The point of the rotation: a weight whose error is dominated by a few
    outlier input channels quantizes far better after W -> W Q (and back)."""
    torch.manual_seed(0)
    n, k = 64, 512
    w = torch.randn(n, k)
    w[:, torch.randperm(k)[:4]] *= 50.0
    q = hadamard_matrix(k, seed=0, block=128)
    scheme = parse_scheme("w4g128")
    direct = (fake_quantize(w, scheme) - w).norm()
    rotated = (fake_quantize(w @ q, scheme) @ q.T - w).norm()
    assert rotated < 0.5 * direct
