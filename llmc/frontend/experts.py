"""Mixture-of-experts layers trace as llmc::moe.

transformers runs a model's experts through an implementation chosen by name (`ALL_EXPERTS_FUNCTIONS`, which
classes decorated with `use_experts_implementation` dispatch through). llmc registers its own, "llmc", and
builds MoE models with it: the experts module's forward becomes one call of llmc::moe on its stacked weights,
while the router (softmax or sigmoid top-k, renormalisation, DeepSeek's grouped choice and score bias) and
shared experts stay the model's own graph ops. Transposed expert weights and interleaved gate/up features
(GPT-OSS) are rearranged into the op's layout by graph ops on the weights, which canonicalize computes once at
build time; biases are the op's. A custom gate is the op's clamped SwiGLU only once proven equal to it on a
grid of values (`prepare`, before tracing). Experts a model loops over in its own code are lowered only for the
classes listed in `_own_loops`, each read once to be the same sum of gated experts (DBRX). Llama 4's MoE block runs
its experts outside those implementations; its forward is replaced by one that calls llmc::moe with the block's own
router (`_llama4_moe_forward`, exact for one expert a token, the only case it accepts). Anything else (experts
without a gate, a norm after each expert, another gate or activation) is a build error naming it.
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


def _activation(experts: torch.nn.Module, act_fn=None) -> str:
    from transformers.activations import ACT2FN

    act_fn = experts.act_fn if act_fn is None else act_fn
    if act_fn in FUNCTIONS:
        return FUNCTIONS[act_fn]
    for hf_name, name in ACTIVATIONS.items():
        if type(act_fn) is type(ACT2FN[hf_name]) and repr(act_fn) == repr(ACT2FN[hf_name]):
            return name
    act = getattr(act_fn, "__name__", None) or repr(act_fn)  # a function's name, not its address
    raise ExpertsError(f"{type(experts).__name__} uses the activation {act}, which llmc::moe does not "
                       f"compute (it has {', '.join(sorted(set(ACTIVATIONS)))})")


def _custom_gate(experts: torch.nn.Module) -> tuple[str, float, float, bool]:
    """(act, alpha, limit, interleaved) of a gate proven, on a grid of values beyond its limits, to be the op's
    clamped SwiGLU over gate/up features that alternate (GPT-OSS) or come in two halves."""
    from llmc.plugins.moe import clamped_swiglu

    alpha, limit = getattr(experts, "alpha", None), getattr(experts, "limit", None)
    if isinstance(alpha, (int, float)) and isinstance(limit, (int, float)) and limit > 0:
        order = torch.randperm(24 * 16, generator=torch.Generator().manual_seed(0))
        y = torch.linspace(-3 * limit, 3 * limit, 24 * 16)[order].view(24, 16)
        got = experts._apply_gate(y)
        for interleaved in (True, False):
            gate, up = (y[:, 0::2], y[:, 1::2]) if interleaved else y.chunk(2, dim=-1)
            if torch.equal(got, clamped_swiglu(gate, up, float(alpha), float(limit))):
                return "clamped_swiglu", float(alpha), float(limit), interleaved
    raise ExpertsError(f"{type(experts).__name__} has a custom gate ({type(experts)._apply_gate.__qualname__}), which "
                       "llmc::moe does not compute (it has act(gate) * up and GPT-OSS's clamped SwiGLU)")


def _dbrx_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """DbrxExperts.forward: expert e is down_e(act(x w1_e^T) * (x v1_e^T)) with w1, v1, w2 [E * I, H] (w2 used as is,
    so [I, H] per expert); llmc::moe's weights are [E, 2I, H] (gate; up) and [E, H, I]."""
    experts, size = self.num_experts, self.hidden_size
    w1, v1, w2 = (w.view(experts, -1, size) for w in (self.mlp.w1, self.mlp.v1, self.mlp.w2))
    out = torch.ops.llmc.moe(hidden_states.reshape(-1, size), top_k_index, top_k_weights, torch.cat([w1, v1], dim=1),
                             w2.transpose(1, 2), self.llmc_act, 0)
    return out.view(hidden_states.shape[0], -1, size)


def _own_loops() -> dict[type, tuple]:
    """Experts modules that loop over their experts in the model's own code -> (llmc's forward, its act module)."""
    from transformers.models.dbrx.modeling_dbrx import DbrxExperts

    return {DbrxExperts: (_dbrx_experts_forward, lambda m: m.mlp.activation_fn)}


def _refused_loops() -> dict[type, str]:
    """Experts modules in the model's own code that llmc::moe cannot compute -> what they compute."""
    from transformers.models.jetmoe.modeling_jetmoe import JetMoeMoA

    return {JetMoeMoA: "a mixture of attention heads (query and output projections are experts chosen per token)"}


def _llama4_moe_forward(self, hidden_states: torch.Tensor):
    """Llama4TextMoe.forward with its experts as llmc::moe. transformers runs every expert on every token, its input
    scaled by the router's score: sigmoid of the chosen logit, 0 for the others, whose experts then output exact
    zeros (no biases). With one expert a token that is llmc::moe over the scaled input with weight 1, exactly; the
    router and the shared expert stay the model's own."""
    x = hidden_states.reshape(-1, self.hidden_dim)
    scores, logits = self.router(x)
    chosen = torch.topk(logits, 1, dim=1).indices  # the router's own choice: the same topk of the same logits
    score = scores.gather(1, chosen)
    experts = self.experts  # [E, H, 2I] and [E, I, H]; llmc::moe's are [E, 2I, H] and [E, H, I]
    routed = torch.ops.llmc.moe(x * score, chosen, torch.ones_like(score), experts.gate_up_proj.transpose(1, 2),
                                experts.down_proj.transpose(1, 2), _activation(experts), 0)
    return self.shared_expert(x) + routed, logits


def _prepare_llama4(module: torch.nn.Module) -> None:
    if module.top_k != 1:
        raise ExpertsError(f"{type(module).__name__} with {module.top_k} experts a token: its router scores scale each "
                           "expert's input, which llmc::moe computes for one expert a token only")
    module.forward = _llama4_moe_forward.__get__(module)


def prepare(model: torch.nn.Module) -> None:
    """Before tracing: what each experts module's gate computes, or a build error naming what llmc::moe lacks."""
    from transformers.integrations.moe import _default_apply_gate
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    own_loops, refused = _own_loops(), _refused_loops()
    for module in model.modules():
        if isinstance(module, Llama4TextMoe):  # experts outside transformers' implementations
            _prepare_llama4(module)
        if type(module) in refused:
            raise ExpertsError(f"{type(module).__name__} computes {refused[type(module)]}, which llmc does not lower")
        if type(module) in own_loops:
            forward, act = own_loops[type(module)]
            module.llmc_act = _activation(module, act(module))
            module.forward = forward.__get__(module)
            continue
        if not hasattr(module, "is_concatenated"):  # not an experts module of transformers' implementations
            continue
        layout = {"experts without a gate projection": not module.has_gate,
                  "a norm after each expert": module.has_post_expert_norm}
        unsupported = [what for what, present in layout.items() if present]
        if unsupported:
            raise ExpertsError(f"{type(module).__name__} has {', '.join(unsupported)}, which llmc::moe does not compute yet")
        if type(module)._apply_gate is _default_apply_gate:  # act(gate) * up over [gate; up]
            module.llmc_gate = (_activation(module), 0.0, 0.0, False)
        else:
            module.llmc_gate = _custom_gate(module)


def _concatenated(interleaved: torch.Tensor) -> torch.Tensor:
    """[..., 2I, X] whose features alternate gate, up -> [gate; up] along that dim (llmc::moe's layout)."""
    return torch.cat([interleaved[:, 0::2], interleaved[:, 1::2]], dim=1)


def llmc_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    act, alpha, limit, interleaved = self.llmc_gate
    gate_up, down = self.gate_up_proj, self.down_proj
    gate_up_bias, down_bias = (self.gate_up_proj_bias, self.down_proj_bias) if self.has_bias else (None, None)
    if self.is_transposed:  # [E, H, 2I] and [E, I, H]; llmc::moe's are [E, 2I, H] and [E, H, I]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    if interleaved:
        gate_up = _concatenated(gate_up)
        gate_up_bias = None if gate_up_bias is None else _concatenated(gate_up_bias)
    return torch.ops.llmc.moe(hidden_states, top_k_index, top_k_weights, gate_up, down, act, 0, gate_up_bias, down_bias,
                              alpha, limit)


def register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, llmc_experts_forward)


def uses_experts(model_class: type) -> bool:
    """Whether `model_class` runs experts through transformers' experts implementations."""
    return model_class._can_set_experts_implementation()
