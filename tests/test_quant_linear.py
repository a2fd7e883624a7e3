"""llmc.fp8_linear and llmc.nvfp4_linear: the CPU kernels and the tiled prefill path against the
reference, the quantized layers against fp32 ones, and engines holding them on disk."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from llmc.backends import torch_backend
from llmc.plugins import quant_linear
from llmc.plugins.quant_formats import nvfp4_global_scale, quantize_fp8_weight, quantize_nvfp4

torch.set_num_threads(2)
N = 37  # not a multiple of the kernels' row tiles


def layer(fmt: str, w: torch.Tensor, x: torch.Tensor):
    """(op, reference, args after x) of w quantized to fmt; activation scales calibrated on x."""
    if fmt in ("fp8", "w8a8"):
        q, scale = quantize_fp8_weight(w)
        input_scale = x.abs().max().float() / 448 if fmt == "w8a8" else None
        return torch.ops.llmc.fp8_linear, quant_linear.fp8_linear, (q, scale, input_scale)
    packed, block_scale, global_scale = quantize_nvfp4(w)
    input_global_scale = nvfp4_global_scale(x) if fmt == "w4a4" else None
    return torch.ops.llmc.nvfp4_linear, quant_linear.nvfp4_linear, (packed, block_scale, global_scale, input_global_scale)


def assert_matches(got, expected, rtol):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.parametrize("fmt", ["fp8", "w8a8", "nvfp4", "w4a4"])
@pytest.mark.parametrize("k", [48, 400])  # 3 blocks of 16 (all tail), then 3 x 128 + 1 block
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 15, 17])  # 17: the tiled GEMM path
def test_cpu_op_matches_reference(fmt, k, rows):
    g = torch.Generator().manual_seed(rows * k)
    w, x, bias = torch.randn(N, k, generator=g), torch.randn(rows, k, generator=g), torch.randn(N, generator=g)
    op, reference, args = layer(fmt, w, x)
    for b in (None, bias):
        assert_matches(op(x, *args, b), reference(x, *args, b), rtol=1e-5)
    x3 = x[None]  # any leading dimensions
    assert_matches(op(x3, *args, bias), reference(x3, *args, bias), rtol=1e-5)


@pytest.mark.parametrize("fmt", ["fp8", "w8a8", "nvfp4", "w4a4"])
@pytest.mark.parametrize("rows", [1, 4, 20])
def test_bf16_inputs(fmt, rows):
    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(N, 64, generator=g), torch.randn(rows, 64, generator=g).bfloat16()
    op, reference, args = layer(fmt, w, x)
    # The reference multiplies in bf16, the kernel in fp32 and rounds the result: bf16's precision.
    assert_matches(op(x, *args, None), reference(x, *args, None), rtol=2e-2)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_prefill_tiles(fmt, monkeypatch):
    monkeypatch.setattr(quant_linear, "TILE_ELEMENTS", 10 * 64)  # 10 rows a tile: 4 tiles, the last partial
    g = torch.Generator().manual_seed(0)
    w, x, bias = torch.randn(N, 64, generator=g), torch.randn(20, 64, generator=g), torch.randn(N, generator=g)
    op, reference, args = layer(fmt, w, x)  # 20 rows: above the kernels' limit
    assert_matches(op(x, *args, bias), reference(x, *args, bias), rtol=1e-5)


@pytest.mark.parametrize("fmt, tolerance", [("fp8", 0.035), ("w8a8", 0.05), ("nvfp4", 0.12), ("w4a4", 0.17)])
@pytest.mark.parametrize("rows", [1, 16])
def test_quantized_layer_close_to_fp32(fmt, tolerance, rows):
    """Relative error of the output: E4M3 keeps 3 mantissa bits (2^-5 relative rounding, averaging
    out over a dot product), NVFP4 about 1 bit per block-scaled value."""
    g = torch.Generator().manual_seed(7)
    w, x, bias = torch.randn(300, 512, generator=g) * 0.02, torch.randn(rows, 512, generator=g), torch.randn(300, generator=g)
    op, _, args = layer(fmt, w, x)
    expected = F.linear(x, w, bias)
    error = (op(x, *args, bias) - expected).norm() / (expected - bias).norm()
    assert error < tolerance


def test_kernel_rejects_bad_weights():
    from llmc.plugins import cpu_kernels

    kernels = cpu_kernels.load()
    x = torch.randn(1, 32)
    with pytest.raises(RuntimeError, match="float8_e4m3fn"):
        kernels.fp8_linear(x, torch.randn(4, 32), torch.ones(4), None, None)
    with pytest.raises(RuntimeError, match="input features 32 != weight's 48"):
        kernels.nvfp4_linear(x, *quantize_nvfp4(torch.randn(4, 48)), None, None)


def test_engine_files_round_trip(tmp_path):
    """A program calling both ops, its packed weights (float8_e4m3fn and uint8) in safetensors."""
    g = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(48, 32, generator=g), torch.randn(20, 48, generator=g)
    root = torch.nn.Module()
    weights = {"w1": quantize_fp8_weight(w1), "w2": quantize_nvfp4(w2)}
    for name, tensors in weights.items():
        for i, t in enumerate(tensors):
            root.register_buffer(f"{name}_{i}", t)
    root.register_buffer("in_scale", torch.tensor(0.01))
    graph = fx.Graph()
    x = graph.placeholder("x")
    a = [graph.get_attr(f"w1_{i}") for i in range(2)]
    h = graph.call_function(torch.ops.llmc.fp8_linear.default, (x, *a, graph.get_attr("in_scale"), None))
    b = [graph.get_attr(f"w2_{i}") for i in range(3)]
    graph.output(graph.call_function(torch.ops.llmc.nvfp4_linear.default, (h, *b, None, None)))
    gm = fx.GraphModule(root, graph)

    torch_backend.write_rank(gm, tmp_path)
    loaded = torch_backend.load_rank(tmp_path)
    assert loaded.w1_0.dtype == torch.float8_e4m3fn and loaded.w2_0.dtype == torch.uint8
    assert loaded.w2_1.dtype == torch.float8_e4m3fn
    for rows in (1, 20):
        x = torch.randn(rows, 32, generator=g)
        assert torch.equal(loaded(x), gm(x))


def test_fake_tensors_give_shapes_and_dtypes():
    """What torch.export and the passes' shape propagation see."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = torch.randn(N, 64)
    fp8, nvfp4 = quantize_fp8_weight(w), quantize_nvfp4(w)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(2, 3, 64, dtype=torch.bfloat16)
        for y in (torch.ops.llmc.fp8_linear(x, *fp8, None, None), torch.ops.llmc.nvfp4_linear(x, *nvfp4, None, None)):
            assert y.shape == (2, 3, N) and y.dtype == torch.bfloat16
