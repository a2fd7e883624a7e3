"""Helpers the Triton kernels share: launch settings and the inputs' dtypes as Triton sees them."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# Triton's interpreter (3.9) multiplies bf16 operands of tl.dot as the integers that hold their bits (numpy has no
# bf16): interpreted kernels upcast them to fp32 first, which is exact, so only the summation order differs.
INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: fp32 products in full precision (Triton's default on GPUs is TF32), so that fp32
    engines match transformers' greedy tokens; bf16 and fp16 are exact in any case."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2(n: int, least: int = 1) -> int:
    """The smallest power of two >= max(n, least): tl.arange and tl.dot need powers of two (and tl.dot 16 or more)."""
    return max(triton.next_power_of_2(max(int(n), 1)), least)


def rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, n] with unit stride along n: a view where it can be (a row-strided slice stays one)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@triton.jit
def tanh(x):
    """tanh from exp (tl.math has none that the interpreter and every Triton since 3.0 share), of -|x| so that
    nothing overflows: within fp32 rounding of torch.tanh in absolute terms."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """tl.dot in fp32 accumulation (see INTERPRETED)."""
    if INTERPRETED:
        product = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        product = tl.dot(a, b, input_precision=PRECISION)
    return product
