"""What llmc's ops run on CUDA tensors: Triton kernels (llmc/plugins/triton/), registered with torch's dispatcher
for the CUDA key, so `torch.ops.llmc.X` on CUDA tensors reaches them; CPU tensors keep the C++ kernels
(cpu_kernels.py), and ops without a Triton kernel run their plain-torch reference on CUDA too (llmc::linear: cuBLAS).

Each kernel module is imported at its op's first CUDA call, so importing llmc needs no Triton (nor a GPU).
LLMC_DISABLE_KERNELS=1 registers none: every op runs its reference, on CUDA as on CPU (=cuda: only these are off).

Not covered on CUDA yet, running their references there: llmc::moe, the prepacked linears
(the torch backend prepacks only for CPU kernels), the quantized embedding.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

# op -> (module in llmc/plugins/triton, function): what each op's CUDA implementation calls.
KERNELS = {
    "llmc::paged_attention": ("paged_attention", "paged_attention"),
    "llmc::rms_norm": ("rms_norm", "rms_norm"),
    "llmc::add_rms_norm": ("rms_norm", "add_rms_norm"),
    "llmc::add_layer_norm": ("layer_norm", "add_layer_norm"),
    "llmc::gated_activation": ("gated_activation", "gated_activation"),
    "llmc::rotary_embedding": ("rotary", "rotary_embedding"),
    "llmc::fp8_linear": ("fp8_linear", "fp8_linear"),
    "llmc::nvfp4_linear": ("nvfp4_linear", "nvfp4_linear"),
}


@functools.cache
def kernel(module: str, name: str):
    """The Triton launch function `name` of llmc/plugins/triton/<module>.py (imported once)."""
    try:
        return getattr(importlib.import_module(f"llmc.plugins.triton.{module}"), name)
    except ImportError as e:
        if e.name != "triton":
            raise
        raise ImportError("llmc's CUDA kernels are Triton kernels: install triton (`pip install triton`), or set "
                          "LLMC_DISABLE_KERNELS=1 to run the plain-torch references on CUDA") from e


def _cuda_implementation(module: str, name: str):
    def run(*args, **kwargs):
        return kernel(module, name)(*args, **kwargs)

    run.__name__ = f"{name}_cuda"
    return run


@functools.cache
def register() -> bool:
    """Registers the CUDA implementations, once (at import of llmc.plugins); False with LLMC_DISABLE_KERNELS=1 or cuda."""
    if os.environ.get("LLMC_DISABLE_KERNELS") in ("1", "cuda"):
        return False
    for qualname, (module, name) in KERNELS.items():
        torch.library.impl(qualname, "CUDA", _cuda_implementation(module, name))
    return True
