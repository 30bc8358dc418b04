"""benchmarks/tile_sweep.py's candidate grid (host logic only; the sweep itself runs on a GPU)."""

from __future__ import annotations

from benchmarks.tile_sweep import candidates
from vllm_mxmoe.kernels.configs import select_gemm_config


def test_grid_starts_with_the_shipped_config_and_every_tile_fits():
    shipped = select_gemm_config(16, 8, 128, 2048, 768, [128], sms=132)
    grid = candidates(shipped, 2048, 768, [128], swap_ab=True)
    assert grid[0] == shipped and len(grid) == len(set(grid)) > 20
    assert all(768 % c.block_k == 0 and 128 % c.block_k == 0 and c.split_k <= 768 // c.block_k for c in grid)
    assert {c.swap_ab for c in grid} == {False, True}
    assert not any(c.swap_ab for c in candidates(shipped, 2048, 768, [128])[1:])
