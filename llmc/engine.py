"""The engine directory (DESIGN.md): config.json, tokenizer/, and one folder per rank.

This module is the contract between the backends, which write engines, and the runtime, which
reads them. config.json lists every file with its size and SHA-256, so a missing, truncated or
altered file is reported by name before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 3
CONFIG = "config.json"


class EngineError(ValueError):
    """An engine directory that cannot be loaded; the message names the file and the fix."""


@dataclass
class EngineConfig:
    architecture: str
    model_type: str
    dtype: str
    backend: str
    vocab_size: int
    # The model's KV cache: num_layers, num_kv_heads, head_dim, block_size, dtype.
    kv_cache: dict[str, Any]
    # max_seq_len, max_batch_tokens, max_num_seqs.
    limits: dict[str, int]
    eos_token_ids: list[int]
    # tp, pp, and pp_layers (layers per pipeline stage).
    mapping: dict[str, Any]
    # One entry per rank (rank = pp_rank * tp + tp_rank): its slice of the KV cache {num_layers,
    # num_kv_heads, head_dim}, the tensors it receives from the previous pipeline stage and sends to
    # the next ([{name, shape (-1: the step's token count), dtype}]), and its passes' records.
    ranks: list[dict[str, Any]]
    # {mode, kv_cache_dtype, exclude, calibration {source, samples, tokens}}, or None.
    quantization: dict[str, Any] | None = None
    # relative path -> {"bytes": n, "sha256": hex}
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    # One record per whole-model pass: what it matched, how long it took.
    passes: list[dict[str, Any]] = field(default_factory=list)
    build: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def world_size(self) -> int:
        return self.mapping["tp"] * self.mapping["pp"]

    def save(self, engine_dir: Path) -> None:
        (Path(engine_dir) / CONFIG).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, engine_dir: str | Path) -> "EngineConfig":
        path = Path(engine_dir) / CONFIG
        if not path.is_file():
            raise EngineError(f"{engine_dir} is not an llmc engine: it has no {CONFIG} (build one with `llmc build`)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EngineError(f"{path} is corrupt ({e}); rebuild the engine") from None
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if version != SCHEMA_VERSION:
            raise EngineError(
                f"{path} has schema version {version!r}; this llmc reads version {SCHEMA_VERSION}. Rebuild the engine."
            )
        try:
            return cls(**raw)
        except TypeError as e:
            raise EngineError(f"{path} does not match the engine schema ({e}); rebuild the engine") from None


def file_digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def record_files(engine_dir: Path, config: EngineConfig) -> None:
    """List every file under engine_dir (but config.json) with its digest."""
    config.files = {
        p.relative_to(engine_dir).as_posix(): file_digest(p)
        for p in sorted(engine_dir.rglob("*"))
        if p.is_file() and p.name != CONFIG
    }


def verify_files(engine_dir: str | Path, config: EngineConfig, prefixes: tuple[str, ...] = ("",)) -> None:
    """Check the listed files under the given prefixes; raises EngineError naming the first bad one."""
    engine_dir = Path(engine_dir)
    for rel, expected in config.files.items():
        if not rel.startswith(prefixes):
            continue
        path = engine_dir / rel
        if not path.is_file():
            raise EngineError(f"engine file {path} is missing; rebuild the engine or restore the file")
        if path.stat().st_size != expected["bytes"]:
            raise EngineError(
                f"engine file {path} has {path.stat().st_size} bytes, expected {expected['bytes']} (truncated?); rebuild the engine"
            )
        if file_digest(path)["sha256"] != expected["sha256"]:
            raise EngineError(f"engine file {path} was altered (SHA-256 mismatch); rebuild the engine")
