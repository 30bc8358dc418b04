"""The reference model quantized to w8 per channel keeps its perplexity (through vLLM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from offline.cli import quantize_main
from offline.evaluate import eval_main, perplexity_hf, perplexity_vllm, token_windows
from tiny_models import REFERENCE_MOE

TEST_TEXT = REFERENCE_MOE.parent / "corpus" / "test.txt"
SEQ_LEN, WINDOWS = 512, 6  # a slice; benchmarks/RESULTS.md has the whole file


@pytest.fixture(scope="module")
def w8_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ppl") / "w8"
    assert quantize_main(["--model", str(REFERENCE_MOE), "--out", str(out), "--scheme", "w8"]) == 0
    return out


@pytest.mark.slow
def test_w8_perplexity_within_one_percent_and_backends_agree(w8_ckpt, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # vLLM runs in-process here
    windows = token_windows(REFERENCE_MOE, TEST_TEXT, SEQ_LEN, WINDOWS)
    base = perplexity_vllm(REFERENCE_MOE, windows, enforce_eager=True)
    quant = perplexity_vllm(w8_ckpt, windows, enforce_eager=True)
    assert base.tokens == quant.tokens == WINDOWS * (SEQ_LEN - 1)
    assert 5 < base.perplexity < 60  # the trained model, not noise
    assert abs(quant.perplexity / base.perplexity - 1) < 0.01, (base, quant)
    # transformers on the dequantized weights computes the same number.
    hf = perplexity_hf(w8_ckpt, windows)
    assert abs(hf.perplexity / quant.perplexity - 1) < 1e-3, (hf, quant)


def test_eval_names_a_model_folder_that_is_not_one(tmp_path, capsys):
    assert eval_main(["--model", str(tmp_path / "nowhere"), "--text", str(TEST_TEXT)]) == 2
    assert "nowhere: no config.json there" in capsys.readouterr().err
