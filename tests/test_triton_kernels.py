"""llmc's Triton kernels (llmc/plugins/triton/) against their ops' plain-torch references.

On a machine without a GPU they run in Triton's interpreter on CPU tensors: TRITON_INTERPRET=1 must be set before
the kernels' modules are imported (`@triton.jit` reads it then), which is why it is set here, at the top. With a GPU
(scripts/gpu_check.sh) the same tests run compiled kernels on CUDA tensors, and also reach them through the ops.
(tests/test_triton.py is another thing: the Triton Inference Server.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import llmc.plugins  # noqa: E402,F401
from llmc.plugins import activations, attention, cuda_kernels, norms, quant_linear, rotary  # noqa: E402
from llmc.plugins.quant_formats import nvfp4_global_scale, quantize_fp8_weight, quantize_nvfp4  # noqa: E402
from llmc.plugins.triton import fp8_linear as triton_fp8  # noqa: E402
from llmc.plugins.triton import gated_activation as triton_activation  # noqa: E402
from llmc.plugins.triton import kv_cache_write as triton_cache_write  # noqa: E402
from llmc.plugins.triton import layer_norm as triton_layer_norm  # noqa: E402
from llmc.plugins.triton import nvfp4_linear as triton_nvfp4  # noqa: E402
from llmc.plugins.triton import paged_attention as triton_attention  # noqa: E402
from llmc.plugins.triton import rms_norm as triton_norm  # noqa: E402
from llmc.plugins.triton import rotary as triton_rotary  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


def close(got, expected, dtype):
    """fp32: to fp32 rounding. bf16: to a couple of bf16 ulps of the result's largest value (a sum of products
    rounds to those; the interpreter also rounds fp32 -> bf16 toward zero where GPUs round to nearest)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    largest = max(1.0, expected.float().abs().max().item())
    tol = dict(rtol=1e-5, atol=1e-5 * largest) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2 * largest)
    torch.testing.assert_close(got.float(), expected.float(), **tol)


def randn(*shape, dtype=torch.float32, generator):
    return torch.randn(*shape, generator=generator).to(dtype).to(DEVICE)


def test_kernels_are_interpreted_without_a_gpu():
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = isinstance(triton_norm._rms_norm_kernel, InterpretedFunction)
    assert interpreted == (DEVICE == "cpu")


def test_every_kernel_is_the_cuda_implementation_of_its_op():
    for qualname, (module, name) in cuda_kernels.KERNELS.items():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA"), qualname
        assert callable(cuda_kernels.kernel(module, name))


SWITCH_SCRIPT = """
import json, sys, torch
import llmc.plugins
from llmc.plugins import cpu_kernels
print(json.dumps({"cpu": cpu_kernels.load(), "triton_imported": "triton" in sys.modules,
                  "cuda": torch._C._dispatch_has_kernel_for_dispatch_key("llmc::rms_norm", "CUDA")}))
"""


@pytest.mark.parametrize("switch, cuda", [("cpu", True), ("1", False)])
def test_disable_kernels_switch(switch, cuda):
    """LLMC_DISABLE_KERNELS=cpu (what scripts/gpu_check.sh runs with) keeps the CUDA kernels, =1 turns off both;
    importing llmc imports no Triton either way."""
    env = {**os.environ, "LLMC_DISABLE_KERNELS": switch}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", SWITCH_SCRIPT], env=env, capture_output=True, text=True, check=True)
    state = json.loads(out.stdout)
    assert (state["cpu"], state["cuda"], state["triton_imported"]) == (None, cuda, False)


# --- paged attention -------------------------------------------------------------------------------------------

def attention_step(query_lens, context_lens, heads=4, kv_heads=2, dk=16, dv=None, block_size=4, dtype=torch.float32,
                   fp8=False, seed=0):
    """A random step: sequence i has context_lens[i] tokens once its query_lens[i] new ones are added, its blocks
    scattered over the cache, whose slots before the new tokens hold random earlier keys and values."""
    g = torch.Generator().manual_seed(seed)
    dv = dv or dk
    tokens = sum(query_lens)
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 2
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(query_lens), max(blocks_per_seq), dtype=torch.int32)
    slots, used = [], 0
    for i, (n, c) in enumerate(zip(query_lens, context_lens)):
        tables[i, :blocks_per_seq[i]] = torch.tensor(order[used:used + blocks_per_seq[i]])
        used += blocks_per_seq[i]
        slots += [int(tables[i, p // block_size]) * block_size + p % block_size for p in range(c - n, c)]
    cache = torch.randn(2, 2, num_blocks, block_size, kv_heads, max(dk, dv), generator=g)
    scales = {}
    if fp8:
        cache = cache.to(torch.float8_e4m3fn)
        scales = dict(k_scale=torch.tensor(0.05).to(DEVICE), v_scale=torch.tensor(0.02).to(DEVICE))
    starts = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    return dict(q=randn(1, heads, tokens, dk, dtype=dtype, generator=g), k=randn(1, kv_heads, tokens, dk, dtype=dtype, generator=g),
                v=randn(1, kv_heads, tokens, dv, dtype=dtype, generator=g),
                kv_cache=(cache if fp8 else cache.to(dtype)).to(DEVICE), layer=1,
                slot_mapping=torch.tensor(slots).to(DEVICE), block_tables=tables.to(DEVICE),
                seq_lens=torch.tensor(context_lens, dtype=torch.int32).to(DEVICE), query_start_loc=starts.to(DEVICE),
                scale=dk ** -0.5, sliding_window=0, **scales)


MIXED = dict(query_lens=[5, 1, 3, 1], context_lens=[5, 9, 12, 1])  # a prompt, decodes, a chunk of a longer prompt


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [
    dict(),
    dict(heads=2, kv_heads=2),  # MHA
    dict(heads=6, kv_heads=2),  # a group of 3: padded to 4 rows per token
    dict(heads=8, kv_heads=1, dk=32),  # MQA
    dict(block_size=3),  # a page size that is no power of two
    dict(change=dict(sliding_window=3)),
    dict(change=dict(softcap=2.0)),
    dict(change=dict(alibi_slopes="slopes")),
    dict(change=dict(sinks="sinks")),
    dict(change=dict(sliding_window=4, softcap=1.5, sinks="sinks")),
    dict(dk=24, dv=12),  # MLA: K and V head dims differ, neither a power of two
    dict(fp8=True),
])
def test_paged_attention(case, dtype):
    case = dict(case)
    change = case.pop("change", {})
    args = attention_step(**MIXED, **case, dtype=dtype)
    heads = args["q"].shape[1]
    g = torch.Generator().manual_seed(1)
    for name, value in change.items():
        args[name] = randn(heads, generator=g).abs() if value == "slopes" else randn(heads, generator=g) if value == "sinks" else value
    check_attention(args, dtype)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_paged_attention_with_rope_folded_in(rotary_dim, interleaved):
    args = attention_step(**MIXED)
    g = torch.Generator().manual_seed(2)
    tokens = args["q"].shape[2]
    args.update(cos=randn(tokens, rotary_dim, generator=g), sin=randn(tokens, rotary_dim, generator=g),
                rotary_interleaved=interleaved)
    check_attention(args, torch.float32)


def test_paged_attention_long_context_in_several_key_tiles():
    """Prefill chunks and decodes whose contexts span several key tiles, with a window that skips whole tiles."""
    args = attention_step(query_lens=[20, 1, 1], context_lens=[70, 45, 3], block_size=8, seed=3)
    check_attention(args, torch.float32, block_n=16)
    check_attention({**args, "sliding_window": 20}, torch.float32, block_n=16)


def test_fp8_cache_bytes_are_torchs():
    """E4M3 rounding by integers in the cache write: ties to even among normals and subnormals, saturation, signs."""
    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = e4m3[e4m3.isfinite()]
    ties = (finite.sort().values[:-1] + finite.sort().values[1:]) / 2  # halfway between neighbours
    values = torch.cat([finite, ties, torch.tensor([500.0, -1e4, 1e-9, -1e-9, -0.0, 0.0]), torch.randn(64) * 30])
    values = values[: values.numel() // 16 * 16].view(1, 1, -1, 16)
    tokens = values.shape[2]
    k = values.to(DEVICE)
    cache = torch.zeros(1, 2, tokens, 1, 1, 16, dtype=torch.float8_e4m3fn, device=DEVICE)
    expected = cache.clone()
    scale = torch.tensor(1.0, device=DEVICE)
    slots = torch.arange(tokens, device=DEVICE)
    attention.write_kv_cache(k, k, expected, 0, slots, scale, scale)
    triton_cache_write.write_kv_cache(k, k, cache, 0, slots, scale, scale)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))


def check_attention(args, dtype, **launch):
    expected_cache = args["kv_cache"].clone()
    expected = attention.paged_attention(**{**args, "kv_cache": expected_cache})
    got = triton_attention.paged_attention(**args, **launch)
    close(got, expected, dtype)
    assert got.stride() == expected.stride()  # the op's output layout: [1, heads, T, d] over [1, T, heads, d] memory
    assert torch.equal(args["kv_cache"].view(torch.uint8), expected_cache.view(torch.uint8))
    if DEVICE == "cuda":  # and through the dispatcher
        close(torch.ops.llmc.paged_attention(**{**args, "kv_cache": args["kv_cache"].clone()}), expected, dtype)


def test_paged_attention_rejects_bad_shapes():
    args = attention_step(**MIXED)
    with pytest.raises(RuntimeError, match="query heads do not share 3 KV heads"):
        triton_attention.paged_attention(**{**args, "k": args["k"].repeat(1, 2, 1, 1)[:, :3], "v": args["v"][:, :1].repeat(1, 3, 1, 1)})
    with pytest.raises(RuntimeError, match="layer 2 is outside the cache's 2 layers"):
        triton_attention.paged_attention(**{**args, "layer": 2})
    with pytest.raises(RuntimeError, match="an FP8 KV cache takes k_scale and v_scale"):
        triton_attention.paged_attention(**{**args, "k_scale": torch.tensor(1.0)})


# --- norms, activations, RoPE --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype):
    g = torch.Generator().manual_seed(0)
    x, residual, w = randn(3, 5, 40, dtype=dtype, generator=g), randn(3, 5, 40, dtype=dtype, generator=g), randn(40, dtype=dtype, generator=g)
    close(triton_norm.rms_norm(x, w, 1e-5), norms.rms_norm(x, w, 1e-5), dtype)
    close(triton_norm.rms_norm(x, w.float(), 1e-6), norms.rms_norm(x, w.float(), 1e-6), dtype)  # an fp32 weight: an fp32 result
    for got, expected in zip(triton_norm.add_rms_norm(x, residual, w, 1e-5), norms.add_rms_norm(x, residual, w, 1e-5)):
        close(got, expected, dtype)
    if DEVICE == "cuda":
        close(torch.ops.llmc.rms_norm(x, w, 1e-5), norms.rms_norm(x, w, 1e-5), dtype)
        close(torch.ops.llmc.add_rms_norm(x, residual, w, 1e-5)[0], norms.add_rms_norm(x, residual, w, 1e-5)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_layer_norm(dtype):
    g = torch.Generator().manual_seed(0)
    x, residual = randn(3, 5, 40, dtype=dtype, generator=g), randn(3, 5, 40, dtype=dtype, generator=g) + 2
    w, b = randn(40, dtype=dtype, generator=g), randn(40, dtype=dtype, generator=g)
    for got, expected in zip(triton_layer_norm.add_layer_norm(x, residual, w, b, 1e-5),
                             norms.add_layer_norm(x, residual, w, b, 1e-5)):
        close(got, expected, dtype)
    if DEVICE == "cuda":
        close(torch.ops.llmc.add_layer_norm(x, residual, w, b, 1e-5)[0], norms.add_layer_norm(x, residual, w, b, 1e-5)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_gated_activation(act, dtype):
    g = torch.Generator().manual_seed(0)
    fused = randn(2, 3, 2 * 1100, dtype=dtype, generator=g) * 3  # halves of one projection: row-strided views
    gate, up = fused.chunk(2, dim=-1)
    close(triton_activation.gated_activation(gate, up, act), activations.gated_activation(gate, up, act), dtype)
    if DEVICE == "cuda":
        close(torch.ops.llmc.gated_activation(gate, up, act), activations.gated_activation(gate, up, act), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("x_shape, cos_shape", [
    ((1, 4, 5, 16), (1, 1, 5, 16)),  # [1, heads, T, d] with cos per token
    ((2, 5, 3, 8), (2, 1, 3, 8)),  # batched, cos per sequence
    ((3, 8), (3, 8)),  # 2-D
    ((1, 2, 4, 12), (1, 1, 4, 8)),  # partial: 8 of 12 channels turn
])
def test_rotary_embedding(x_shape, cos_shape, interleaved, dtype):
    g = torch.Generator().manual_seed(0)
    x, cos, sin = (randn(*s, dtype=dtype, generator=g) for s in (x_shape, cos_shape, cos_shape))
    partial = x.shape[-1] != cos.shape[-1]
    if partial:  # only paged attention's folded RoPE takes it
        expected = attention.apply_rope(x, cos.view(-1, cos.shape[-1]), sin.view(-1, cos.shape[-1]), interleaved)
        with pytest.raises(RuntimeError, match="takes cos and sin of its last dim"):
            triton_rotary.rotary_embedding(x, cos, sin, interleaved)
    else:
        expected = rotary.rotary_embedding(x, cos, sin, interleaved)
        if DEVICE == "cuda":
            close(torch.ops.llmc.rotary_embedding(x, cos, sin, interleaved), expected, dtype)
    close(triton_rotary.rotary_embedding(x, cos, sin, interleaved, partial=partial), expected, dtype)


# --- quantized linears ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 33])
def test_fp8_linear(rows, dtype):
    g = torch.Generator().manual_seed(0)
    weight, scale = (t.to(DEVICE) for t in quantize_fp8_weight(torch.randn(70, 96, generator=g)))
    x, bias = randn(rows, 96, dtype=dtype, generator=g), randn(70, dtype=dtype, generator=g)
    close(triton_fp8.fp8_linear(x, weight, scale, None, bias), quant_linear.fp8_linear(x, weight, scale, None, bias), dtype)
    x3 = x.view(1, rows, 96)
    close(triton_fp8.fp8_linear(x3, weight, scale, None, None), quant_linear.fp8_linear(x3, weight, scale, None, None), dtype)
    if DEVICE == "cuda":
        close(torch.ops.llmc.fp8_linear(x, weight, scale, None, bias), quant_linear.fp8_linear(x, weight, scale, None, bias), dtype)
    # W8A8: x quantized with a static scale (FP8 tensor cores on a GPU that has them: a bf16 result)
    input_scale = (x.float().abs().amax() / 448).to(DEVICE)
    w8a8_dtype = torch.bfloat16 if triton_fp8._has_fp8_tensor_cores(x) else dtype
    close(triton_fp8.fp8_linear(x, weight, scale, input_scale, bias),
          quant_linear.fp8_linear(x, weight, scale, input_scale, bias), w8a8_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 33])
def test_nvfp4_linear(rows, dtype):
    g = torch.Generator().manual_seed(0)
    weight, block_scale, global_scale = (t.to(DEVICE) for t in quantize_nvfp4(torch.randn(70, 160, generator=g)))
    x, bias = randn(rows, 160, dtype=dtype, generator=g), randn(70, dtype=dtype, generator=g)
    args = (weight, block_scale, global_scale)
    close(triton_nvfp4.nvfp4_linear(x, *args, None, bias), quant_linear.nvfp4_linear(x, *args, None, bias), dtype)
    input_global_scale = nvfp4_global_scale(x)  # W4A4: x quantized to NVFP4 and read back first
    close(triton_nvfp4.nvfp4_linear(x, *args, input_global_scale, None),
          quant_linear.nvfp4_linear(x, *args, input_global_scale, None), dtype)
    if DEVICE == "cuda":
        close(torch.ops.llmc.nvfp4_linear(x, *args, None, bias), quant_linear.nvfp4_linear(x, *args, None, bias), dtype)


def test_quantized_linears_reject_bad_shapes():
    weight, scale = quantize_fp8_weight(torch.randn(8, 32))
    with pytest.raises(RuntimeError, match="fp8_linear: weight must be E4M3"):
        triton_fp8.fp8_linear(torch.randn(2, 16).to(DEVICE), weight.to(DEVICE), scale.to(DEVICE), None, None)
    packed, block_scale, global_scale = quantize_nvfp4(torch.randn(8, 32))
    with pytest.raises(RuntimeError, match="nvfp4_linear: weight must be packed"):
        triton_nvfp4.nvfp4_linear(torch.randn(2, 16).to(DEVICE), packed.to(DEVICE), block_scale.to(DEVICE),
                                  global_scale.to(DEVICE), None, None)

