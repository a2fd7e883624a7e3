"""`build`: HF checkpoint -> frontend -> passes -> backend -> engine directory."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.fx as fx

from llmc.backends import CONTIGUOUS_CACHE, get_backend
from llmc.backends.graph_format import GraphFormatError
from llmc.engine import CONFIG, MAX_SEQ_LEN, EngineConfig, record_files
from llmc.frontend.calibration import calibration_samples
from llmc.frontend.checkpoint import Checkpoint, CheckpointError
from llmc.frontend.export import DTYPES, trace
from llmc.frontend.prequantized import read as read_prequantized
from llmc.frontend.rope import engine_record, max_context
from llmc.passes import FIRST_RANK_PASS, PIPELINE, BuildContext, run_passes
from llmc.passes.manager import PassError
from llmc.passes.quant_algos import check_algo
from llmc.passes.quantize import QUANT_MODES, needs_calibration
from llmc.passes.quantize_kv_cache import KV_CACHE_DTYPES

CALIBRATION_SEQ_LEN = 256  # tokens per calibration sample
# What a build raises for a model it cannot compile: each a one-line message naming what is missing.
BUILD_ERRORS = (CheckpointError, PassError, GraphFormatError)


def build(
    model: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    max_seq_len: int | None = None,
    max_batch_tokens: int = 2048,
    max_num_seqs: int = 64,
    block_size: int = 16,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    pp_layers: list[int] | None = None,
    backend: str = "torch",
    quant: str | None = None,
    quant_algo: str = "rtn",
    kv_cache_dtype: str | None = None,
    calib_data: str | os.PathLike | None = None,
    calib_samples: int = 64,
    exclude: tuple[str, ...] = ("lm_head",),
    verify_passes: bool = False,
    dump_graphs: str | os.PathLike | None = None,
    force: bool = False,
    verbose: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Compile `model` (a HF directory or hub id) into an engine at `output_dir`; returns its path.

    With tp x ep x pp > 1 the engine has one directory per rank, each with only that rank's weights; the
    whole model is in memory once, and each rank's shard while it is written. `ep` splits each MoE layer's
    experts over ep ranks (and each expert over tp); attention and dense layers are replicated across them
    (docs/design.md, Parallelism).

    `quant` (fp8, fp8-dynamic, fp8-weight-only, nvfp4, nvfp4-weight-only) quantizes the linears but those matching
    `exclude`; `kv_cache_dtype="fp8"` stores the KV cache in FP8. Activation scales come from running
    the model on `calib_samples` windows of `calib_data` (a UTF-8 text file; llmc's own corpus by default).
    `quant_algo` (rtn, mse, awq, gptq, smoothquant) chooses how weights are quantized (llmc/passes/quant_algos).

    `dtype` may be "auto" (the checkpoint's own) or an alias (half, fp16, bf16, float, fp32). An existing
    engine at `output_dir` is replaced only with `force`. `verbose` logs every pass; otherwise a summary.
    """
    start = time.perf_counter()
    dtype = normalize_dtype(dtype)
    if quant is not None and quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {', '.join(QUANT_MODES)}, got {quant!r}")
    check_algo(quant, quant_algo, quant is not None and QUANT_MODES[quant][1] is not None)
    if quant == "fp8-dynamic" and backend != "torch":
        raise ValueError(f"--quant fp8-dynamic (per-token activation scales) runs on the torch backend only; for {backend} "
                         "use --quant fp8 (static, calibrated activation scales)")
    if kv_cache_dtype not in (None, *KV_CACHE_DTYPES):
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    for name, value in (("max_batch_tokens", max_batch_tokens), ("max_num_seqs", max_num_seqs), ("block_size", block_size),
                        ("tp", tp), ("pp", pp), ("ep", ep)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        if not (out / CONFIG).is_file():
            raise FileExistsError(f"{out} exists and is not an llmc engine; choose another output directory")
        if not force:
            raise FileExistsError(f"{out} already holds an engine; give --force (force=True) to replace it, or another -o")
    writer = get_backend(backend)
    if ep > 1 and backend != "torch":
        raise ValueError(f"ep > 1 (expert parallelism) runs on the torch backend only, not {backend}")

    ckpt = Checkpoint(model)
    tokenizer_files = ckpt.tokenizer_files()
    prequantized = read_prequantized(ckpt)
    if prequantized is not None:
        check_prequantized(prequantized, quant, backend)
        kv_cache_dtype = "fp8" if prequantized.kv_cache_scales else kv_cache_dtype
    if dtype == "auto":
        dtype = checkpoint_dtype(ckpt.config)
    check_mapping(ckpt.config, tp, pp, pp_layers)
    vocab_size = ckpt.config.get_text_config().vocab_size
    if any(not 0 <= eos < vocab_size for eos in ckpt.eos_token_ids()):
        raise CheckpointError(f"{ckpt.architecture}: eos_token_id {ckpt.eos_token_ids()} is outside the vocabulary "
                              f"(vocab_size {vocab_size}); fix generation_config.json or config.json")
    log(f"[llmc] {ckpt.architecture} from {ckpt.path}, {dtype}")
    limit = max_context(ckpt.config.get_text_config())
    max_seq_len = max_seq_len or min(limit, 4096)
    if not 2 <= max_seq_len <= limit:
        raise CheckpointError(f"max_seq_len must be in [2, {limit}] for this model (its max_position_embeddings, times the factor of dynamic RoPE), got {max_seq_len}")
    if backend in CONTIGUOUS_CACHE:
        block_size = max_seq_len  # one block per sequence: its contiguous cache row
    writer.check_build(dtype, tp, max_seq_len, block_size, kv_cache_dtype=kv_cache_dtype)

    tokenizer = ckpt.tokenizer()
    samples = []
    if needs_calibration(quant, quant_algo) or (kv_cache_dtype is not None and not (prequantized and prequantized.kv_cache_scales)):
        seq_len = min(CALIBRATION_SEQ_LEN, max_seq_len, max_batch_tokens)
        samples = calibration_samples(tokenizer, calib_data, calib_samples, seq_len)

    gm = trace(ckpt, DTYPES[dtype], max_batch_tokens, max_num_seqs, prequantized, max_seq_len)
    log(f"[llmc] traced in {time.perf_counter() - start:.1f} s: {len(gm.graph.nodes)} nodes")
    if prequantized is not None:
        log(f"[llmc] {prequantized.source} {prequantized.scheme} checkpoint: its linears run as {prequantized.mode or 'unquantized'} "
            f"over its own packed weights{', its KV scales make an FP8 KV cache' if prequantized.kv_cache_scales else ''}")
    ctx = BuildContext(
        ckpt.config, DTYPES[dtype], max_seq_len, max_batch_tokens, max_num_seqs, block_size, tp_size=tp, pp_size=pp, ep_size=ep,
        pp_layers=pp_layers, quant_mode=quant, quant_algo=quant_algo, kv_cache_dtype=kv_cache_dtype, quant_exclude=tuple(exclude),
        calibration_samples=samples, activation_amax={"kv": prequantized.kv_amax} if prequantized and prequantized.kv_amax else {},
    )
    pass_log = (lambda m: log(f"[llmc] {m}")) if verbose else (lambda m: None)
    gm, records = run_passes(gm, ctx, PIPELINE[:FIRST_RANK_PASS], verify=verify_passes, dump_dir=dump_graphs, log=pass_log)
    log(f"[llmc] {len(records)} whole-model passes in {time.perf_counter() - start:.1f} s{_calibration_time(records)}; "
        f"now {tp * ep * pp} rank(s)")

    # Write beside the destination and swap in at the end: an interrupted build leaves no half engine.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        ranks = []
        stage = tp * ep  # ranks per pipeline stage; rank = pp_rank * stage + ep_rank * tp + tp_rank
        world = stage * pp
        for rank in range(world):
            rank_ctx = dataclasses.replace(ctx, tp_rank=rank % tp, ep_rank=rank % stage // tp, pp_rank=rank // stage)
            rank_gm, rank_records = run_passes(
                _copy(gm), rank_ctx, PIPELINE[FIRST_RANK_PASS:], verify=verify_passes,
                dump_dir=None if dump_graphs is None else Path(dump_graphs) / (f"rank{rank}" if world > 1 else ""),
                first_stage=FIRST_RANK_PASS + 1, log=(lambda m: log(f"[llmc] rank {rank}: {m}")) if verbose else (lambda m: None),
            )
            backend_record = writer.write_rank(rank_gm, staging / f"rank{rank}", rank_ctx)
            del rank_gm  # its shards: only one rank's are in memory at a time
            ranks.append({
                "kv_cache": {k: rank_ctx.kv_cache[k] for k in ("num_layers", "num_kv_heads", "head_dim")},
                "pp_inputs": rank_ctx.pp_inputs,
                "pp_outputs": rank_ctx.pp_outputs,
                "passes": rank_records,
                **({"backend": backend_record} if backend_record else {}),
            })
            if world > 1:
                log(f"[llmc] rank {rank + 1}/{world} written (tp rank {rank_ctx.tp_rank}, ep rank {rank_ctx.ep_rank}, "
                    f"pipeline stage {rank_ctx.pp_rank})")
        if quant is not None:
            seconds = sum(r["seconds"] for rank in ranks for r in rank["passes"] if r["pass"] == "quantize")
            log(f"[llmc] weights quantized ({quant}, {quant_algo}) in {seconds:.1f} s")
        (staging / "tokenizer").mkdir()
        for f in tokenizer_files:
            shutil.copy2(f, staging / "tokenizer" / f.name)
        config = EngineConfig(
            architecture=ckpt.architecture,
            model_type=ckpt.config.model_type,
            dtype=dtype,
            backend=backend,
            vocab_size=ckpt.config.get_text_config().vocab_size,
            kv_cache={**ctx.kv_cache, "block_size": block_size},
            limits={"max_seq_len": max_seq_len, "max_batch_tokens": max_batch_tokens, "max_num_seqs": max_num_seqs},
            eos_token_ids=ckpt.eos_token_ids(),
            mapping={"tp": tp, **({"ep": ep} if ep > 1 else {}), "pp": pp,
                     "pp_layers": [ranks[s * stage]["kv_cache"]["num_layers"] for s in range(pp)]},
            ranks=ranks,
            rope=engine_record(ckpt.config),
            tokenizer_class=type(tokenizer).__name__,
            quantization=None if quant is None and kv_cache_dtype is None and prequantized is None else {
                "mode": prequantized.mode if prequantized else quant,
                "algo": quant_algo,
                "kv_cache_dtype": kv_cache_dtype,
                "exclude": [] if prequantized else list(exclude),  # the checkpoint chose what is quantized
                "calibration": {"source": str(calib_data or "llmc default corpus"), "samples": len(samples),
                                "tokens": sum(map(len, samples))} if samples else None,
                **({"checkpoint": prequantized.record()} if prequantized else {}),
            },
            passes=records,
            build={
                "source": str(model),
                "checkpoint": str(ckpt.path.resolve()),
                "seconds": round(time.perf_counter() - start, 2),
                "torch": torch.__version__,
                "transformers": __import__("transformers").__version__,
            },
        )
        record_files(staging, config)
        config.save(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"[llmc] engine written to {out} in {time.perf_counter() - start:.1f} s")
    return out


def _calibration_time(records: list[dict]) -> str:
    """", calibration X s (algo Y s)" from the pass records, or "" when the build did not calibrate."""
    seconds = {r["pass"]: r.get("seconds", 0.0) for r in records}
    calibrated = next((r for r in records if r["pass"] == "calibrate"), {}).get("samples")
    if not calibrated:
        return ""
    smoothing = seconds.get("smooth_activations", 0.0)
    return f" (calibration {seconds['calibrate']:.1f} s" + (f", smoothing {smoothing:.1f} s" if smoothing >= 0.05 else "") + ")"


DTYPE_ALIASES = {"half": "float16", "fp16": "float16", "bf16": "bfloat16", "float": "float32", "fp32": "float32"}


def normalize_dtype(dtype: str) -> str:
    """A dtype name as llmc stores it, or "auto"; vLLM's aliases (half, bf16, float...) accepted."""
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join([*DTYPES, *DTYPE_ALIASES])}, got {dtype!r}")
    return dtype


def checkpoint_dtype(hf_config) -> str:
    """The dtype a checkpoint was saved in (`--dtype auto`); float32 where its config does not say."""
    text = hf_config.get_text_config()
    saved = getattr(text, "dtype", None) or getattr(hf_config, "dtype", None)
    name = str(saved).removeprefix("torch.") if saved is not None else "float32"
    return name if name in DTYPES else "float32"


def check_prequantized(prequantized, quant: str | None, backend: str) -> None:
    """What a pre-quantized checkpoint's build cannot do yet, before tracing."""
    what = f"{prequantized.source} checkpoint ({prequantized.scheme})"
    if quant is not None:
        raise ValueError(f"the {what} is quantized already; build it without --quant")
    if backend != "torch":
        raise ValueError(f"a {what} builds for the torch backend only, not {backend}")


def check_mapping(hf_config, tp: int, pp: int, pp_layers: list[int] | None) -> None:
    """tp and pp against the model's heads and layers, before any tracing (the passes check the graph itself)."""
    text = hf_config.get_text_config()
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    layers = getattr(text, "num_hidden_layers", None)
    if heads and tp > 1:
        def fits(t):
            return heads % t == 0 and (kv_heads % t == 0 or t % kv_heads == 0)
        if not fits(tp):
            valid = ", ".join(str(t) for t in range(1, heads + 1) if fits(t))
            raise ValueError(f"tp={tp} does not divide the model's {heads} attention heads ({kv_heads} KV heads); tp can be {valid}")
    if layers and pp > layers:
        raise ValueError(f"pp={pp} exceeds the model's {layers} layers; pp can be 1 to {layers}")
    if pp_layers is not None and (len(pp_layers) != pp or min(pp_layers) < 1 or (layers and sum(pp_layers) != layers)):
        raise ValueError(f"pp_layers {pp_layers} must give each of the {pp} stages at least one layer, {layers} layers in all")


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A module with its own graph over the same weight tensors (a rank's passes replace, never modify, them)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph)
