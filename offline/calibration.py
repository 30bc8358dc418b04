"""Calibration text -> token sequences of equal length for profiling.

Sequences are non-overlapping windows of ``seq_len`` tokens, spread evenly over
the whole file (not just its beginning) so that the calibration sees as many
kinds of text as the file holds.
"""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_SEQ_LEN = 512
# 256 sequences of 512 tokens, GPTQ's usual amount (128 x 2048). On the reference model every 3.25-bit
# row, uniform GPTQ and MxMoE, three Hadamard/sampling seeds, had lower test perplexity with 131,072
# calibration tokens than with 32,768, and MxMoE's margin over uniform GPTQ became robust
# (benchmarks/RESULTS.md section 3, session 9). Shorter texts are used whole.
DEFAULT_CALIB_TOKENS = 131072


class CalibrationError(ValueError):
    """The calibration text or its sequence settings cannot be used."""


def model_max_positions(config) -> int | None:
    """The longest sequence the model takes (max_position_embeddings), if it says."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if value else None


def check_seq_len(seq_len: int, max_positions: int | None) -> None:
    if seq_len < 2:
        raise CalibrationError(f"--seq-len must be at least 2 tokens, got {seq_len}")
    if max_positions is not None and seq_len > max_positions:
        raise CalibrationError(
            f"--seq-len {seq_len} is longer than the model takes (max_position_embeddings={max_positions})"
        )


def load_calibration(
    tokenizer_dir: str | Path,
    text_path: str | Path,
    seq_len: int = DEFAULT_SEQ_LEN,
    num_tokens: int = DEFAULT_CALIB_TOKENS,
    max_positions: int | None = None,
) -> torch.Tensor:
    """Token ids [num_sequences, seq_len] (int64), about ``num_tokens`` tokens in all.

    Raises CalibrationError for a missing/empty file, text shorter than one
    sequence, a seq_len the model cannot take, or a non-positive token count.
    """
    check_seq_len(seq_len, max_positions)
    if num_tokens < seq_len:
        raise CalibrationError(
            f"--calib-tokens {num_tokens} is less than one sequence of --seq-len {seq_len} tokens"
        )
    path = Path(text_path)
    if not path.is_file():
        raise CalibrationError(f"calibration text {path}: file not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise CalibrationError(f"calibration text {path} is empty")

    from transformers import AutoTokenizer

    # verbose=False: no "longer than the model takes" warning, the text is cut below
    ids = AutoTokenizer.from_pretrained(str(tokenizer_dir)).encode(text, verbose=False)
    available = len(ids) // seq_len
    if available == 0:
        raise CalibrationError(
            f"calibration text {path} is too short: {len(ids)} tokens, "
            f"fewer than one sequence of --seq-len {seq_len}"
        )
    wanted = min(num_tokens // seq_len, available)
    # Evenly spaced window indices over the file (all of them when wanted == available).
    starts = torch.linspace(0, available - 1, wanted).round().long().unique() * seq_len
    tokens = torch.tensor(ids, dtype=torch.long)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
