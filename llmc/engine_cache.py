"""Engines built from checkpoints on demand (`llmc serve HF_DIR`, `LLM("hf_dir")`), cached and reused.

An engine lives in `$LLMC_CACHE/engines/NAME-KEY` (`~/.cache/llmc` by default), KEY a hash of the
checkpoint's content, the build options and the engine format. A build runs under a lock (a second
process waits and then reuses it), writes into a temporary folder and renames it into place at the
end, so a killed build leaves nothing that a later run would take for an engine.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from llmc.engine import CONFIG, SCHEMA_VERSION, EngineConfig, EngineError

# What `build` takes that decides the engine; anything else (logging, verification) does not change it.
BUILD_OPTIONS = ("dtype", "max_seq_len", "max_batch_tokens", "max_num_seqs", "tp", "pp", "ep", "pp_layers", "backend", "quant",
                 "quant_algo", "kv_cache_dtype", "calib_data", "calib_samples", "exclude")


def cache_root() -> Path:
    return Path(os.environ.get("LLMC_CACHE") or Path.home() / ".cache" / "llmc")


# Keys only an llmc engine's config.json has (a damaged one, missing its schema version, is still named as an engine).
ENGINE_KEYS = {"schema_version", "ranks", "files"}


def is_engine(path: str | os.PathLike) -> bool:
    """An llmc engine directory, not a HF checkpoint."""
    config = Path(path) / CONFIG
    if not config.is_file():
        return False
    try:
        keys = json.loads(config.read_text())
    except (ValueError, OSError):
        return False
    return isinstance(keys, dict) and bool(ENGINE_KEYS & keys.keys())


def checkpoint_hash(path: Path) -> str:
    """SHA-256 over the checkpoint's files (names and contents), memoized by their sizes and mtimes."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.relative_to(path).parts)
    stamp = hashlib.sha256(json.dumps([(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]).encode()).hexdigest()
    memo = cache_root() / "checkpoint-hashes" / stamp
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest.hexdigest())
    return digest.hexdigest()


def cached_engine(model: str | os.PathLike, log: Callable[[str], None] = print, verbose: bool = False, **options) -> Path:
    """The engine of checkpoint `model` (a HF directory or hub id) built with `options` (`llmc.build`'s);
    built into the cache the first time, reused after."""
    from llmc.compiler import build, checkpoint_dtype, normalize_dtype
    from llmc.frontend.checkpoint import Checkpoint

    unknown = set(options) - set(BUILD_OPTIONS)
    if unknown:
        raise TypeError(f"unknown build options: {', '.join(sorted(unknown))}")
    ckpt = Checkpoint(model)  # downloads a hub id; checks it is a causal LM
    ckpt_path = ckpt.path
    dtype = normalize_dtype(options.get("dtype", "float32"))
    options["dtype"] = checkpoint_dtype(ckpt.config) if dtype == "auto" else dtype  # one engine for "auto" and its dtype
    if options.get("calib_data") is not None:
        options["calib_data"] = str(Path(options["calib_data"]).resolve())
    key_source = {
        "checkpoint": checkpoint_hash(ckpt_path),
        "calib_data": hashlib.sha256(Path(options["calib_data"]).read_bytes()).hexdigest() if options.get("calib_data") else None,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(_with_defaults(options, build).items())
                    if k != "calib_data"},
        "schema_version": SCHEMA_VERSION,
        "llmc": __import__("llmc").__version__,
    }
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:16]
    engines = cache_root() / "engines"
    engines.mkdir(parents=True, exist_ok=True)
    target = engines / f"{ckpt_path.resolve().name}-{key}"
    with _locked(engines / f".{target.name}.lock"):
        if _usable(target):
            log(f"[llmc] using the cached engine {target}")
            return target
        log(f"[llmc] building an engine for {model} into the cache (once; later runs reuse it): {target}")
        building = Path(tempfile.mkdtemp(prefix=f".building-{target.name}-", dir=engines))
        try:
            build(ckpt_path, building / "engine", log=log, verbose=verbose, **options)
            if target.exists():  # an unusable leftover (an older llmc's engine): replace it
                shutil.rmtree(target)
            os.rename(building / "engine", target)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    log(f"[llmc] engine cached at {target}")
    return target


def resolve_engine(model: str | os.PathLike, log: Callable[[str], None] = print, verbose: bool = False, **options) -> Path:
    """An engine directory for `model`: itself if it is one (then `options`, build options given explicitly,
    must agree with how it was built), else the cached engine of the checkpoint built with `options`."""
    if not is_engine(model):
        return cached_engine(model, log=log, verbose=verbose, **options)
    config = EngineConfig.load(model)
    quant = config.quantization or {}
    built = {"dtype": config.dtype, "tp": config.mapping["tp"], "pp": config.mapping["pp"], "ep": config.mapping.get("ep", 1), "backend": config.backend,
             "quant": quant.get("mode"), "quant_algo": quant.get("algo", "rtn"), "kv_cache_dtype": quant.get("kv_cache_dtype"),
             "max_batch_tokens": config.limits["max_batch_tokens"], "pp_layers": config.mapping["pp_layers"]}
    for name, value in options.items():
        if name == "dtype" and value is not None:
            from llmc.compiler import DTYPE_ALIASES

            value = DTYPE_ALIASES.get(value, value)
            if value == "auto":
                continue
        if name not in built:
            raise ValueError(f"{model} is an engine, already built; the build option {name} applies to a checkpoint only")
        if value != built[name]:
            raise ValueError(f"{model} is an engine built with {name}={built[name]}, not {value}; drop the option, or give "
                             "the checkpoint to build an engine with it")
    return Path(model)


def _with_defaults(options: dict, build) -> dict:
    """Every build option, given or `build`'s default: the same engine has one key however it was asked for."""
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(build).parameters.items() if k in BUILD_OPTIONS}
    return {**defaults, **options}


def _usable(engine: Path) -> bool:
    if not (engine / CONFIG).is_file():
        return False
    try:
        EngineConfig.load(engine)
        return True
    except EngineError:
        return False


@contextlib.contextmanager
def _locked(lock_file: Path):
    """An exclusive lock held while the block runs; the OS releases it if the process dies."""
    with open(lock_file, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
