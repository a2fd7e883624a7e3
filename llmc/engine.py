"""The engine directory (docs/design.md): config.json, tokenizer/, and one folder per rank.

This module is the contract between the compiler, which writes engines, and the runtime, which
reads them; it asks each rank's backend which files the rank has, so it sits above llmc.backends.
Engines are shared artifacts, so loading one trusts nothing in it: config.json is parsed by a
strict schema (every field's type and range, no coercion), its file list must be exactly the files
the config implies (each a plain relative path inside the engine), and every listed file's size and
SHA-256 are checked before anything is loaded, so a missing, truncated or altered file is reported
by name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from llmc.engine_error import EngineError

SCHEMA_VERSION = 3
CONFIG = "config.json"
TOKENIZER_DIR = "tokenizer"
# What a checkpoint's tokenizer may consist of (an engine carries a copy in tokenizer/); one of
# TOKENIZER_REQUIRED at least.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
TOKENIZER_REQUIRED = ("tokenizer.json", "tokenizer.model", "vocab.json")


# Upper bounds of config.json's sizes: far above any model llmc builds, low enough that no value in
# range makes the runtime allocate absurd memory or loop for ages.
MAX_SEQ_LEN = 1 << 20
MAX_BATCH_TOKENS = 1 << 20
MAX_NUM_SEQS = 1 << 16
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_VOCAB = 1 << 24
MAX_RANKS = 1024
MAX_FILE_BYTES = 1 << 40
MAX_STAGE_ELEMENTS = 1 << 31  # a tensor a pipeline stage receives, at max_batch_tokens tokens
MAX_SEQUENCE_CACHE_BYTES = 1 << 38  # one full-length sequence's KV cache on a rank: the least the runtime allocates

MODEL_DTYPES = ("float32", "bfloat16", "float16")
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "int64": 8, "int32": 4}
BACKEND_NAMES = ("torch", "onnx", "tensorrt")
QUANT_MODES = ("fp8", "fp8-dynamic", "fp8-weight-only", "nvfp4", "nvfp4-weight-only")
QUANT_ALGOS = ("rtn", "mse", "awq", "gptq", "smoothquant")  # llmc/passes/quant_algos
COLLECTIVES = {"llmc::all_reduce": set(), "llmc::all_gather": {"full_size"}}  # and their int arguments
TENSORRT_BUILDERS = ("tensorrt", "tensorrt_rtx")


def _range(lo: int, hi: int):
    return Field(ge=lo, le=hi)


class _Schema(BaseModel):
    # Strict: "2" is no int and 2.0 no int; a field this llmc does not know is an error, not ignored.
    model_config = ConfigDict(strict=True, extra="forbid")


class KVCache(_Schema):
    num_layers: int = _range(1, MAX_LAYERS)
    num_kv_heads: int = _range(1, MAX_HEADS)
    head_dim: int = _range(1, MAX_HEAD_DIM)
    dtype: Literal["float32", "bfloat16", "float16", "float8_e4m3fn"]
    block_size: int = _range(1, MAX_SEQ_LEN)


class RankKVCache(_Schema):
    num_layers: int = _range(1, MAX_LAYERS)
    num_kv_heads: int = _range(1, MAX_HEADS)
    head_dim: int = _range(1, MAX_HEAD_DIM)


class Limits(_Schema):
    max_seq_len: int = _range(2, MAX_SEQ_LEN)
    max_batch_tokens: int = _range(1, MAX_BATCH_TOKENS)
    max_num_seqs: int = _range(1, MAX_NUM_SEQS)


class Mapping(_Schema):
    tp: int = _range(1, MAX_RANKS)
    ep: int = Field(default=1, ge=1, le=MAX_RANKS)  # expert parallel: a pipeline stage has tp x ep ranks
    pp: int = _range(1, MAX_RANKS)
    pp_layers: list[int] = Field(min_length=1, max_length=MAX_RANKS)


class StageOutput(_Schema):
    shape: list[int] = Field(max_length=8)  # -1: the step's token count
    dtype: Literal["float32", "bfloat16", "float16", "int64", "int32"]


class StageInput(StageOutput):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class OnnxModel(_Schema):
    onnx: str = Field(pattern=r"^[A-Za-z0-9_]+\.onnx$")


class Collective(_Schema):
    collective: Literal[tuple(COLLECTIVES)]
    input: str
    output: str
    args: dict[str, int]

    @model_validator(mode="after")
    def _arguments(self) -> "Collective":
        if set(self.args) != COLLECTIVES[self.collective]:
            raise ValueError(f"{self.collective} takes the arguments {sorted(COLLECTIVES[self.collective])}, not {sorted(self.args)}")
        return self


class OnnxProgram(BaseModel):
    """What the ONNX and TensorRT runners read of a rank's backend record (the rest is a report)."""

    model_config = ConfigDict(strict=True, extra="allow")
    # Each step an ONNX model or a collective, told apart by its "onnx" key (so errors name the one meant).
    program: list[Annotated[Annotated[OnnxModel, Tag("onnx")] | Annotated[Collective, Tag("collective")],
                            Discriminator(lambda part: "onnx" if isinstance(part, dict) and "onnx" in part else "collective")]
                  ] = Field(min_length=1)
    outputs: list[str] = Field(min_length=1)


class TensorRTEngine(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    engine: str = Field(pattern=r"^[A-Za-z0-9_]+\.engine$")
    package: Literal[TENSORRT_BUILDERS]  # imported to load the engine: never another module
    version: str
    target: str | list[str]


class TensorRTProgram(OnnxProgram):
    tensorrt: list[TensorRTEngine]


BACKEND_RECORDS = {"onnx": OnnxProgram, "tensorrt": TensorRTProgram}


class Rank(_Schema):
    kv_cache: RankKVCache
    pp_inputs: list[StageInput]
    pp_outputs: list[StageOutput]
    passes: list[dict[str, Any]]
    backend: dict[str, Any] = Field(default_factory=dict)


class Calibration(_Schema):
    source: str
    samples: int = Field(ge=0)
    tokens: int = Field(ge=0)


class PrequantizedSource(_Schema):
    """The checkpoint's own quantization, read as it is (llmc/frontend/prequantized.py)."""
    format: Literal["compressed-tensors", "modelopt"]
    version: Optional[str]
    scheme: str
    kv_cache_scales: bool


class Quantization(_Schema):
    mode: Optional[Literal[QUANT_MODES]]
    algo: Literal[QUANT_ALGOS] = "rtn"
    kv_cache_dtype: Optional[Literal["fp8"]]
    exclude: list[str]
    calibration: Optional[Calibration]
    checkpoint: Optional[PrequantizedSource] = None


class Rope(_Schema):
    """RoPE whose frequencies depend on the sequence's length (llmc/frontend/rope.py): its keys depend on more
    than the tokens before them, so no prefix is shared; above `recompute_above` tokens a sequence recomputes
    its cache once (Phi-3's switch from short to long factors, as transformers' generate does)."""
    type: Literal["longrope", "dynamic"]
    recompute_above: Optional[int] = Field(default=None, ge=1, le=MAX_SEQ_LEN)


class FileEntry(_Schema):
    bytes: int = _range(0, MAX_FILE_BYTES)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ConfigSchema(_Schema):
    """config.json: every field's type and range, and the rules between fields."""

    architecture: str
    model_type: str
    dtype: Literal[MODEL_DTYPES]
    backend: Literal[BACKEND_NAMES]
    vocab_size: int = _range(1, MAX_VOCAB)
    kv_cache: KVCache
    limits: Limits
    eos_token_ids: list[int]
    mapping: Mapping
    ranks: list[Rank]
    quantization: Optional[Quantization]
    rope: Optional[Rope]
    tokenizer_class: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    files: dict[str, FileEntry]
    passes: list[dict[str, Any]]
    build: dict[str, Any]
    schema_version: Literal[SCHEMA_VERSION]

    @model_validator(mode="after")
    def _consistent(self) -> "ConfigSchema":
        tp, ep, pp, layers = self.mapping.tp, self.mapping.ep, self.mapping.pp, self.mapping.pp_layers
        stage = tp * ep  # ranks per pipeline stage
        mapping = f"tp={tp}{f' x ep={ep}' if ep > 1 else ''} x pp={pp}"
        if stage * pp > MAX_RANKS:
            raise ValueError(f"mapping {mapping} is more than {MAX_RANKS} ranks")
        if len(self.ranks) != stage * pp:
            raise ValueError(f"ranks has {len(self.ranks)} entries, but mapping {mapping} needs {stage * pp}")
        if len(layers) != pp or sum(layers) != self.kv_cache.num_layers:
            raise ValueError(f"mapping.pp_layers {layers} must be {pp} stages holding kv_cache.num_layers="
                             f"{self.kv_cache.num_layers} layers in all")
        if not all(0 <= t < self.vocab_size for t in self.eos_token_ids):
            raise ValueError(f"eos_token_ids must be token ids in [0, vocab_size={self.vocab_size})")
        fp8_cache = self.quantization is not None and self.quantization.kv_cache_dtype == "fp8"
        if self.kv_cache.dtype != ("float8_e4m3fn" if fp8_cache else self.dtype):
            raise ValueError(f"kv_cache.dtype {self.kv_cache.dtype} is not the engine's dtype {self.dtype}, or float8_e4m3fn "
                             "with quantization.kv_cache_dtype fp8")
        block = self.kv_cache.block_size
        sequence_tokens = -(-self.limits.max_seq_len // block) * block
        for r, rank in enumerate(self.ranks):
            kv = rank.kv_cache
            if kv.num_layers != layers[r // stage] or kv.head_dim != self.kv_cache.head_dim or kv.num_kv_heads > self.kv_cache.num_kv_heads:
                raise ValueError(f"ranks[{r}].kv_cache {kv.model_dump()} does not match kv_cache and mapping.pp_layers")
            cache_bytes = 2 * kv.num_layers * kv.num_kv_heads * kv.head_dim * ITEMSIZE[self.kv_cache.dtype] * sequence_tokens
            if cache_bytes > MAX_SEQUENCE_CACHE_BYTES:
                raise ValueError(f"ranks[{r}]: one max_seq_len sequence's KV cache would take {cache_bytes / (1 << 30):.0f} GiB "
                                 f"(at most {MAX_SEQUENCE_CACHE_BYTES >> 30} GiB)")
            for kind in ("pp_inputs", "pp_outputs"):
                for i, spec in enumerate(getattr(rank, kind)):
                    numel = 1
                    for d in spec.shape:
                        numel *= self.limits.max_batch_tokens if d == -1 else d
                    if not all(d == -1 or d >= 1 for d in spec.shape) or numel > MAX_STAGE_ELEMENTS:
                        raise ValueError(f"ranks[{r}].{kind}[{i}]: bad shape {spec.shape}")
            if self.backend in BACKEND_RECORDS:
                try:
                    BACKEND_RECORDS[self.backend].model_validate(rank.backend)
                except ValidationError as e:
                    raise ValueError(f"ranks[{r}].backend: {_schema_errors(e)}") from None
        for rel in self.files:
            check_relative_path(rel)
        return self


def check_relative_path(rel: str) -> None:
    """A plain relative POSIX path inside the engine: no absolute path, `..`, `.`, empty part or backslash."""
    if not rel or "\\" in rel or "\0" in rel or rel.startswith("/") or any(p in ("", ".", "..") for p in rel.split("/")):
        raise ValueError(f"files: {rel!r} is not a relative path inside the engine directory")


def _schema_errors(e: ValidationError) -> str:
    """pydantic's first errors as `field: problem (got value)`."""

    def line(err) -> str:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        got = "" if err["type"] == "value_error" else f" (got {repr(err['input'])[:60]})"
        return f"{where}: {msg}{got}" if where else msg

    return "; ".join(map(line, e.errors()[:3])) + (f"; and {e.error_count() - 3} more" if e.error_count() > 3 else "")


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
    # tp, ep (expert parallel; absent: 1), pp, and pp_layers (layers per pipeline stage).
    mapping: dict[str, Any]
    # One entry per rank (rank = pp_rank * stage_ranks + ep_rank * tp + tp_rank): its slice of the KV cache {num_layers,
    # num_kv_heads, head_dim}, the tensors it receives from the previous pipeline stage and sends to
    # the next ([{name, shape (-1: the step's token count), dtype}]), and its passes' records.
    ranks: list[dict[str, Any]]
    # {mode, algo, kv_cache_dtype, exclude, calibration {source, samples, tokens}, checkpoint (a pre-quantized
    # checkpoint's format, version, scheme, kv_cache_scales)}, or None.
    quantization: dict[str, Any] | None = None
    # {type: longrope | dynamic, recompute_above: tokens or None} for length-dependent RoPE, else None.
    rope: dict[str, Any] | None = None
    # The class AutoTokenizer resolved from the checkpoint (transformers picks some by the model's config, which
    # the engine does not carry); load_tokenizer loads tokenizer/ with it.
    tokenizer_class: str | None = None
    # relative path -> {"bytes": n, "sha256": hex}
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    # One record per whole-model pass: what it matched, how long it took.
    passes: list[dict[str, Any]] = field(default_factory=list)
    build: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def stage_ranks(self) -> int:
        """Ranks per pipeline stage: tp x ep."""
        return self.mapping["tp"] * self.mapping.get("ep", 1)

    @property
    def world_size(self) -> int:
        return self.stage_ranks * self.mapping["pp"]

    def save(self, engine_dir: Path) -> None:
        (Path(engine_dir) / CONFIG).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, engine_dir: str | Path) -> "EngineConfig":
        """config.json, checked by ConfigSchema, with a file list that is exactly the engine's files."""
        path = Path(engine_dir) / CONFIG
        if not path.is_file():
            raise EngineError(f"{engine_dir} is not an llmc engine: it has no {CONFIG} (build one with `llmc build`)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise EngineError(f"{path} is corrupt ({e}); rebuild the engine") from None
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if version != SCHEMA_VERSION:
            raise EngineError(
                f"{path} has schema version {version!r}; this llmc reads version {SCHEMA_VERSION}. Rebuild the engine."
            )
        try:
            ConfigSchema.model_validate(raw)
        except ValidationError as e:
            raise EngineError(f"{path} is not a valid engine config: {_schema_errors(e)}. Rebuild the engine.") from None
        config = cls(**raw)  # strict validation coerced nothing: raw is what was checked
        missing, unexpected = _file_list_errors(config)
        if missing or unexpected:
            raise EngineError(
                f"{path}: files must list exactly the engine's files; "
                + "; ".join([f"missing {f}" for f in missing] + [f"unexpected {f}" for f in unexpected])
                + ". Rebuild the engine."
            )
        return config


def _file_list_errors(config: EngineConfig) -> tuple[list[str], list[str]]:
    """The files a {config.backend} engine needs that files does not list, and those it lists that are no engine file."""
    from llmc.backends import get_backend

    backend = get_backend(config.backend)
    required, optional = set(), {f"{TOKENIZER_DIR}/{name}" for name in TOKENIZER_FILES}
    for rank, info in enumerate(config.ranks):
        rank_required, rank_optional = backend.rank_files(info.get("backend", {}))
        required |= {f"rank{rank}/{name}" for name in rank_required}
        optional |= {f"rank{rank}/{name}" for name in rank_optional}
    listed = set(config.files)
    missing = sorted(required - listed)
    if not any(f"{TOKENIZER_DIR}/{name}" in listed for name in TOKENIZER_REQUIRED):
        missing.append(f"{TOKENIZER_DIR}/ ({' or '.join(TOKENIZER_REQUIRED)})")
    return missing, sorted(listed - required - optional)


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
    """Check the listed files under the given prefixes (each a regular file inside engine_dir, of the listed size and
    SHA-256), and that tokenizer/ holds no file the list does not name (the tokenizer loader reads what is there);
    raises EngineError naming the first bad one."""
    engine_dir = Path(engine_dir)
    root = engine_dir.resolve()
    for rel, expected in config.files.items():
        if not rel.startswith(prefixes):
            continue
        path = engine_dir / rel
        if not path.resolve().is_relative_to(root):
            raise EngineError(f"engine file {path} leads outside the engine directory (a symlink?); rebuild the engine")
        if not path.is_file():
            raise EngineError(f"engine file {path} is missing; rebuild the engine or restore the file")
        if path.stat().st_size != expected["bytes"]:
            raise EngineError(
                f"engine file {path} has {path.stat().st_size} bytes, expected {expected['bytes']} (truncated?); rebuild the engine"
            )
        if file_digest(path)["sha256"] != expected["sha256"]:
            raise EngineError(f"engine file {path} was altered (SHA-256 mismatch); rebuild the engine")
    if TOKENIZER_DIR.startswith(prefixes) and (engine_dir / TOKENIZER_DIR).is_dir():
        for path in sorted((engine_dir / TOKENIZER_DIR).iterdir()):
            if path.relative_to(engine_dir).as_posix() not in config.files:
                raise EngineError(f"{path} is not in the engine's file list; remove it or rebuild the engine")


def load_tokenizer(engine_dir: str | Path, config: EngineConfig | None = None):
    """The engine's tokenizer/ as the class AutoTokenizer chose for its checkpoint, so ids are the checkpoint's.
    The class is looked up among transformers' own tokenizer classes only; remote code is never run."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    config = config or EngineConfig.load(engine_dir)
    path = Path(engine_dir) / TOKENIZER_DIR
    if config.tokenizer_class is None:  # an EngineConfig made in code, not loaded
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    cls = tokenizer_class_from_name(config.tokenizer_class)
    if cls is None:
        raise EngineError(f"{Path(engine_dir) / CONFIG}: tokenizer_class {config.tokenizer_class!r} is not a tokenizer class "
                          "of this transformers; rebuild the engine, or install the transformers that built it")
    return cls.from_pretrained(path)
