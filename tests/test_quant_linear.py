"""llmc.fp8_linear, llmc.fp8_dynamic_linear and llmc.nvfp4_linear: their prepacked forms' CPU kernels (decode and prefill paths)
against the reference, the quantized layers against fp32 ones, and engines holding them on disk."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from llmc.backends import torch_backend
from llmc.plugins import quant_linear
from llmc.plugins.quant_formats import nvfp4_global_scale, quantize_fp8_weight, quantize_nvfp4
from llmc.plugins.quant_linear import prepack_quantized

torch.set_num_threads(2)
N = 37  # not a multiple of the kernels' groups of 64 outputs


def layer(fmt: str, w: torch.Tensor, x: torch.Tensor):
    """(reference, its args after x, prepacked op, its args after x but the bias) of w quantized to fmt;
    activation scales calibrated on x (w8a8-dynamic: per token, at run time)."""
    if fmt == "w8a8-dynamic":
        q, scale = quantize_fp8_weight(w)
        return quant_linear.fp8_dynamic_linear, (q, scale), torch.ops.llmc.fp8_dynamic_prepacked_linear, (prepack_quantized(q), scale)
    if fmt in ("fp8", "w8a8"):
        q, scale = quantize_fp8_weight(w)
        input_scale = x.abs().max().float() / 448 if fmt == "w8a8" else None
        return (quant_linear.fp8_linear, (q, scale, input_scale),
                torch.ops.llmc.fp8_prepacked_linear, (prepack_quantized(q), scale, input_scale))
    packed, block_scale, global_scale = quantize_nvfp4(w)
    input_global_scale = nvfp4_global_scale(x) if fmt == "w4a4" else None
    return (quant_linear.nvfp4_linear, (packed, block_scale, global_scale, input_global_scale),
            torch.ops.llmc.nvfp4_prepacked_linear,
            (prepack_quantized(packed), prepack_quantized(block_scale), global_scale, input_global_scale))


def assert_matches(got, expected, rtol):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.parametrize("fmt", ["fp8", "w8a8", "w8a8-dynamic", "nvfp4", "w4a4"])
@pytest.mark.parametrize("k", [48, 400])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 12, 13, 40])  # AVX-512: tiles of 5-6 rows, above 12 the prefill path;
# AVX2: tiles of 1-2 rows, above 5 (E4M3) or 2 (E2M1) the prefill path
def test_prepacked_kernel_matches_reference(fmt, k, rows):
    g = torch.Generator().manual_seed(rows * k)
    w, x, bias = torch.randn(N, k, generator=g), torch.randn(rows, k, generator=g), torch.randn(N, generator=g)
    reference, args, op, packed = layer(fmt, w, x)
    for b in (None, bias):
        expected = reference(x, *args, b)
        assert_matches(op(x, *packed, b, N), expected, rtol=1e-5)
        assert_matches(getattr(quant_linear, op.__name__)(x, *packed, b, N), expected, rtol=1e-6)  # its reference
    x3 = x[None]  # any leading dimensions
    assert_matches(op(x3, *packed, bias, N), reference(x3, *args, bias), rtol=1e-5)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("rows", [1, 2])  # the decode path's one- and two-row tiles
def test_decode_path_reads_every_code_of_every_group(fmt, rows):
    """One-hot inputs read the weight back column by column: every E4M3 byte or E2M1 code (-0 and both signs
    included) decodes to its value at every output of several groups (the last short) and both halves of each,
    however the threads split the groups."""
    from llmc.plugins.quant_formats import dequantize_fp8, dequantize_nvfp4

    n, k = 200, 64
    g = torch.Generator().manual_seed(rows)
    codes = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
    if fmt == "fp8":
        codes[(codes & 0x7F) == 0x7F] = 0  # E4M3's NaN codes are no weights
        q = codes.view(torch.float8_e4m3fn)
        scale = torch.rand(n, generator=g) + 0.5
        w, op, packed = dequantize_fp8(q, scale[:, None]), torch.ops.llmc.fp8_prepacked_linear, (prepack_quantized(q), scale, None)
    else:
        packed_w = codes[:, : k // 2]  # two codes a byte: all 16 in each nibble
        block_scale = (torch.rand(n, k // 16, generator=g) * 4 + 0.25).to(torch.float8_e4m3fn)
        global_scale = torch.tensor(0.37)
        w = dequantize_nvfp4(packed_w, block_scale, global_scale)
        op = torch.ops.llmc.nvfp4_prepacked_linear
        packed = (prepack_quantized(packed_w), prepack_quantized(block_scale), global_scale, None)
    eye = torch.eye(k)
    for i in range(0, k, rows):
        x = eye[i : i + rows]
        torch.testing.assert_close(op(x, *packed, None, n), w[:, i : i + rows].T, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rows", [1, 40])  # the decode and the prefill path
def test_kernels_quantize_activations_bit_exactly(rows):
    """Through an identity weight the kernels return their quantized inputs: W8A8's E4M3 and W4A4's NVFP4 equal
    quant_formats' bit for bit, at ties, in E4M3's subnormal range, past 448, for -0."""
    from llmc.plugins.quant_formats import fake_quantize_nvfp4_activation, quantize_fp8

    k = 64
    g = torch.Generator().manual_seed(rows)
    grid = torch.tensor([0.0, -0.0, 2**-9 * 0.5, 2**-9 * 1.5, 2**-9 * 2.5, 2**-7 * 1.0625, 1.0625, 1.1875, -3.4375,
                         448.0, 464.0, 500.0, -1e6, 2**-6, 2**-6 * 0.96875])
    x = torch.randn(rows, k, generator=g) * torch.logspace(-4, 3, k)
    x[0, :len(grid)] = grid
    scale = torch.tensor(1.0)
    eye = torch.eye(k).to(torch.float8_e4m3fn)
    got = torch.ops.llmc.fp8_prepacked_linear(x, prepack_quantized(eye), torch.ones(k), scale, None, k)
    assert torch.equal(got, quantize_fp8(x, scale).float() * scale)
    per_token = x.abs().amax(dim=1, keepdim=True) / 448  # fp8-dynamic: each row its own scale
    got = torch.ops.llmc.fp8_dynamic_prepacked_linear(x, prepack_quantized(eye), torch.ones(k), None, k)
    assert torch.equal(got, quantize_fp8(x, per_token).float() * per_token)

    codes = torch.eye(k, dtype=torch.uint8) * 2  # E2M1 code 2 is 1.0; block scales and global scale 1
    packed, block_scale = codes[:, 0::2] | codes[:, 1::2] << 4, torch.ones(k, k // 16).to(torch.float8_e4m3fn)
    input_global_scale = nvfp4_global_scale(x)
    got = torch.ops.llmc.nvfp4_prepacked_linear(x, prepack_quantized(packed), prepack_quantized(block_scale),
                                                torch.tensor(1.0), input_global_scale, None, k)
    assert torch.equal(got, fake_quantize_nvfp4_activation(x, input_global_scale))


@pytest.mark.parametrize("fmt", ["fp8", "w8a8", "nvfp4", "w4a4"])
@pytest.mark.parametrize("rows", [1, 4, 20])
def test_bf16_inputs(fmt, rows):
    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(130, 64, generator=g), torch.randn(rows, 64, generator=g).bfloat16()  # 3 groups, the last short
    reference, args, op, packed = layer(fmt, w, x)
    # The reference multiplies in bf16, the kernel in fp32 and rounds the result: bf16's precision.
    assert_matches(op(x, *packed, None, 130), reference(x, *args, None), rtol=2e-2)


@pytest.mark.parametrize("fmt, tolerance", [("fp8", 0.035), ("w8a8", 0.05), ("w8a8-dynamic", 0.05), ("nvfp4", 0.12), ("w4a4", 0.17)])
@pytest.mark.parametrize("rows", [1, 16])
def test_quantized_layer_close_to_fp32(fmt, tolerance, rows):
    """Relative error of the output: E4M3 keeps 3 mantissa bits (2^-5 relative rounding, averaging
    out over a dot product), NVFP4 about 1 bit per block-scaled value."""
    g = torch.Generator().manual_seed(7)
    w, x, bias = torch.randn(300, 512, generator=g) * 0.02, torch.randn(rows, 512, generator=g), torch.randn(300, generator=g)
    _, _, op, packed = layer(fmt, w, x)
    expected = F.linear(x, w, bias)
    error = (op(x, *packed, bias, 300) - expected).norm() / (expected - bias).norm()
    assert error < tolerance


def test_kernels_reject_what_does_not_fit():
    kernels = torch.ops.llmc
    x = torch.randn(1, 32)
    q, scale = quantize_fp8_weight(torch.randn(4, 32))
    with pytest.raises(RuntimeError, match="float8_e4m3fn"):
        kernels.fp8_prepacked_linear(x, prepack_quantized(q).float(), scale, None, None, 4)
    with pytest.raises(RuntimeError, match="not in the prepacked layout"):
        kernels.fp8_prepacked_linear(x, q, scale, None, None, 4)
    with pytest.raises(RuntimeError, match="out_features 65"):
        kernels.fp8_prepacked_linear(x, prepack_quantized(q), scale, None, None, 65)
    packed, block_scale, global_scale = quantize_nvfp4(torch.randn(4, 48))
    with pytest.raises(RuntimeError, match="input features 32 do not match the weight's 48"):
        kernels.nvfp4_prepacked_linear(x, prepack_quantized(packed), prepack_quantized(block_scale), global_scale,
                                       None, None, 4)


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
    loaded = torch_backend.load_rank(tmp_path)  # prepacked for the CPU kernels as it loads
    ops = [n.target for n in loaded.graph.nodes if n.op == "call_function"]
    assert ops == [torch.ops.llmc.fp8_prepacked_linear.default, torch.ops.llmc.nvfp4_prepacked_linear.default]
    assert loaded.w1_0.dtype == torch.float8_e4m3fn and loaded.w1_0.shape == (1, 32, 64)
    assert loaded.w2_0.dtype == torch.uint8 and loaded.w2_0.shape == (1, 24, 64)
    assert loaded.w2_1.dtype == torch.float8_e4m3fn and loaded.w2_1.shape == (1, 3, 64)
    for rows in (1, 20):
        x = torch.randn(rows, 32, generator=g)
        assert_matches(loaded(x), gm(x), rtol=1e-5)


def test_prepacking_keeps_a_tied_table_for_the_embedding():
    """An NVFP4 LM head tied to the embedding: the linear gets prepacked copies of the packed bytes and
    block scales, the embedding keeps reading the [N, ...] table."""
    from llmc.plugins.linear import prepack_linears

    g = torch.Generator().manual_seed(4)
    root = torch.nn.Module()
    for i, t in enumerate(quantize_nvfp4(torch.randn(70, 32, generator=g))):
        root.register_buffer(f"table_{i}", t)
    graph = fx.Graph()
    ids = graph.placeholder("ids")
    # Each op reads the table through its own get_attr nodes, as an engine's program does.
    table = [graph.get_attr(f"table_{i}") for i in range(3)]
    h = graph.call_function(torch.ops.llmc.nvfp4_embedding.default, (*table, ids, torch.float32))
    head = [graph.get_attr(f"table_{i}") for i in range(3)]
    graph.output(graph.call_function(torch.ops.llmc.nvfp4_linear.default, (h, *head, None, None)))
    gm = fx.GraphModule(root, graph)
    ids = torch.tensor([[3, 69, 0]])
    expected = gm(ids)

    assert prepack_linears(gm) == 1
    assert gm.table_0.shape == (70, 16) and gm.table_0_prepacked.shape == (2, 16, 64)
    assert gm.table_1.shape == (70, 2) and gm.table_1_prepacked.shape == (2, 2, 64)
    assert_matches(gm(ids), expected, rtol=1e-5)


def test_fake_tensors_give_shapes_and_dtypes():
    """What torch.export and the passes' shape propagation see."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = torch.randn(N, 64)
    fp8, nvfp4 = quantize_fp8_weight(w), quantize_nvfp4(w)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(2, 3, 64, dtype=torch.bfloat16)
        for y in (torch.ops.llmc.fp8_linear(x, *fp8, None, None), torch.ops.llmc.nvfp4_linear(x, *nvfp4, None, None),
                  torch.ops.llmc.fp8_prepacked_linear(x, prepack_quantized(fp8[0]), fp8[1], None, None, N)):
            assert y.shape == (2, 3, N) and y.dtype == torch.bfloat16
