"""The `llmc` command: build | generate | serve | triton | bench | eval | inspect."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import click


def _clean_errors(fn):
    """Errors about the user's input print as one line, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from llmc.engine import EngineError
        from llmc.frontend.checkpoint import CheckpointError
        from llmc.passes.manager import PassError
        from llmc.runtime.async_llm import EngineDeadError
        from llmc.runtime.executor import RankError

        try:
            return fn(*args, **kwargs)
        except (ValueError, EngineError, CheckpointError, FileExistsError, PassError, RankError, EngineDeadError) as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def _serve_as_torchrun_rank(engine: str, rank_timeout: float) -> bool:
    """Under torchrun, ranks other than 0 run the engine's steps for rank 0 (which runs the command)."""
    from llmc.runtime.worker import run_torchrun_rank, torchrun_rank

    if torchrun_rank() in (None, 0):
        return False
    run_torchrun_rank(engine, rank_timeout)
    return True


class _Command(click.Command):
    def get_short_help_str(self, limit: int = 45) -> str:
        """`llmc --help` lists each command with its whole first paragraph, not cut at 45 characters."""
        return self.short_help or (self.help or "").split("\n\n")[0].replace("\n", " ").strip()


class _Group(click.Group):
    command_class = _Command


def _quiet_transformers() -> None:
    """transformers' own warnings and progress bars are not llmc's output (llmc reports what matters itself)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


@click.group(cls=_Group, context_settings={"max_content_width": 120})
@click.version_option(package_name="llmc")
def main():
    """llmc: compile Hugging Face causal LMs into engines and run them.

    `llmc serve MODEL` and `llmc generate MODEL` take an engine directory or a checkpoint (a Hugging Face
    directory or hub id), whose engine they build into a cache the first time ($LLMC_CACHE, by default
    ~/.cache/llmc/engines) and reuse afterwards. `llmc build` writes an engine where you say.
    """
    _quiet_transformers()


DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16", "half", "fp16", "bf16", "float", "fp32"]


def _build_options(fn):
    """The options that decide how an engine is built, with vLLM's names beside llmc's. On serve and
    generate they apply when MODEL is a checkpoint; with an engine, any given must match how it was built."""
    options = [
        click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True,
                     help="Weights and compute dtype; auto is the checkpoint's own (its config's dtype), float32 if it names none."),
        click.option("--max-seq-len", "--max-model-len", "max_seq_len", type=click.IntRange(min=2), default=None,
                     help="Longest request (prompt + output) in tokens; serving an engine directory, a cap up to the engine's. "
                          "[default: model's, at most 4096]"),
        click.option("--max-batch-tokens", "--max-num-batched-tokens", "max_batch_tokens", type=click.IntRange(min=1), default=2048,
                     show_default=True, help="Token budget of one step."),
        click.option("--tp", "--tensor-parallel-size", "-tp", "tp", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Tensor-parallel ranks (heads and MLP split across them)."),
        click.option("--pp", "--pipeline-parallel-size", "-pp", "pp", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Pipeline stages (contiguous layer ranges)."),
        click.option("--ep", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Expert-parallel ranks: each MoE layer's experts split across them (a stage has tp x ep ranks)."),
        click.option("--pp-layers", default=None, help="Layers per pipeline stage, e.g. 10,14. [default: balanced by parameters]"),
        click.option("--backend", type=click.Choice(["torch", "onnx", "tensorrt"]), default="torch", show_default=True,
                     help="torch (runs on CPU/GPU), onnx (ONNX Runtime) or tensorrt (serialized TensorRT engines)."),
        click.option("--quant", "--quantization", "quant", type=click.Choice(["fp8", "fp8-dynamic", "fp8-weight-only", "nvfp4", "nvfp4-weight-only"]),
                     default=None, help="Quantize the linears: FP8 E4M3 or NVFP4 weights, and activations too unless weight-only (fp8-dynamic: per-token scales)."),
        click.option("--quant-algo", type=click.Choice(["rtn", "mse", "awq", "gptq", "smoothquant"]), default="rtn", show_default=True,
                     help="How weights are quantized: round to nearest, MSE-searched scales, AWQ, GPTQ or SmoothQuant (W8A8/W4A4)."),
        click.option("--kv-cache-dtype", type=click.Choice(["fp8"]), default=None, help="Store the KV cache as FP8 E4M3 (per-layer scales)."),
        click.option("--calib-data", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="UTF-8 text to calibrate activation scales on. [default: llmc's own corpus]"),
        click.option("--calib-samples", type=click.IntRange(min=1), default=64, show_default=True, help="Calibration windows of 256 tokens."),
        click.option("--exclude", multiple=True, default=("lm_head",), show_default=True,
                     help="Weight-name pattern (fnmatch) to keep unquantized; repeat for several. 'lm_head' is the logits "
                          "projection; 'none' quantizes every linear."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _build_kwargs(ctx: click.Context, explicit_only: bool) -> dict:
    """`llmc.build`'s keyword arguments from the build options (with explicit_only, those the user gave)."""
    from click.core import ParameterSource

    names = ("dtype", "max_seq_len", "max_batch_tokens", "tp", "pp", "ep", "pp_layers", "backend", "quant", "quant_algo", "kv_cache_dtype",
             "calib_data", "calib_samples", "exclude")
    kwargs = {n: ctx.params[n] for n in names
              if not explicit_only or ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)}
    if kwargs.get("pp_layers") is not None:
        try:
            kwargs["pp_layers"] = [int(n) for n in kwargs["pp_layers"].split(",")]
        except ValueError:
            raise click.BadParameter(f"{kwargs['pp_layers']!r} is not a comma-separated list of layer counts", param_hint="--pp-layers")
    if "exclude" in kwargs:
        kwargs["exclude"] = () if kwargs["exclude"] == ("none",) else tuple(kwargs["exclude"])
    return kwargs


def _engine_for(ctx: click.Context, model: str, verbose: bool = False) -> Path:
    """MODEL as an engine directory: itself, or the cached engine of a checkpoint (built now if need be).
    With an engine, --max-model-len is a serving cap (checked when it loads), not a build option."""
    from llmc.engine_cache import is_engine, resolve_engine

    engine = is_engine(model)
    kwargs = _build_kwargs(ctx, explicit_only=engine)
    if engine:
        kwargs.pop("max_seq_len", None)
    return resolve_engine(model, log=lambda m: click.echo(m, err=True), verbose=verbose, **kwargs)


@main.command()
@click.argument("model")
@click.option("-o", "--output", "output_dir", required=True, type=click.Path(file_okay=False), help="Engine directory to write.")
@_build_options
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=64, show_default=True, help="Most requests in flight at once.")
@click.option("--force", is_flag=True, help="Replace the engine already in the output directory.")
@click.option("-v", "--verbose", is_flag=True, help="Log every pass (and each rank's).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--verify-passes", is_flag=True, help="Check each pass's logits against the previous stage.")
@click.option("--dump-graphs", type=click.Path(file_okay=False), default=None, help="Write each stage's graph as text here.")
@_clean_errors
def build(model, output_dir, max_num_seqs, force, verbose, quiet, verify_passes, dump_graphs, **_):
    """Compile MODEL (a Hugging Face directory or hub id) into an engine directory."""
    from llmc.compiler import build as build_engine

    if verbose and quiet:
        raise click.UsageError("give -v or -q, not both")
    build_engine(
        model, output_dir, **_build_kwargs(click.get_current_context(), explicit_only=False), max_num_seqs=max_num_seqs,
        force=force, verify_passes=verify_passes, dump_graphs=dump_graphs, verbose=verbose,
        log=(lambda m: None) if quiet else (lambda m: click.echo(m, err=True)),
    )


def _set_seed(seed: int | None) -> None:
    if seed is not None:
        import random

        import torch

        random.seed(seed)
        torch.manual_seed(seed)


@main.command()
@click.argument("model")
@click.option("-p", "--prompt", "prompts", multiple=True, required=True, help="A prompt; repeat for a batch.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed of the sampling (each prompt's generator).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per prompt.")
@_build_options
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=None, help="Most requests in flight. [default: the engine's]")
@click.option("--rank-timeout", type=float, default=60.0, show_default=True, help="Seconds a rank may be silent before the run fails.")
@_clean_errors
def generate(model, prompts, max_tokens, temperature, top_k, top_p, seed, as_json, max_num_seqs, rank_timeout, max_seq_len, **_):
    """Generate completions for prompts with MODEL (an engine directory, or a checkpoint: built and cached)."""
    from llmc.engine_cache import is_engine
    from llmc.runtime import LLM, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    engine = _engine_for(click.get_current_context(), model)
    if _serve_as_torchrun_rank(str(engine), rank_timeout):
        return
    _set_seed(seed)
    cap = max_seq_len if is_engine(model) else None
    with LLM(engine, rank_timeout=rank_timeout, max_num_seqs=max_num_seqs, max_model_len=cap) as llm:
        start = time.perf_counter()
        outputs = llm.generate(list(prompts), params)
        seconds = time.perf_counter() - start
    for out in outputs:
        completion = out.outputs[0]
        if as_json:
            click.echo(json.dumps({"prompt": out.prompt, "text": completion.text, "token_ids": completion.token_ids, "finish_reason": completion.finish_reason}))
        else:
            click.echo(out.prompt + click.style(completion.text, bold=True))
            click.echo()
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    click.echo(f"[llmc] {tokens} tokens in {seconds:.2f} s ({tokens / seconds:.1f} tokens/s)", err=True)


@main.command()
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="LLMC_API_KEY", default=None, help="Require 'Authorization: Bearer KEY' on /v1 (or set LLMC_API_KEY).")
@click.option("--served-model-name", default=None, help="Model id clients send. [default: MODEL's folder name]")
@click.option("--chat-template", default=None,
              help="A Jinja chat template, or a file holding one, for /v1/chat/completions (replaces the tokenizer's; "
                   "lets a model without one chat).")
@_build_options
@click.option("--kv-cache-memory", type=click.FloatRange(min=0, min_open=True), default=None, help="KV cache size in GiB.")
@click.option("--kv-cache-tokens", type=click.IntRange(min=1), default=None, help="KV cache size in tokens.")
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=None, help="Most requests in flight. [default: the engine's]")
@click.option("--no-prefix-caching", is_flag=True, help="Do not share KV blocks between requests with a common prefix.")
@click.option("--seed", type=int, default=None, help="Seed of the random sampling of requests that give no seed of their own.")
@click.option("--log-stats-interval", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds between the stats lines (throughput, running and waiting requests, KV cache usage) while busy; 0: none.")
@click.option("--disable-log-stats", is_flag=True, help="No stats lines (as --log-stats-interval 0).")
@click.option("--rank-timeout", type=float, default=60.0, show_default=True, help="Seconds a rank may be silent before the engine fails.")
@click.option("--max-request-bytes", type=click.IntRange(min=1), default=16 << 20, show_default=True,
              help="Largest request body accepted; a larger one gets 413 before it is parsed.")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM or Ctrl-C, seconds requests in flight get to finish; then they end with an error.")
@_clean_errors
def serve(model, host, port, api_key, served_model_name, chat_template, kv_cache_memory, kv_cache_tokens, max_num_seqs,
          no_prefix_caching, seed, log_stats_interval, disable_log_stats, rank_timeout, shutdown_timeout, max_request_bytes,
          max_seq_len, **_):
    """Serve MODEL (an engine directory, or a checkpoint: built and cached) over an OpenAI-compatible HTTP API.

    Exits with status 1 if the engine fails (a rank died or hung), after every request in flight got its error.
    """
    from llmc.engine_cache import is_engine
    from llmc.runtime.api_server import listen, read_chat_template, serve as run_server

    if kv_cache_memory is not None and kv_cache_tokens is not None:
        raise click.UsageError("give --kv-cache-memory or --kv-cache-tokens, not both")
    template = read_chat_template(chat_template) if chat_template is not None else None
    from llmc.runtime.worker import torchrun_rank

    sock = listen(host, port) if torchrun_rank() in (None, 0) else None  # a busy port fails now, before any loading
    engine = _engine_for(click.get_current_context(), model)
    if _serve_as_torchrun_rank(str(engine), rank_timeout):
        return
    _set_seed(seed)
    run_server(
        str(engine), sock=sock, api_key=api_key, served_model_name=served_model_name or (Path(model).name if Path(model).is_dir() else model),
        max_request_bytes=max_request_bytes, chat_template=template,
        log_stats_interval=0 if disable_log_stats else log_stats_interval,
        kv_cache_memory=kv_cache_memory, kv_cache_tokens=kv_cache_tokens, max_num_seqs=max_num_seqs,
        max_model_len=max_seq_len if is_engine(model) else None,
        enable_prefix_caching=not no_prefix_caching, rank_timeout=rank_timeout, shutdown_timeout=shutdown_timeout,
    )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def env(as_json):
    """Show the CPU's features, the C++ kernel library chosen for it, and what each llmc op runs on CPU."""
    from llmc.plugins import cpu_kernels

    info = cpu_kernels.environment()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"cpu         {info['cpu']}")
    click.echo(f"features    {' '.join(info['features']) or 'none of ' + ' '.join(cpu_kernels.FEATURES)}")
    click.echo(f"torch       {info['torch']}, CPU capability {info['torch_cpu_capability']}")
    if info["level"]:
        click.echo(f"kernels     {info['level']}: {info['library']}")
    else:
        click.echo("kernels     none: LLMC_DISABLE_KERNELS=1, every op runs its plain-torch reference")
    click.echo("ops on CPU")
    for op, runs in info["ops"].items():
        click.echo(f"  {op:32s} {'reference (plain torch)' if runs == 'reference' else 'C++ ' + runs}")


@main.command("eval")
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--text", "text_file", required=True, type=click.Path(dir_okay=False), help="UTF-8 text to score.")
@click.option("--window", type=int, default=None, help="Tokens per scored window. [default: 512, at most the model's limit]")
@click.option("--max-tokens", type=int, default=None, help="Score only the text's first N tokens.")
@_clean_errors
def eval_(model, text_file, window, max_tokens):
    """Perplexity of MODEL (an engine, or a Hugging Face directory as the reference) on a text file; prints JSON."""
    from llmc.evaluate import perplexity

    click.echo(json.dumps(perplexity(model, text_file, window=window, max_tokens=max_tokens)))

@main.command()
@click.argument("engine", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "output_dir", required=True, type=click.Path(file_okay=False), help="Model repository to write.")
@click.option("--name", default="llmc", show_default=True, help="Name of the model that holds the engine.")
@click.option("--max-batch-size", type=int, default=None, help="Most requests in flight (and Triton's max_batch_size). [default: the engine's max_num_seqs]")
@click.option("--instances", type=int, default=1, show_default=True, help="Instances of the pre- and postprocessing models.")
@click.option("--copy-engine", is_flag=True, help="Copy the engine into the repository instead of referencing its path.")
@click.option("--serve", is_flag=True, help="Then serve it on loopback with the Triton server of the nvidia-pytriton wheel, until Ctrl-C.")
@click.option("--http-port", type=int, default=8000, show_default=True, help="With --serve.")
@click.option("--grpc-port", type=int, default=8001, show_default=True, help="With --serve.")
@click.option("--metrics-port", type=int, default=8002, show_default=True, help="With --serve.")
@_clean_errors
def triton(engine, output_dir, name, max_batch_size, instances, copy_engine, serve, http_port, grpc_port, metrics_port):
    """Write a Triton Inference Server model repository that serves ENGINE.

    Then: tritonserver --model-repository OUTPUT (or --serve), and POST {"text_input": ..., "max_tokens": N}
    to /v2/models/ensemble/generate (or generate_stream, or stream over gRPC).
    """
    from llmc.runtime.triton import TritonServer, TritonServerError, write_repository

    write_repository(engine, output_dir, name=name, max_batch_size=max_batch_size, instances=instances, copy_engine=copy_engine)
    click.echo(f"[llmc] model repository written to {output_dir} (models: ensemble, preprocessing, {name}, postprocessing)", err=True)
    if not serve:
        return
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the server as Ctrl-C does
    try:
        with TritonServer(output_dir, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port) as server:
            click.echo(f"[llmc] Triton ready in {server.load_seconds:.1f} s: HTTP {server.http_url}, gRPC {server.grpc_url}, "
                       f"metrics {server.metrics_url}; Ctrl-C stops it", err=True)
            server.process.wait()
    except KeyboardInterrupt:
        pass
    except TritonServerError as e:
        raise click.ClickException(str(e)) from None


BENCHMARKS = Path(__file__).resolve().parent / "benchmarks"  # shipped in the package


def _benchmarks() -> dict[str, str]:
    """Each benchmark's name and what it measures (its docstring's first sentence, less the asides)."""
    import re

    def summary(doc: str) -> str:
        text = re.sub(r"\s*\([^()]*(\([^()]*\)[^()]*)*\)", "", " ".join(doc.split(":", 1)[-1].split()))
        return re.split(r"[.;] ", text)[0].rstrip(".")

    return {p.stem: summary(p.read_text().split('"""')[1]) for p in sorted(BENCHMARKS.glob("*.py")) if p.stem != "__init__"}


class _BenchCommand(_Command):
    def format_help_text(self, ctx, formatter):
        super().format_help_text(ctx, formatter)
        with formatter.section("Benchmarks"):
            formatter.write_dl(list(_benchmarks().items()))


@main.command(cls=_BenchCommand, context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("name")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(name, args):
    """Run the benchmark NAME with ARGS; prints JSON with llmc's numbers, a reference's and their ratios.

    `llmc bench NAME --help` lists a benchmark's options.
    """
    import runpy

    if name not in _benchmarks():
        raise click.ClickException(f"no benchmark {name!r}; available: {', '.join(_benchmarks())}")
    runpy.run_path(str(BENCHMARKS / f"{name}.py"), run_name="llmc_bench")["main"](list(args))


@main.command()
@click.argument("engine", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print config.json as it is.")
@_clean_errors
def inspect(engine, as_json):
    """Show ENGINE's config, files and the record of each build pass."""
    from llmc.engine import EngineConfig

    config = EngineConfig.load(engine)
    if as_json:
        click.echo((Path(engine) / "config.json").read_text())
        return
    kv, limits = config.kv_cache, config.limits
    click.echo(f"engine      {engine}")
    click.echo(f"model       {config.architecture} ({config.model_type}), {config.dtype}, vocab {config.vocab_size}")
    click.echo(f"backend     {config.backend}, quantization {config.quantization or 'none'}")
    click.echo(f"mapping     tp={config.mapping['tp']} ep={config.mapping.get('ep', 1)} pp={config.mapping['pp']}, "
               f"layers per stage {config.mapping['pp_layers']}")
    click.echo(f"kv cache    {kv['num_layers']} layers x {kv['num_kv_heads']} kv heads x {kv['head_dim']}, {kv['dtype']}, blocks of {kv['block_size']}")
    click.echo(f"limits      max_seq_len {limits['max_seq_len']}, max_batch_tokens {limits['max_batch_tokens']}, max_num_seqs {limits['max_num_seqs']}")
    click.echo(f"built       in {config.build.get('seconds')} s from {config.build.get('source')} (torch {config.build.get('torch')})")
    click.echo("files")
    for name, info in config.files.items():
        click.echo(f"  {name:40s} {info['bytes'] / 1e6:10.2f} MB  sha256 {info['sha256'][:12]}")
    click.echo("passes")
    for record in config.passes:
        _echo_record(record)
    for rank, info in enumerate(config.ranks):
        kv = info["kv_cache"]
        click.echo(f"rank {rank}: {kv['num_layers']} layers, {kv['num_kv_heads']} kv heads; receives {len(info['pp_inputs'])}, sends {len(info['pp_outputs'])}")
        for record in info["passes"]:
            _echo_record(record)
        if "backend" in info:
            _echo_backend_record(info["backend"])


def _echo_backend_record(record: dict) -> None:
    """An ONNX or TensorRT rank: how llmc's ops were lowered, its ONNX op histogram (all segments), the TensorRT builds."""
    segments = sum("onnx" in part for part in record["program"])
    click.echo(f"  onnx               opset {record['opset']}, {record['form']} form, {segments} segment(s); "
               + ", ".join(f"{op} {how}" for op, how in record["lowered"].items()))
    click.echo("  onnx ops           " + ", ".join(f"{op} {n}" for op, n in record["ops"].items()))
    for t in record.get("tensorrt", []):
        click.echo(f"  tensorrt           {t['package']} {t['version']}, target {t['target']}, {t['engine']}: {t['layers']} layers, "
                   f"{t['engine_bytes'] / 1e6:.2f} MB, built in {t['seconds']} s, {t['warnings']} warnings")
        for warning in t["first_warnings"]:
            click.echo(f"    warning: {warning}")


def _echo_record(record: dict) -> None:
    details = ", ".join(f"{k}={v}" for k, v in record.items() if k != "pass")
    click.echo(f"  {record['pass']:18s} {details}")


if __name__ == "__main__":
    sys.exit(main())
