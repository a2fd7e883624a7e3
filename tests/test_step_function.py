"""The torch backend runs each rank's graph as a generated Python function (llmc/backends/step_function.py)."""

from __future__ import annotations

import operator

import pytest
import torch
from conftest import step_inputs

import llmc
from llmc.backends import torch_backend
from llmc.backends.step_function import step_function
from llmc.engine import EngineConfig
from llmc.plugins import CPU_FUNCTIONS
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.sequence import Sequence

quiet = dict(log=lambda *a: None)
NUM_BLOCKS = 8


def _steps(block_size: int):
    """A prefill of two prompts (one in two chunks), then decodes beside the second chunk, then decodes."""
    a, b = Sequence([3, 1, 4, 1, 5, 9, 2, 6], SamplingParams()), Sequence(list(range(20, 41)), SamplingParams())
    a.block_table, b.block_table = [0, 1], [2, 3, 4]
    return step_inputs([[(a, 8), (b, 12)], [(a, 1), (b, 9)], [(a, 1), (b, 1)]], block_size)


@pytest.mark.parametrize("arch, options", [
    ("llama", {}),
    ("gpt2", {}),
    ("qwen2", {"dtype": "bfloat16"}),
    ("llama", {"quant": "fp8-weight-only", "exclude": ()}),
    ("llama", {"quant": "nvfp4", "calib_samples": 2}),
])
def test_generated_step_is_what_the_backend_runs_and_matches_the_graph_module(arch, options, checkpoints, tmp_path):
    engine = llmc.build(checkpoints[arch], tmp_path / "engine", max_seq_len=64, **options, **quiet)
    config = EngineConfig.load(engine)
    runner = torch_backend.make_runner(engine / "rank0", config, 0, NUM_BLOCKS, "cpu")
    assert runner.program.__code__.co_filename == "<llmc rank0>"  # the generated function, not a GraphModule

    gm = torch_backend.load_rank(engine / "rank0")
    assert isinstance(gm, torch.fx.GraphModule)
    kv_cache = runner.kv_cache.clone()  # the GraphModule's own cache, starting from the same zeros
    with torch.inference_mode():
        for inputs in _steps(config.kv_cache["block_size"]):
            values = {**inputs, "kv_cache": kv_cache}
            want = gm(**{name: torch.as_tensor(values[name]) for name in runner.input_names})
            got = runner.run(inputs)
            assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))
    assert torch.equal(runner.kv_cache, kv_cache)


def test_generated_source_binds_weights_once_and_frees_values_after_their_last_use():
    g = torch.Generator().manual_seed(0)
    root = torch.nn.Module()
    root.register_buffer("w", torch.randn(4, 4, generator=g))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    h = graph.call_function(torch.ops.aten.mm.default, (x, graph.get_attr("w")))
    parts = graph.call_function(torch.ops.aten.split_with_sizes.default, (h, [1, 3], 1))
    first = graph.call_function(operator.getitem, (parts, 0))
    y = graph.call_function(torch.ops.aten.mul.Tensor, (first, float("inf")))
    graph.output((y, graph.call_function(torch.ops.aten.to.dtype, (h, torch.float64))))
    gm = torch.fx.GraphModule(root, graph)

    fn = step_function(gm)
    x = torch.randn(2, 4, generator=g)
    assert all(torch.equal(a, b) for a, b in zip(fn(x), gm(x)))
    lines = [line.strip() for line in fn.__llmc_source__.splitlines()]
    closure = lines[0].removeprefix("def make(").removesuffix("):").split(", ")
    assert sorted(closure) == sorted(["w", "aten_mm_default", "aten_split_with_sizes_default", "aten_mul_Tensor", "inf",
                                      "aten_to_dtype", "float64"])
    assert "mm_default = aten_mm_default(x, w)" in lines and "getitem = split_with_sizes_default[0]" in lines
    assert lines.index("del mm_default") == lines.index("to_dtype = aten_to_dtype(mm_default, float64)") + 1


def test_cpu_functions_are_the_references_of_ops_without_a_kernel():
    """llmc.plugins.CPU_FUNCTIONS is derived from the registrations: every llmc op is either called at its C++ kernel
    (no entry) or at its reference (the function registered for it). An op it lacks would still run, through the
    dispatcher."""
    from llmc.plugins import cpu_kernels

    names = {n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("llmc::")}
    assert sorted(names) == sorted(op._opname for op in cpu_kernels.REFERENCES)
    for op, fn in cpu_kernels.REFERENCES.items():
        has_cpu_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU")
        assert CPU_FUNCTIONS.get(op) is (None if has_cpu_kernel else fn), op
