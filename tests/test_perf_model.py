"""Perf model: roofline shape, measured-table interpolation, table validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from offline.perf_model import H200, GpuSpec, PerfModel, PerfTableError, roofline_us
from vllm_mxmoe.schemes import KNOWN_SCHEMES, parse_scheme

N, K = 2816, 2048  # a Qwen1.5-MoE gate_up block
TOKEN_GRID = [0, 0.25, 1, 2, 3.5, 8, 16, 64, 256, 1024, 4096, 16384, 65536]


def write_table(tmp_path: Path, entries: list, device: str = "test-gpu") -> Path:
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"device": device, "entries": entries}))
    return path


@pytest.mark.parametrize("scheme", KNOWN_SCHEMES)
def test_roofline_monotone_in_tokens_and_zero_at_zero(scheme: str) -> None:
    model = PerfModel()
    times = [model.time_us(scheme, N, K, t) for t in TOKEN_GRID]
    assert times[0] == 0.0
    assert all(b >= a for a, b in zip(times, times[1:])), times
    assert times[1] > 0  # a fraction of a token still reads the whole weight


def test_roofline_is_memory_bound_at_few_tokens() -> None:
    model = PerfModel()
    for name in ("w2g128", "w4g128", "w8", "w8a8fp8"):
        scheme = parse_scheme(name)
        bytes_moved = scheme.storage_bits(N, K) / 8 + 2 * 1 * (N + K)
        expected = bytes_moved / 4.3e12 * 1e6 + H200.block_overhead_us
        assert model.time_us(name, N, K, 1) == pytest.approx(expected, rel=1e-12)
    # fewer bits stream fewer bytes: faster when memory bound
    t = {name: model.time_us(name, N, K, 1) for name in ("w2g128", "w3g128", "w4g128", "w8")}
    assert t["w2g128"] < t["w3g128"] < t["w4g128"] < t["w8"]


def test_roofline_is_compute_bound_at_many_tokens_and_fp8_is_faster() -> None:
    model = PerfModel()
    tokens = 65536
    flops = 2 * N * K * tokens
    w8a8 = model.time_us("w8a8fp8", N, K, tokens)
    assert w8a8 == pytest.approx(flops / (2 * 790e12) * 1e6 + H200.block_overhead_us, rel=1e-12)
    w4 = model.time_us("w4g128", N, K, tokens)
    dequant = 1 + H200.dequant_compute_penalty
    assert w4 == pytest.approx(flops / 790e12 * dequant * 1e6 + H200.block_overhead_us, rel=1e-12)
    assert w8a8 < w4


def test_other_gpu_changes_memory_bound_time() -> None:
    slow = GpuSpec(name="half-bandwidth", hbm_bytes_per_s=2.15e12, block_overhead_us=0.0)
    fast = GpuSpec(name="h200-no-overhead", block_overhead_us=0.0)
    scheme = parse_scheme("w4g128")
    assert roofline_us(scheme, N, K, 1, slow) == pytest.approx(2 * roofline_us(scheme, N, K, 1, fast))


def test_invalid_queries_raise() -> None:
    model = PerfModel()
    with pytest.raises(ValueError, match="tokens"):
        model.time_us("w4g128", N, K, -1)
    with pytest.raises(ValueError, match="shape"):
        model.time_us("w4g128", 0, K, 1)
    with pytest.raises(ValueError, match="unknown scheme"):
        model.time_us("w5g128", N, K, 1)


MEASURED = [
    {"scheme": "w4g128", "n": N, "k": K, "tokens": 1, "us": 5.0},
    {"scheme": "w4g128", "n": N, "k": K, "tokens": 16, "us": 6.0},
    {"scheme": "w4g128", "n": N, "k": K, "tokens": 256, "us": 20.0},
    {"scheme": "w4g128", "n": N, "k": K, "tokens": 4096, "us": 200.0},
]


def test_table_hits_measured_points_exactly(tmp_path: Path) -> None:
    model = PerfModel.from_json(write_table(tmp_path, MEASURED))
    assert model.device == "test-gpu"
    assert model.measured_schemes == {"w4g128"}
    for entry in MEASURED:
        assert model.time_us("w4g128", N, K, entry["tokens"]) == entry["us"]


def test_table_interpolates_log_log_between_points(tmp_path: Path) -> None:
    model = PerfModel.from_json(write_table(tmp_path, MEASURED))
    # geometric midpoint of 16 and 256 tokens -> geometric mean of the times
    assert model.time_us("w4g128", N, K, 64) == pytest.approx(np.sqrt(6.0 * 20.0), rel=1e-12)
    times = [model.time_us("w4g128", N, K, t) for t in TOKEN_GRID]
    assert times[0] == 0.0
    assert all(b >= a for a, b in zip(times, times[1:])), times


def test_table_extrapolates_with_roofline_shape(tmp_path: Path) -> None:
    model = PerfModel.from_json(write_table(tmp_path, MEASURED))
    below = model.time_us("w4g128", N, K, 0.25)
    assert 0 < below <= 5.0
    assert below == pytest.approx(5.0, rel=0.01)  # memory bound: nearly flat below 1 token
    above = model.time_us("w4g128", N, K, 65536)
    scheme = parse_scheme("w4g128")
    ratio = roofline_us(scheme, N, K, 65536) / roofline_us(scheme, N, K, 4096)
    assert above == pytest.approx(200.0 * ratio, rel=1e-12)
    assert above > 200.0 * 10  # compute bound: grows about linearly with tokens


def test_table_scales_by_weight_size_for_other_shapes(tmp_path: Path) -> None:
    model = PerfModel.from_json(write_table(tmp_path, MEASURED))
    assert model.time_us("w4g128", 2 * N, K, 16) == pytest.approx(12.0, rel=1e-12)
    assert model.time_us("w4g128", N // 2, K // 2, 256) == pytest.approx(5.0, rel=1e-12)


def test_table_picks_closest_measured_shape(tmp_path: Path) -> None:
    entries = MEASURED + [{"scheme": "w4g128", "n": 256, "k": 256, "tokens": 16, "us": 1.0}]
    model = PerfModel.from_json(write_table(tmp_path, entries))
    assert model.time_us("w4g128", 512, 256, 16) == pytest.approx(2.0, rel=1e-12)  # from 256x256
    assert model.time_us("w4g128", N, 2 * K, 16) == pytest.approx(12.0, rel=1e-12)  # from N x K
    # same element count, different aspect: the exact shape wins
    square_and_wide = [
        {"scheme": "w8", "n": 1024, "k": 1024, "tokens": 16, "us": 3.0},
        {"scheme": "w8", "n": 4096, "k": 256, "tokens": 16, "us": 4.0},
    ]
    model = PerfModel.from_json(write_table(tmp_path, square_and_wide))
    assert model.time_us("w8", 4096, 256, 16) == 4.0
    assert model.time_us("w8", 1024, 1024, 16) == 3.0


def test_table_falls_back_to_roofline_for_other_schemes(tmp_path: Path) -> None:
    model = PerfModel.from_json(write_table(tmp_path, MEASURED))
    for t in (1, 100):
        assert model.time_us("w8", N, K, t) == roofline_us(parse_scheme("w8"), N, K, t)


def test_noisy_table_stays_monotone(tmp_path: Path) -> None:
    noisy = [
        {"scheme": "w8", "n": N, "k": K, "tokens": 1, "us": 10.0},
        {"scheme": "w8", "n": N, "k": K, "tokens": 2, "us": 9.5},  # timing noise
        {"scheme": "w8", "n": N, "k": K, "tokens": 8, "us": 12.0},
    ]
    model = PerfModel.from_json(write_table(tmp_path, noisy))
    times = [model.time_us("w8", N, K, t) for t in (1, 1.5, 2, 4, 8)]
    assert all(b >= a for a, b in zip(times, times[1:])), times


def test_malformed_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"device": "x", "entries": [')
    with pytest.raises(PerfTableError, match="broken.json: not valid JSON"):
        PerfModel.from_json(path)


@pytest.mark.parametrize(
    "entry, problem",
    [
        ({"scheme": "w4g128", "n": N, "k": K, "tokens": 4}, r"missing field\(s\) us"),
        ({"scheme": "w5", "n": N, "k": K, "tokens": 4, "us": 1.0}, "unknown scheme 'w5'"),
        ({"scheme": "w4g128", "n": N, "k": K, "tokens": 4, "us": -1.0}, "'us' must be a positive"),
        ({"scheme": "w4g128", "n": 2.5, "k": K, "tokens": 4, "us": 1.0}, "'n' must be a positive integer"),
        ({"scheme": "w4g128", "n": N, "k": K, "tokens": 0, "us": 1.0}, "'tokens' must be a positive"),
        ([1, 2, 3], "expected an object"),
    ],
)
def test_malformed_entry_names_file_entry_and_problem(tmp_path: Path, entry, problem: str) -> None:
    path = write_table(tmp_path, [MEASURED[0], entry])
    with pytest.raises(PerfTableError, match=problem) as info:
        PerfModel.from_json(path)
    assert str(path) in str(info.value)
    assert "entry 1" in str(info.value)


def test_malformed_top_level_and_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"device": "x", "rows": []}))
    with pytest.raises(PerfTableError, match="'entries' list"):
        PerfModel.from_json(path)
    path.write_text(json.dumps({"entries": []}))
    with pytest.raises(PerfTableError, match="'device' must be a string"):
        PerfModel.from_json(path)
    with pytest.raises(PerfTableError, match="entry 1 .*duplicate"):
        PerfModel.from_json(write_table(tmp_path, [MEASURED[0], dict(MEASURED[0])]))
