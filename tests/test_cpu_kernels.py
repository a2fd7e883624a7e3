"""The C++ CPU kernel library: the level chosen for this CPU, every kernel reached through the dispatcher, the ops'
registrations (torch.library.opcheck), arguments checked before any memory is touched, and the lower levels
(AVX2, portable) and LLMC_DISABLE_KERNELS run in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llmc.plugins import CPU_FUNCTIONS, cpu_kernels
from llmc.plugins.linear import prepack_weight
from llmc.plugins.moe import prepack_experts
from llmc.plugins.quant_formats import quantize_fp8_weight, quantize_nvfp4
from llmc.plugins.quant_linear import prepack_quantized

ops = torch.ops.llmc
AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"}
# The ops with a kernel at each level; the others run their reference.
PORTABLE_KERNELS = {"llmc::prepacked_linear", "llmc::paged_attention", "llmc::gated_activation", "llmc::rms_norm",
                    "llmc::add_rms_norm", "llmc::add_layer_norm", "llmc::rotary_embedding", "llmc::moe",
                    "llmc::prepacked_moe"}
QUANTIZED_KERNELS = {"llmc::fp8_prepacked_linear", "llmc::fp8_dynamic_prepacked_linear", "llmc::nvfp4_prepacked_linear"}  # x86 intrinsics: AVX2 and up
KERNELS = {
    "avx512bf16": PORTABLE_KERNELS | QUANTIZED_KERNELS,
    "avx512": PORTABLE_KERNELS | QUANTIZED_KERNELS,
    "avx2": PORTABLE_KERNELS | QUANTIZED_KERNELS,
    "default": PORTABLE_KERNELS,
}


def cpu_flags() -> set[str]:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def test_library_loaded_matches_the_cpu():
    flags = cpu_flags()
    expected = ("avx512bf16" if AVX512 | {"avx512_bf16"} <= flags else "avx512" if AVX512 <= flags
                else "avx2" if {"avx2", "fma"} <= flags else "default")
    assert cpu_kernels.load() == expected
    mapped = {line.split("/")[-1].split(".")[0] for line in open("/proc/self/maps") if "/llmc/_C_" in line}
    assert mapped == {f"_C_{expected}"}


def test_every_op_with_a_kernel_here_runs_it():
    """Each op with a kernel at this level has its CPU implementation from the C++ library (not Python), and the
    generated step calls it there; the others run their reference, which the step calls directly."""
    level = cpu_kernels.load()
    with_kernel = {op.name() for op in cpu_kernels.REFERENCES if cpu_kernels.has_kernel(op)}
    assert with_kernel == KERNELS[level]
    for op in cpu_kernels.REFERENCES:
        if op.name() in with_kernel:
            cpu_line = next(line for line in torch._C._dispatch_dump(op.name()).splitlines() if line.startswith("CPU:"))
            assert "llmc/plugins/csrc/" in cpu_line, cpu_line
            assert op not in CPU_FUNCTIONS
        else:
            assert CPU_FUNCTIONS[op] is cpu_kernels.REFERENCES[op]


def small_inputs(dtype):
    """op -> arguments for it, small, for each op with a kernel."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    x, w = randn(2, 3, 32), randn(40, 32)
    q8, scale8 = quantize_fp8_weight(w.float())
    q4, block_scale, global_scale = quantize_nvfp4(w.float())
    i32 = dict(dtype=torch.int32)
    cache = randn(2, 2, 6, 4, 2, 8)
    attention = (randn(1, 4, 3, 8), randn(1, 2, 3, 8), randn(1, 2, 3, 8), cache, 1, torch.tensor([5, 6, 20]),
                 torch.tensor([[1, 0], [5, 2]], **i32), torch.tensor([7, 1], **i32), torch.tensor([0, 2, 3], **i32), 0.3, 0)
    return {
        ops.rms_norm.default: (x, randn(32), 1e-5),
        ops.add_rms_norm.default: (x, randn(2, 3, 32), randn(32), 1e-5),
        ops.add_layer_norm.default: (x, randn(2, 3, 32), randn(32), randn(32), 1e-5),
        ops.gated_activation.default: (x, randn(2, 3, 32), "silu"),
        ops.rotary_embedding.default: (randn(1, 2, 3, 8), randn(1, 1, 3, 8), randn(1, 1, 3, 8), False),
        ops.prepacked_linear.default: (x, prepack_weight(w), randn(40), 40),
        ops.fp8_prepacked_linear.default: (x, prepack_quantized(q8), scale8, None, randn(40), 40),
        ops.fp8_dynamic_prepacked_linear.default: (x, prepack_quantized(q8), scale8, randn(40), 40),
        ops.nvfp4_prepacked_linear.default: (x, prepack_quantized(q4), prepack_quantized(block_scale), global_scale, None,
                                             None, 40),
        ops.paged_attention.default: attention,
        ops.prepacked_moe.default: (x[0], torch.tensor([[0, 2], [1, 3], [2, 2]]), torch.rand(3, 2, generator=g),
                                    prepack_experts(randn(3, 24, 32)), prepack_experts(randn(3, 32, 12)), "silu", 1,
                                    randn(3, 24), None, 0.0, 0.0, 24),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_every_kernel(dtype):
    """torch.library.opcheck: schema (mutation of kv_cache declared), fake tensors, AOT dispatch."""
    for op, args in small_inputs(dtype).items():
        if cpu_kernels.has_kernel(op):
            torch.library.opcheck(op, args, test_utils=opchecks(args))


def opchecks(args) -> tuple[str, ...]:
    """All of opcheck's tests but the schema check for float8 arguments, which torch's checker cannot compare."""
    fp8 = any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args)
    return ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic") + (() if fp8 else ("test_schema",))


def attention_args(**change):
    """A valid two-sequence step over a [2, 2, 6, 4, 2, 8] cache (layer 1), with `change` applied."""
    i32 = dict(dtype=torch.int32)
    args = dict(q=torch.randn(1, 4, 3, 8), k=torch.randn(1, 2, 3, 8), v=torch.randn(1, 2, 3, 8),
                kv_cache=torch.zeros(2, 2, 6, 4, 2, 8), layer=1, slot_mapping=torch.tensor([5, 6, 20]),
                block_tables=torch.tensor([[1, 0], [5, 2]], **i32), seq_lens=torch.tensor([7, 1], **i32),
                query_start_loc=torch.tensor([0, 2, 3], **i32), scale=0.3, sliding_window=0)
    return {**args, **change}


@pytest.mark.parametrize("change, message", [
    (dict(layer=2), "layer 2 is outside the cache's 2 layers"),
    (dict(layer=-1), "layer -1 is outside"),
    (dict(slot_mapping=torch.tensor([5, 6, 24])), "slot 24 of token 2 is outside the cache's 24 slots"),
    (dict(slot_mapping=torch.tensor([5, -1, 20])), "slot -1 of token 1"),
    (dict(slot_mapping=torch.tensor([5, 6])), "one slot per token"),
    (dict(block_tables=torch.tensor([[1, 6], [5, 2]], dtype=torch.int32)), "block 6 of sequence 0 is outside the cache's 6"),
    (dict(block_tables=torch.tensor([[1], [5]], dtype=torch.int32)), "sequence 0 needs 2 blocks; block_tables has 1"),
    (dict(seq_lens=torch.tensor([1, 1], dtype=torch.int32)), "sequence 0 has 2 new tokens and 1 tokens of context"),
    (dict(query_start_loc=torch.tensor([0, 2, 5], dtype=torch.int32)), "query_start_loc must run from 0 to 3"),
    (dict(k=torch.randn(1, 3, 3, 8)), "k and v must be"),
    (dict(kv_cache=torch.zeros(2, 2, 6, 4, 2, 8).transpose(2, 3)), "kv_cache must be a contiguous"),
])
def test_paged_attention_rejects_indices_outside_the_cache(change, message):
    args = attention_args(**change)
    cache = args["kv_cache"].clone()
    with pytest.raises(RuntimeError, match=message):
        ops.paged_attention(**args)
    assert torch.equal(args["kv_cache"], cache)  # nothing written


def test_kernels_reject_malformed_arguments():
    x = torch.randn(2, 32)
    with pytest.raises(RuntimeError, match="bias has shape"):
        ops.prepacked_linear(x, prepack_weight(torch.randn(40, 32)), torch.randn(7), 40)
    with pytest.raises(RuntimeError, match="weight has shape"):
        ops.rms_norm(x, torch.randn(31), 1e-5)
    with pytest.raises(RuntimeError, match="unknown activation 'relu'"):
        ops.gated_activation(x, x, "relu")


def test_inputs_the_kernels_do_not_take_run_the_reference():
    """Mixed dtypes and broadcasts: the kernels compute them as their references (in ATen) do."""
    from llmc.plugins.activations import gated_activation
    from llmc.plugins.linear import prepacked_linear
    from llmc.plugins.norms import add_rms_norm, rms_norm
    from llmc.plugins.rotary import rotary_embedding

    x, w = torch.randn(3, 16), torch.randn(16, dtype=torch.bfloat16)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5))
    torch.testing.assert_close(ops.add_rms_norm(x, x[0], w, 1e-5), add_rms_norm(x, x[0], w, 1e-5))  # a broadcast residual
    gate, up = torch.randn(3, 16), torch.randn(1, 16)
    torch.testing.assert_close(ops.gated_activation(gate, up, "gelu"), gated_activation(gate, up, "gelu"))
    r = torch.randn(2, 3, 8)  # 3-D: the kernel takes 4-D
    cos, sin = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(ops.rotary_embedding(r, cos, sin, True), rotary_embedding(r, cos, sin, True))
    weight = torch.randn(20, 16, dtype=torch.bfloat16)
    packed = prepack_weight(weight)
    torch.testing.assert_close(ops.prepacked_linear(x, packed, None, 20), prepacked_linear(x, packed, None, 20))


LEVEL_SCRIPT = textwrap.dedent("""
    import json, torch
    from llmc.plugins import cpu_kernels
    from llmc.plugins.attention import paged_attention
    from llmc.plugins.linear import prepack_weight
    from tests.test_cpu_kernels import attention_args, opchecks, small_inputs
    info = cpu_kernels.environment()
    g = torch.Generator().manual_seed(0)
    errors = {}
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x, w = torch.randn(9, 70, generator=g).to(dtype), torch.randn(33, 70, generator=g).to(dtype)
        got = torch.ops.llmc.prepacked_linear(x, prepack_weight(w), None, 33)
        errors[f"linear {dtype}"] = ((got.float() - x.float() @ w.float().T).abs().max() / (x.float() @ w.float().T).abs().max()).item()
        for op, args in small_inputs(dtype).items():
            if cpu_kernels.has_kernel(op):
                torch.library.opcheck(op, args, test_utils=opchecks(args))
    args = attention_args()
    expected = paged_attention(**{**args, "kv_cache": args["kv_cache"].clone()})
    errors["attention"] = (torch.ops.llmc.paged_attention(**args) - expected).abs().max().item()
    # The torch backend prepacks only the linears whose prepacked op has a kernel here.
    from llmc.plugins.linear import prepack_linears
    from llmc.plugins.quant_formats import quantize_fp8_weight
    root, graph = torch.nn.Module(), torch.fx.Graph()
    q, scale = quantize_fp8_weight(torch.randn(16, 16))
    for name, t in (("w", torch.randn(16, 16)), ("q", q), ("scale", scale)):
        root.register_buffer(name, t)
    x = graph.placeholder("x")
    h = graph.call_function(torch.ops.llmc.linear.default, (x, graph.get_attr("w"), None))
    graph.output(graph.call_function(torch.ops.llmc.fp8_linear.default, (h, graph.get_attr("q"), graph.get_attr("scale"), None, None)))
    prepacked = prepack_linears(torch.fx.GraphModule(root, graph))
    print(json.dumps({**info, "errors": errors, "prepacked": prepacked}))
""")


@pytest.mark.parametrize("env", [{"ATEN_CPU_CAPABILITY": "avx2"}, {"ATEN_CPU_CAPABILITY": "default"},
                                 {"LLMC_DISABLE_KERNELS": "1"}], ids=["avx2", "portable", "disabled"])
def test_lower_levels_and_disabled_kernels(env):
    """A CPU without AVX-512 (torch's ATEN_CPU_CAPABILITY lowers what this one reports) loads that level's library, whose
    kernels pass opcheck and match the references; the quantized linears have kernels at AVX2, and run their reference
    in the portable library. With LLMC_DISABLE_KERNELS=1 every op runs its reference."""
    if "ATEN_CPU_CAPABILITY" in env and not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("needs an AVX2 CPU to stand in for one")
    run = subprocess.run([sys.executable, "-c", LEVEL_SCRIPT], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(run.stdout.splitlines()[-1])
    level = {"avx2": "avx2", "default": "default"}.get(env.get("ATEN_CPU_CAPABILITY"))
    assert info["level"] == level
    expected = KERNELS[level] if level else set()
    assert {op for op, runs in info["ops"].items() if runs == "kernel"} == expected
    quantized = level == "avx2"
    assert info["ops"]["llmc::fp8_linear"] == ("kernel, as llmc::fp8_prepacked_linear" if quantized else "reference")
    assert info["prepacked"] == (2 if quantized else 1 if level else 0)  # llmc::linear, and the FP8 one where it has a kernel
    assert all(error < (2e-2 if "bfloat16" in name else 1e-5) for name, error in info["errors"].items()), info["errors"]


def test_llmc_env_shows_the_choice():
    from click.testing import CliRunner

    from llmc.cli import main

    result = CliRunner().invoke(main, ["env"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"kernels     {cpu_kernels.load()}: " in result.output and f"_C_{cpu_kernels.load()}." in result.output
    assert any(line.split() == ["llmc::paged_attention", "C++", "kernel"] for line in lines)
    assert any(line.split() == ["llmc::vocab_embedding", "reference", "(plain", "torch)"] for line in lines)


def test_kernels_built_from_other_sources_are_refused(tmp_path):
    """A checkout whose csrc changed since the build gets an ImportError naming the fix, not torch's abort on a
    library whose op schemas no longer match."""
    from llmc.plugins.kernel_sources import STAMP, sources_digest

    (tmp_path / STAMP).write_text(sources_digest() + "\n")
    cpu_kernels.check_stamp(tmp_path)  # built from these sources: fine
    (tmp_path / STAMP).write_text("0" * 64 + "\n")
    with pytest.raises(ImportError, match=r"built from other sources .*rebuild them \(`pip install -e \.`"):
        cpu_kernels.check_stamp(tmp_path)
