"""RoPE whose frequencies depend on the sequence's length (longrope, dynamic NTK), traced per token.

transformers recomputes these frequencies in each forward call from the largest position it sees
(`dynamic_rope_update`), a data-dependent branch torch.export cannot trace. In `generate`, a token is
rotated with the frequencies of the call that processes it: a prompt token with those of the prompt's
length, a generated token with those of the length so far, and the keys in the cache keep theirs.
So the frequencies a token needs are those of `max(position + 1, prefill length)` of its sequence
(the prompt's length; Phi-3's generate recomputes the cache once at its switch, engine_record): the
step input `rope_seq_lens[1, T]` (docs/design.md's step contract), which the runtime fills per token. Each such rotary module is traced with that input instead of its data-dependent update:
transformers' own forward (undecorated) over a per-token inverse-frequency table [1, T, dim / 2].
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from llmc.engine import MAX_SEQ_LEN
from llmc.frontend.checkpoint import CheckpointError

def _is_length_dependent(rope_type: str) -> bool:
    return rope_type == "longrope" or "dynamic" in rope_type  # as transformers' dynamic_rope_update tells them apart


def length_dependent_rotaries(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{name: rotary module} of the modules whose frequencies depend on the sequence's length."""
    found = {}
    for name, module in model.named_modules():
        rope_type = getattr(module, "rope_type", None)
        if not hasattr(module, "inv_freq") and not isinstance(rope_type, dict):
            continue
        types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
        if not any(isinstance(t, str) and _is_length_dependent(t) for t in types):
            continue
        forward = getattr(type(module).forward, "__wrapped__", None)
        if isinstance(rope_type, dict) or forward is None or not hasattr(module, "original_inv_freq"):
            raise CheckpointError(
                f"{type(module).__name__} uses RoPE {rope_type!r}, whose frequencies depend on the sequence length, in a "
                "form llmc does not trace (per-layer RoPE types, or not transformers' dynamic_rope_update); "
                "llmc supports longrope and dynamic NTK with one RoPE type for all layers"
            )
        found[name] = module
    return found


def max_context(config) -> int:
    """The longest sequence the model is made for: max_position_embeddings, or with dynamic NTK that many times
    its factor (the context it scales its frequencies to); models without position embeddings or RoPE tables
    (ALiBi: Bloom) have no limit of their own, but the engine's."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if isinstance(rope_type, str) and "dynamic" in rope_type:
        return int(config.max_position_embeddings * params["factor"])
    limit = getattr(config, "max_position_embeddings", None)
    return limit if limit and limit > 0 else MAX_SEQ_LEN  # XLNet says -1: no limit of its own


def engine_record(config) -> dict | None:
    """The engine config's `rope` (llmc/engine.py): None unless the frequencies depend on the sequence's length."""
    params = getattr(config.get_text_config(), "rope_parameters", None) or {}
    rope_type = params.get("rope_type") if isinstance(params, dict) else None
    if not (isinstance(rope_type, str) and _is_length_dependent(rope_type)):
        return None
    recompute_above = None
    if rope_type == "longrope" and _generate_recomputes_past_switch(config):
        recompute_above = config.original_max_position_embeddings
    return {"type": "longrope" if rope_type == "longrope" else "dynamic", "recompute_above": recompute_above}


def _generate_recomputes_past_switch(config) -> bool:
    """transformers' generate of Phi-3 (and the models copying its prepare_inputs_for_generation) drops the cache
    when a sequence first grows past original_max_position_embeddings, so every token is rotated again, with the
    long factors."""
    import inspect

    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    prepare = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].prepare_inputs_for_generation
    return hasattr(config, "original_max_position_embeddings") and "original_max_position_embeddings" in inspect.getsource(prepare)


def _ntk_dim(config) -> int:
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    return int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))


def _dynamic_ntk_inv_freq(config, lengths: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """transformers' _compute_dynamic_ntk_parameters for a tensor of lengths, op for op (its own builds a scalar
    tensor constant, whose value a trace on the meta device loses). `exponents` is its arange(0, dim, 2) / dim,
    a weight rather than an arange in the program (whose size a hostile engine could set)."""
    params, dim = config.rope_parameters, _ntk_dim(config)
    factor, mpe = params["factor"], config.max_position_embeddings
    base = params["rope_theta"] * ((factor * lengths.clamp(min=mpe) / mpe) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** exponents)


def _buffers(rotary: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tables the per-token frequencies read that transformers' module lacks as buffers."""
    if rotary.rope_type == "longrope":  # transformers keeps it as a plain attribute
        original = rotary.config.rope_parameters["original_max_position_embeddings"]
        return {"long_inv_freq": ROPE_INIT_FUNCTIONS["longrope"](rotary.config, "cpu", seq_len=original + 1)[0]}
    dim = _ntk_dim(rotary.config)
    return {"ntk_exponents": torch.arange(0, dim, 2, dtype=torch.int64).float() / dim}


def _inv_freq(rotary: torch.nn.Module, lengths: torch.Tensor) -> torch.Tensor:
    """Inverse frequencies per token [1, T, dim / 2], as transformers' update picks them for a call of that length."""
    lengths = lengths[..., None]
    if rotary.rope_type == "longrope":
        original = rotary.config.rope_parameters["original_max_position_embeddings"]
        return torch.where(lengths > original, rotary.long_inv_freq, rotary.original_inv_freq)
    # dynamic NTK: the original frequencies up to max_position_embeddings, then recomputed for the length
    scaled = _dynamic_ntk_inv_freq(rotary.config, lengths, rotary.ntk_exponents)
    return torch.where(lengths > rotary.original_max_seq_len, scaled, rotary.original_inv_freq)


@contextlib.contextmanager
def per_token_rope(model: torch.nn.Module, lengths: SimpleNamespace):
    """Within it, each length-dependent rotary module computes cos / sin from `lengths.value` (the traced
    rope_seq_lens input, set by the step wrapper). Yields {buffer name: value} of the buffers it adds (see
    `_buffers`), or None if no module needs it."""
    rotaries = length_dependent_rotaries(model)
    if not rotaries:
        yield None
        return
    added = {}
    for name, rotary in rotaries.items():
        for attr, value in _buffers(rotary).items():
            rotary.register_buffer(attr, value.to("meta"), persistent=False)
            added[f"{name}.{attr}".lstrip(".")] = value

        def forward(x, position_ids, rotary=rotary):
            inv_freq = rotary.inv_freq
            rotary._buffers["inv_freq"] = _inv_freq(rotary, lengths.value)
            try:
                return type(rotary).forward.__wrapped__(rotary, x, position_ids)
            finally:
                rotary._buffers["inv_freq"] = inv_freq

        rotary.forward = forward
    try:
        yield added
    finally:
        for rotary in rotaries.values():
            del rotary.forward
