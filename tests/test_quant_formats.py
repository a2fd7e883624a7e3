"""The FP8 E4M3 and NVFP4 formats (llmc.plugins.quant_formats and the kernels' decoders) against
ml_dtypes, bit for bit, and NVFP4's quantization error bounds."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from llmc.plugins import cpu_kernels
from llmc.plugins import quant_formats as qf
from llmc.plugins.quant_linear import prepack_quantized


def kernels():
    assert cpu_kernels.has_kernel(torch.ops.llmc.fp8_prepacked_linear.default), "no C++ kernel for this CPU"
    return torch.ops.llmc


def e4m3_codes() -> torch.Tensor:
    """All 256 E4M3 bit patterns but the two NaNs (0x7f, 0xff)."""
    codes = torch.arange(256, dtype=torch.uint8)
    return codes[(codes & 0x7F) != 0x7F]


def sweep(values: np.ndarray) -> np.ndarray:
    """The given values, the midpoints between neighbours (ties), one fp32 step either side of
    each, and all negated, in float32."""
    v = np.unique(np.abs(values.astype(np.float32)))
    mids = ((v[1:] + v[:-1]) / 2).astype(np.float32)
    points = np.concatenate([v, mids])
    near = np.concatenate([points, np.nextafter(points, np.float32(np.inf)), np.nextafter(points, np.float32(0))])
    return np.concatenate([near, -near]).astype(np.float32)


def test_e4m3_decode_all_codes_matches_ml_dtypes():
    codes = e4m3_codes()
    expected = torch.from_numpy(codes.numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float32))
    assert torch.equal(qf.dequantize_fp8(codes.view(torch.float8_e4m3fn), torch.tensor(1.0)), expected)
    # The kernels' decoder (E4M3 bits moved into an fp16's), subnormals included: each code a weight [N, 1]
    # times inputs of 1, in the decode path (1 row) and the prefill path (13 rows).
    w = prepack_quantized(codes.view(torch.float8_e4m3fn)[:, None])
    for rows in (1, 13):
        got = kernels().fp8_prepacked_linear(torch.ones(rows, 1), w, torch.ones(len(codes)), None, None, len(codes))
        assert torch.equal(got, expected.expand(rows, -1))


def test_e4m3_encode_sweep_matches_ml_dtypes():
    grid = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    grid = grid[np.isfinite(grid)]
    rng = np.random.default_rng(0)
    x = np.concatenate([sweep(grid), rng.standard_normal(20000).astype(np.float32) * 10.0 ** rng.uniform(-4, 3, 20000),
                        np.float32([1000, -1000, 449, 464, 480, -480, 1e30, np.inf, -np.inf, 0.0, -0.0, 1e-12, -1e-12])])
    x = x.astype(np.float32)
    got = qf.quantize_fp8(torch.from_numpy(x), torch.tensor(1.0)).view(torch.uint8).numpy()
    # ml_dtypes makes NaN of what is beyond 448 where the format saturates: compare after clamping.
    expected = np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    assert np.array_equal(got, expected)
    # A scale divides first: x / s rounds as x / s does in fp32.
    s = np.float32(0.0123)
    got = qf.quantize_fp8(torch.from_numpy(x[:2000]), torch.tensor(s)).view(torch.uint8).numpy()
    assert np.array_equal(got, np.clip(x[:2000] / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8))


def test_e2m1_encode_sweep_matches_ml_dtypes():
    x = np.concatenate([sweep(np.float32([0, 0.5, 1, 1.5, 2, 3, 4, 6, 7, 12, 100])),
                        np.linspace(-8, 8, 4001, dtype=np.float32),
                        np.float32([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-30, -1e-30, 1e30])])
    got = qf.fp4_e2m1_encode(torch.from_numpy(x)).numpy()
    expected = x.astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    assert np.array_equal(got, expected)
    # Ties go to the even code: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0])
    assert qf.fp4_e2m1_decode(qf.fp4_e2m1_encode(ties)).tolist() == [0, 1, 1, 2, 2, 4, 4, -4]


def test_e2m1_decode_all_codes_matches_ml_dtypes():
    codes = torch.arange(16, dtype=torch.uint8)
    expected = codes.numpy().view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    got = qf.fp4_e2m1_decode(codes).numpy()
    assert np.array_equal(got, expected) and np.array_equal(np.signbit(got), np.signbit(expected))


def test_pack_fp4_nibble_order_and_round_trip():
    # Element 2j in the low nibble, 2j + 1 in the high one (ONNX FLOAT4E2M1 / NVIDIA packing).
    assert qf.pack_fp4(torch.tensor([1, 2, 15, 0], dtype=torch.uint8)).tolist() == [0x21, 0x0F]
    codes = torch.randint(0, 16, (5, 3, 64), dtype=torch.uint8)
    packed = qf.pack_fp4(codes)
    assert packed.shape == (5, 3, 32) and packed.dtype == torch.uint8
    assert torch.equal(qf.unpack_fp4(packed), codes)
    with pytest.raises(ValueError, match="must be even"):
        qf.pack_fp4(torch.zeros(3, dtype=torch.uint8))


def test_nvfp4_error_bounded_per_block():
    g = torch.Generator().manual_seed(0)
    # Blocks of very different magnitudes: the block scales must follow them.
    w = torch.randn(64, 256, generator=g) * torch.logspace(-3, 1, 16).repeat_interleave(16)
    packed, block_scale, global_scale = qf.quantize_nvfp4(w)
    assert packed.shape == (64, 128) and packed.dtype == torch.uint8
    assert block_scale.shape == (64, 16) and block_scale.dtype == torch.float8_e4m3fn
    assert global_scale.shape == () and global_scale == w.abs().max() / (6 * 448)
    deq = qf.dequantize_nvfp4(packed, block_scale, global_scale)
    blocks, err = w.view(64, 16, 16), (deq - w).view(64, 16, 16)
    amax = blocks.abs().amax(-1)
    # Half of E2M1's widest step (1 of 6) with the scale rounded to E4M3 (1/16): 0.18 of the block's amax.
    assert (err.abs().amax(-1) <= 0.18 * amax).all()
    assert err.norm() / w.norm() < 0.1
    # The kernels dequantize the same bits: identity inputs read W's columns back. The prefill path dequantizes as
    # the reference does; the decode path applies the block scale to the sum (a rounding apart).
    eye = torch.eye(256)
    args = prepack_quantized(packed), prepack_quantized(block_scale), global_scale, None, None, 64
    assert torch.equal(kernels().nvfp4_prepacked_linear(eye, *args), deq.T)
    torch.testing.assert_close(kernels().nvfp4_prepacked_linear(eye[:5], *args), deq.T[:5], rtol=2**-23, atol=0)


def test_nvfp4_representable_values_round_trip_exactly():
    values = torch.tensor(qf.E2M1_VALUES)
    codes = torch.randint(0, 8, (8, 64), generator=torch.Generator().manual_seed(1))
    w = values[codes] * torch.where(torch.rand(8, 64) < 0.5, -1.0, 1.0)
    w[:, ::16] = 6.0  # every block's amax is 6: block scale 1 x a power of two
    w = w * 2.0 ** torch.arange(-4, 4).float()[:, None]
    packed, block_scale, global_scale = qf.quantize_nvfp4(w, global_scale=torch.tensor(2.0**-4))
    assert torch.equal(qf.dequantize_nvfp4(packed, block_scale, global_scale), w)


def test_zero_rows_and_blocks_quantize_without_nan():
    w = torch.randn(4, 64)
    w[1] = 0
    w[2, 16:32] = 0
    q, scale = qf.quantize_fp8_weight(w)
    assert scale[1] == 1 and (q[1].float() == 0).all() and torch.isfinite(qf.dequantize_fp8(q, scale[:, None])).all()
    packed, block_scale, global_scale = qf.quantize_nvfp4(w)
    deq = qf.dequantize_nvfp4(packed, block_scale, global_scale)
    assert torch.isfinite(deq).all() and (deq[1] == 0).all() and (deq[2, 16:32] == 0).all()
    packed, block_scale, global_scale = qf.quantize_nvfp4(torch.zeros(2, 32))
    assert global_scale == 1 and (qf.dequantize_nvfp4(packed, block_scale, global_scale) == 0).all()
    assert (qf.fake_quantize_nvfp4_activation(torch.zeros(3, 32), torch.tensor(0.01)) == 0).all()


def test_nvfp4_needs_k_a_multiple_of_16():
    with pytest.raises(ValueError, match="blocks of 16 .* 40 elements"):
        qf.quantize_nvfp4(torch.randn(4, 40))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantized_activations_are_quantize_dequantize(dtype):
    x = (torch.randn(3, 5, 64) * 3).to(dtype)
    global_scale = torch.tensor(0.004)
    got = qf.fake_quantize_nvfp4_activation(x, global_scale)
    assert got.dtype == dtype and got.shape == x.shape
    expected = qf.dequantize_nvfp4(*qf.quantize_nvfp4(x.reshape(15, 64), global_scale)).reshape(x.shape).to(dtype)
    assert torch.equal(got, expected)
    # On the E2M1 grid times each block's scale: at most 8 distinct magnitudes per block.
    assert max(len(b.abs().unique()) for b in got.float().reshape(-1, 16)) <= 8
