"""The command line as a vLLM user meets it: a checkpoint served in one command (its engine cached), vLLM's
flag names, a banner and stats lines, and every bad argument a one-line error before any expensive work."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

import llmc
from llmc.cli import main
from llmc.compiler import checkpoint_dtype, normalize_dtype
from llmc.engine import EngineConfig

from test_server import CHAT_TEMPLATE, free_port

REPO = Path(__file__).resolve().parent.parent


def llmc_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "llmc", *map(str, args)]


def run_llmc(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(llmc_cmd(*args), capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture
def cache_env(tmp_path):
    return {**os.environ, "LLMC_CACHE": str(tmp_path / "cache")}


@pytest.fixture(scope="module")
def tp2_engine(checkpoints, tmp_path_factory):
    """Built with vLLM's flag names."""
    engine = tmp_path_factory.mktemp("e") / "tp2"
    result = CliRunner().invoke(main, ["build", str(checkpoints["llama"]), "-o", str(engine), "-tp", "2", "--dtype", "float",
                                       "--max-model-len", "48", "--max-num-batched-tokens", "40", "--pipeline-parallel-size", "1"])
    assert result.exit_code == 0, result.output
    return engine


def test_vllm_flag_names_build_what_they_say(tp2_engine):
    config = EngineConfig.load(tp2_engine)
    assert config.mapping["tp"] == 2 and config.dtype == "float32"
    assert config.limits["max_seq_len"] == 48 and config.limits["max_batch_tokens"] == 40


def test_dtype_auto_is_the_checkpoints_and_aliases(checkpoints):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoints["llama"])
    assert checkpoint_dtype(config) == "float32"
    config.dtype = "bfloat16"
    assert checkpoint_dtype(config) == "bfloat16"
    assert checkpoint_dtype(AutoConfig.from_pretrained(REPO / "examples" / "stdlib-llama")) == "bfloat16"
    assert [normalize_dtype(d) for d in ("half", "fp16", "bf16", "float", "fp32", "auto")] == [
        "float16", "float16", "bfloat16", "float32", "float32", "auto"]
    with pytest.raises(ValueError, match="dtype must be auto or one of"):
        normalize_dtype("int8")


def test_build_output_default_verbose_quiet_and_force(checkpoints, tmp_path):
    """Default: a short summary, no line per pass and nothing from transformers; -v adds the passes; -q is
    silent; an existing engine is replaced only with --force."""
    engine = tmp_path / "engine"
    result = run_llmc("build", checkpoints["llama"], "-o", engine, "--max-seq-len", 32)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert all(line.startswith("[llmc] ") for line in lines) and 3 <= len(lines) <= 6, lines
    assert not any("pass " in line for line in lines)
    result = run_llmc("build", checkpoints["llama"], "-o", engine, "--max-seq-len", 32)
    assert result.returncode == 1 and result.stderr.strip() == (
        f"Error: {engine} already holds an engine; give --force (force=True) to replace it, or another -o")
    result = run_llmc("build", checkpoints["llama"], "-o", engine, "--max-seq-len", 32, "--force", "-v")
    assert result.returncode == 0, result.stderr
    assert sum("pass " in line for line in result.stderr.splitlines()) >= 10
    result = run_llmc("build", checkpoints["llama"], "-o", engine, "--max-seq-len", 32, "--force", "-q")
    assert result.returncode == 0 and result.stderr == "" and result.stdout == ""


def test_generate_and_inspect(llama_engine):
    """`llmc build` itself: test_build_output_default_verbose_quiet_and_force."""
    runner = CliRunner()
    result = runner.invoke(main, ["generate", str(llama_engine), "-p", "def fib(n):", "--max-tokens", "5", "--json"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("{"))
    assert '"finish_reason": "length"' in line
    result = runner.invoke(main, ["inspect", str(llama_engine)])
    assert result.exit_code == 0 and "paged" not in result.output and "attention" in result.output
    assert "rank0/weights.safetensors" in result.output
    result = runner.invoke(main, ["generate", str(llama_engine), "-p", "x", "--top-p", "0"])
    assert result.exit_code == 1 and "top_p must be in (0, 1]" in result.output


@pytest.mark.parametrize("args, message", [
    (["-tp", "3"], "Error: tp=3 does not divide the model's 4 attention heads (2 KV heads); tp can be 1, 2, 4"),
    (["--pp", "9"], "Error: pp=9 exceeds the model's 2 layers; pp can be 1 to 2"),
    (["--backend", "onnx", "--kv-cache-dtype", "fp8", "--quant", "fp8"],
     "Error: the ONNX backend has no fp8 KV cache; build without --kv-cache-dtype, or with --backend torch"),
])
def test_mapping_and_backend_errors_come_before_tracing(checkpoints, tmp_path, args, message):
    result = CliRunner().invoke(main, ["build", str(checkpoints["llama"]), "-o", str(tmp_path / "e"), *args])
    assert result.exit_code == 1 and result.output.splitlines()[-1] == message
    assert "traced" not in result.output and not (tmp_path / "e").exists()


def test_serve_errors_before_loading(tp2_engine, checkpoints, tmp_path, cache_env):
    """One line each, and before anything expensive: a busy port before the checkpoint is even built."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_llmc("serve", checkpoints["llama"], "--port", port, env=cache_env)
    assert result.returncode == 1
    assert re.fullmatch(rf"Error: cannot listen on 127\.0\.0\.1:{port}: .*choose another --port\)\n", result.stderr), result.stderr
    assert not (tmp_path / "cache" / "engines").exists()
    for args, message in [
        (["--kv-cache-memory", "100000"], "does not fit in this machine's"),
        (["--max-model-len", "4096"], "max_model_len must be in [2, 48] (the engine's max_seq_len), got 4096"),
        (["-tp", "1"], "is an engine built with tp=2, not 1; drop the option"),
        (["--calib-samples", "3"], "the build option calib_samples applies to a checkpoint only"),
        (["--chat-template", str(tmp_path / "missing.jinja")], "no such file, and not a Jinja template"),
        (["--chat-template", "{% if %}"], "--chat-template is not a valid Jinja template"),
    ]:
        result = run_llmc("serve", tp2_engine, "--port", free_port(), *args, env=cache_env)
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1 and message in result.stderr, (args, result.stderr)


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("the server did not start")


def test_serve_a_checkpoint_with_vllm_flags_then_reuse_its_engine(checkpoints, tmp_path, cache_env):
    """The issue's command: a checkpoint with no chat template chats with --chat-template; the banner and the
    stats lines are logged; `llmc generate` with the same options reuses the cached engine."""
    template = tmp_path / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    options = ["--dtype", "auto", "-tp", "1", "--max-model-len", "64"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(llmc_cmd("serve", checkpoints["llama"], *options, "--chat-template", template, "--port", port,
                                     "--served-model-name", "tiny", "--log-stats-interval", "0.5", "--seed", "1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cache_env)
    try:
        wait_healthy(proc, url)
        messages = [{"role": "user", "content": "def fib(n):"}]
        reply = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 8,
                                                               "temperature": 0}, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 8
        assert httpx.get(url + "/v1/models").json()["data"][0]["max_model_len"] == 64
        time.sleep(1.5)  # a stats line after the request
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    [engine] = [p for p in (tmp_path / "cache" / "engines").iterdir() if not p.name.startswith(".")]
    assert f"[llmc] engine cached at {engine}" in stderr
    assert f"serving tiny from {engine}: LlamaForCausalLM, float32, tp=1 pp=1, backend torch, quantization none" in stderr
    assert re.search(r"KV cache: \d+ tokens; maximum concurrency for 64 tokens per request: [\d.]+x", stderr)
    assert re.search(r"generation throughput: [\d.]+ tokens/s, running: \d+ reqs, waiting: \d+ reqs, KV cache usage: [\d.]+%", stderr)
    # The chat template came from the flag: the prompt is what it renders.
    prompt = "<|user|>def fib(n):\n<|assistant|>"
    result = run_llmc("generate", checkpoints["llama"], *options, "-p", prompt, "--max-tokens", 8, "--json", env=cache_env)
    assert result.returncode == 0, result.stderr
    assert f"[llmc] using the cached engine {engine}" in result.stderr and "building" not in result.stderr
    assert json.loads(result.stdout.splitlines()[0])["text"] == reply.json()["choices"][0]["message"]["content"]


def test_concurrent_and_killed_builds(checkpoints, tmp_path, cache_env):
    """A killed build leaves nothing that is taken for an engine; two builds at once make one engine."""
    args = ["generate", checkpoints["gpt2"], "-p", "def", "--max-tokens", 2, "--json", "--max-model-len", 32]
    killed = subprocess.Popen(llmc_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cache_env)
    for line in killed.stderr:  # kill it midway: traced, the engine half written at most
        if "traced" in line:
            killed.kill()
            break
    killed.wait()
    engines = tmp_path / "cache" / "engines"
    assert [p for p in engines.iterdir() if not p.name.startswith(".")] == []
    both = [subprocess.Popen(llmc_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cache_env)
            for _ in range(2)]
    results = [p.communicate(timeout=600) for p in both]
    assert [p.returncode for p in both] == [0, 0], results
    assert sorted("building an engine" in err for _, err in results) == [False, True]
    assert json.loads(results[0][0].splitlines()[0]) == json.loads(results[1][0].splitlines()[0])
    assert len([p for p in engines.iterdir() if not p.name.startswith(".")]) == 1


def test_llm_takes_a_checkpoint(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_CACHE", str(tmp_path / "cache"))
    logged = []
    with llmc.LLM(checkpoints["qwen2"], max_model_len=32, tensor_parallel_size=1, log=logged.append) as llm:
        assert llm.engine.max_seq_len == 32 and llm.engine_dir.parent == tmp_path / "cache" / "engines"
        first = llm.generate("def fib", llmc.SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids
    with llmc.LLM(checkpoints["qwen2"], max_model_len=32, log=logged.append) as llm:
        assert llm.generate("def fib", llmc.SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids == first
    assert sum("building an engine" in m for m in logged) == 1 and any("using the cached engine" in m for m in logged)
    with pytest.raises(ValueError, match="is an engine built with quant=None, not fp8"):
        llmc.LLM(llm.engine_dir, quantization="fp8")


def test_unguarded_multi_rank_script_is_one_error(tp2_engine, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(f"from llmc import LLM\nLLM({str(tp2_engine)!r}).generate('def')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # this llmc
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert result.stderr.count("Traceback") == 1 and result.stderr.count("\n") < 30, result.stderr
    assert result.stderr.splitlines()[-1].endswith(
        'put that code under `if __name__ == "__main__":` (each rank process imports the script, as Python\'s multiprocessing does)')


def test_help_python_m_and_bench_help():
    result = run_llmc("--help")
    assert result.returncode == 0 and "..." not in result.stdout.split("Commands:")[1]  # descriptions are whole
    assert "Serve MODEL (an engine directory, or a checkpoint: built and cached) over an OpenAI-compatible HTTP API." in " ".join(result.stdout.split())
    for command in ("serve", "generate", "build"):
        text = CliRunner().invoke(main, [command, "--help"]).output
        for flag in ("--tensor-parallel-size", "-tp", "--pipeline-parallel-size", "--max-model-len", "--max-num-batched-tokens",
                     "--quantization", "--dtype"):
            assert flag in text, (command, flag)
    result = CliRunner().invoke(main, ["bench", "--help"])
    assert result.exit_code == 0 and "Benchmarks:" in result.output and "latency" in result.output
    assert "shared" not in result.output and "checkout" not in result.output
    result = CliRunner().invoke(main, ["bench", "latency", "--help"])
    assert result.exit_code == 0 and "--peers" in result.output and "../" not in result.output
    result = CliRunner().invoke(main, ["bench", "nope"])
    assert result.exit_code == 1 and "no benchmark 'nope'; available: gated_activation, latency" in result.output


def test_benchmarks_ship_in_the_package():
    assert (Path(llmc.__file__).parent / "benchmarks" / "serve.py").is_file()
    assert not (REPO / "benchmarks").exists()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"benchmarks/peers/*.py"' in pyproject
