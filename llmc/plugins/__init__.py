"""Custom ops that passes insert, registered with torch.library under the `llmc` namespace."""

import torch

from llmc.plugins import activations, attention, collectives, linear, norms, quant_embedding, quant_linear, rotary  # noqa: F401

_ops = torch.ops.llmc
# What each op runs on CPU tensors: the function its file registers for CPU, else its reference
# (CompositeExplicitAutograd). The torch backend's generated step calls these directly, skipping a
# round trip through torch's dispatcher (llmc/backends/step_function.py). Keep it in step with the
# registrations: tests/test_step_function.py checks that every llmc op is here, with its `*_cpu`
# function where it registers a CPU kernel.
CPU_FUNCTIONS = {
    _ops.linear.default: torch.nn.functional.linear,
    _ops.prepacked_linear.default: linear.prepacked_linear_cpu,
    _ops.fp8_linear.default: quant_linear.fp8_linear,
    _ops.nvfp4_linear.default: quant_linear.nvfp4_linear,
    _ops.fp8_prepacked_linear.default: quant_linear.fp8_prepacked_linear_cpu,
    _ops.nvfp4_prepacked_linear.default: quant_linear.nvfp4_prepacked_linear_cpu,
    _ops.fp8_embedding.default: quant_embedding.fp8_embedding,
    _ops.nvfp4_embedding.default: quant_embedding.nvfp4_embedding,
    _ops.rms_norm.default: norms.rms_norm_cpu,
    _ops.add_rms_norm.default: norms.add_rms_norm_cpu,
    _ops.add_layer_norm.default: norms.add_layer_norm_cpu,
    _ops.gated_activation.default: activations.gated_activation_cpu,
    _ops.rotary_embedding.default: rotary.rotary_embedding_cpu,
    _ops.paged_attention.default: attention.paged_attention_cpu,
    _ops.all_reduce.default: collectives.all_reduce,
    _ops.all_gather.default: collectives.all_gather,
    _ops.vocab_embedding.default: collectives.vocab_embedding,
}
