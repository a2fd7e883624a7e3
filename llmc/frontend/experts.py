"""Mixture-of-experts layers trace as llmc::moe.

transformers runs a model's experts through an implementation chosen by name (`ALL_EXPERTS_FUNCTIONS`, which
classes decorated with `use_experts_implementation` dispatch through). llmc registers its own, "llmc", and
builds MoE models with it: the experts module's forward becomes one call of llmc::moe on its stacked weights,
while the router (softmax or sigmoid top-k, renormalisation, DeepSeek's grouped choice and score bias) and
shared experts stay the model's own graph ops. An experts module in a layout the op does not compute
(biases, transposed or interleaved weights, a custom gate or a norm after each expert, an activation the op
lacks) is a build error naming it.
"""

from __future__ import annotations

import torch

import llmc.plugins.moe  # noqa: F401  (registers torch.ops.llmc.moe)
from llmc.frontend.checkpoint import CheckpointError

IMPLEMENTATION = "llmc"
# transformers' activation names -> llmc::moe's (the functions must be the same, not merely close).
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}
# Experts that call torch's function itself (LFM2-MoE's `F.silu`) rather than an ACT2FN module.
FUNCTIONS = {torch.nn.functional.silu: "silu", torch.nn.functional.gelu: "gelu"}


class ExpertsError(CheckpointError):
    """An experts module llmc::moe cannot compute: raised while tracing, passed on unchanged."""


def _activation(experts: torch.nn.Module) -> str:
    from transformers.activations import ACT2FN

    if experts.act_fn in FUNCTIONS:
        return FUNCTIONS[experts.act_fn]
    for hf_name, name in ACTIVATIONS.items():
        if type(experts.act_fn) is type(ACT2FN[hf_name]) and repr(experts.act_fn) == repr(ACT2FN[hf_name]):
            return name
    act = getattr(experts.act_fn, "__name__", None) or repr(experts.act_fn)  # a function's name, not its address
    raise ExpertsError(f"{type(experts).__name__} uses the activation {act}, which llmc::moe does not "
                       f"compute (it has {', '.join(sorted(set(ACTIVATIONS)))})")


def llmc_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    from transformers.integrations.moe import _default_apply_gate

    name = type(self).__name__
    layout = {
        "expert biases": self.has_bias, "transposed expert weights": self.is_transposed,
        "interleaved gate/up weights": not self.is_concatenated, "experts without a gate projection": not self.has_gate,
        "a norm after each expert": self.has_post_expert_norm,
        "a custom gate": type(self)._apply_gate is not _default_apply_gate,
    }
    unsupported = [what for what, present in layout.items() if present]
    if unsupported:
        raise ExpertsError(f"{name} has {', '.join(unsupported)}, which llmc::moe does not compute yet")
    return torch.ops.llmc.moe(
        hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, _activation(self), 0
    )


def register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, llmc_experts_forward)


def uses_experts(model_class: type) -> bool:
    """Whether `model_class` runs experts through transformers' experts implementations."""
    return model_class._can_set_experts_implementation()
