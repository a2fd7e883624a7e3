"""Calibration text -> token id samples for the calibrate pass.

The default corpus (llmc/data/calibration.txt) ships with llmc: excerpts of the Python language
reference (prose) interleaved with Python standard-library code, so it needs no download.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents; ValueError naming the file and the fix when it cannot serve."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"text file {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory; give a UTF-8 text file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8") from None
    if not text.strip():
        raise ValueError(f"{path} has no text; give a file with text in it")
    return text


def calibration_samples(tokenizer, path: str | os.PathLike | None, num_samples: int, seq_len: int) -> list[list[int]]:
    """Up to `num_samples` consecutive windows of `seq_len` tokens of the text (the last may be shorter)."""
    if num_samples < 1:
        raise ValueError(f"calibration samples must be >= 1, got {num_samples}")
    ids = tokenizer(read_text(path or DEFAULT_CORPUS), verbose=False)["input_ids"]
    if len(ids) < 2:
        raise ValueError(f"calibration text {path} is {len(ids)} token long; give at least a sentence")
    return [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)][:num_samples]
