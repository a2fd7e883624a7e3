"""Trace a Hugging Face causal LM with torch.export into a plain FX GraphModule.

The model is built on the meta device (no weights in memory), exported around a step wrapper, and
its parameters become `get_attr` nodes named as in the checkpoint. Weights are then streamed from
safetensors into the GraphModule, one copy, in the dtype the traced graph expects.

The traced program is a single flat sequence: `input_ids[1, T]`, `position_ids[1, T]` and
`logits_indices[S]` in, logits `[1, S, vocab]` out. The attention pass turns it into docs/design.md's
ragged, paged step.
"""

from __future__ import annotations

import copy
import functools
import re
from types import SimpleNamespace

import torch
import torch.fx as fx
from tqdm import tqdm

from llmc.frontend import attention_interface, experts
from llmc.frontend.checkpoint import TESTED_ARCHITECTURES, Checkpoint, CheckpointError
from llmc.frontend.prequantized import Prequantized, rewrite_linears
from llmc.frontend.rope import per_token_rope
from llmc.weights import set_weight

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# transformers' layer types of Mamba, linear-attention, convolution and recurrent layers (hybrids name them in
# `layer_types`; pure Mamba models too).
STATEFUL_LAYERS = {"linear_attention", "conv", "hybrid", "hybrid_sliding", "mamba", "recurrent"}


class _Step(torch.nn.Module):
    def __init__(self, hf: torch.nn.Module, rope_lengths: SimpleNamespace):
        super().__init__()
        self.hf = hf
        self.rope_lengths = rope_lengths  # where length-dependent RoPE reads its input (llmc/frontend/rope.py)

    def forward(self, input_ids, position_ids, logits_indices, rope_seq_lens=None):
        self.rope_lengths.value = rope_seq_lens
        out = self.hf(input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=logits_indices)
        return out.logits


def build_meta_model(ckpt: Checkpoint, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    attention_interface.register()
    experts.register()
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                ckpt.config, dtype=dtype, attn_implementation=attention_interface.IMPLEMENTATION,
                experts_implementation=experts.IMPLEMENTATION,
            )
    except ValueError as e:  # e.g. a model that refuses a custom attention implementation
        raise CheckpointError(
            f"{ckpt.architecture} cannot be built by llmc: {e}. Tested: {', '.join(TESTED_ARCHITECTURES)}."
        ) from None
    except KeyError as e:  # a model that looks its attention class up by implementation name (GPT-Neo)
        if e.args != (attention_interface.IMPLEMENTATION,):
            raise
        raise CheckpointError(
            f"{ckpt.architecture} computes attention in the model's own code (attention classes chosen by name, none "
            "through transformers' attention interface), which llmc does not lower"
        ) from None
    # Legacy constructors (XLNet's `nn.Parameter(torch.FloatTensor(...))`) ignore the default device: such
    # parameters are made on the CPU, and the trace would mix them with the meta ones.
    return model.to(device="meta").eval()


def non_persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Values of buffers that are computed at init rather than stored (RoPE frequencies, position tables).

    A meta model has none, so each owning module gets real buffers and transformers' own
    initialisation fills them, exactly as `from_pretrained` does.
    """
    values = {}
    for name, buf in list(model.named_non_persistent_buffers()):
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner.register_buffer(attr, torch.empty_like(buf, device="cpu"), persistent=False)
        _initialiser(model, owner_name)._init_weights(owner)
        values[name] = getattr(owner, attr)
        owner.register_buffer(attr, values[name].to("meta"), persistent=False)
    return values


def _initialiser(model: torch.nn.Module, owner_name: str) -> torch.nn.Module:
    """The innermost transformers model holding `owner_name`, whose `_init_weights` initialises it, as in
    transformers' own initialisation (Gemma3n's reads attributes only its inner text model has)."""
    from transformers import PreTrainedModel

    parts, found = owner_name.split(".") if owner_name else [], model
    for i in range(1, len(parts) + 1):
        module = model.get_submodule(".".join(parts[:i]))
        found = module if isinstance(module, PreTrainedModel) else found
    return found


def export_step(model: torch.nn.Module, max_batch_tokens: int, max_num_seqs: int,
                rope_lengths: SimpleNamespace | None = None, max_seq_len: int | None = None) -> torch.export.ExportedProgram:
    """With `rope_lengths` (length-dependent RoPE, llmc/frontend/rope.py) the step takes rope_seq_lens too; masks are
    recognised over positions below `max_seq_len` (attention_interface.positions_below)."""
    num_tokens = torch.export.Dim("num_tokens", min=2, max=max(max_batch_tokens, 3))
    num_seqs = torch.export.Dim("num_seqs", min=1, max=max(max_num_seqs, 3))
    # Example sizes avoid 0 and 1, which torch.export would specialise on.
    example = (
        torch.zeros(1, 3, dtype=torch.long, device="meta"),
        torch.arange(3, device="meta")[None],
        torch.tensor([1, 2], device="meta"),
    )
    dims = ({1: num_tokens}, {1: num_tokens}, {0: num_seqs})
    if rope_lengths is not None:
        example, dims = (*example, torch.full((1, 3), 3, device="meta")), (*dims, {1: num_tokens})
    # Without gradients, as engines run: a model's own `torch.no_grad()` regions (Phi-3.5-MoE's router) then trace
    # inline instead of as wrapped regions (wrap_with_set_grad_enabled).
    with attention_interface.unpacked_sequences(), attention_interface.positions_below(max_seq_len), torch.no_grad():
        return torch.export.export(_Step(model, rope_lengths or SimpleNamespace()), example, dynamic_shapes=dims,
                                   strict=False)


def to_graph_module(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """Lifted parameters and buffers become get_attr nodes named by their FQN in the HF model."""
    sig = ep.graph_signature
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    graph = ep.graph
    first_user_input = next(n for n in graph.nodes if n.op == "placeholder" and n.name not in lifted)
    attrs: dict[str, torch.Tensor] = {}
    for node in list(graph.nodes):
        if node.op != "placeholder" or node.name not in lifted:
            continue
        if not node.users:  # e.g. the unused alias of a tied embedding
            graph.erase_node(node)
            continue
        fqn = lifted[node.name].removeprefix("hf.")
        tensor = ep.state_dict.get(lifted[node.name], ep.constants.get(lifted[node.name]))
        with graph.inserting_before(first_user_input):
            get = graph.create_node("get_attr", fqn)
        get.meta = dict(node.meta)
        node.replace_all_uses_with(get)
        graph.erase_node(node)
        attrs[fqn] = tensor.detach()  # buffers, not parameters: an engine holds no trainable state
    # Traced on the meta device: constants like `arange(..., device=meta)` must name a real device.
    for node in graph.nodes:
        node.args, node.kwargs = fx.node.map_aggregate(
            (node.args, node.kwargs), lambda a: torch.device("cpu") if isinstance(a, torch.device) else a
        )
    # The exported graph carries a pytree codegen and input guards; a plain module is what passes rewrite.
    graph._codegen = fx.graph.CodeGen()
    return fx.GraphModule(attrs, graph)


class CheckpointWeights:
    """The model's parameters by name, read from the checkpoint through transformers' own key mapping: renamings of
    legacy keys (GPT-NeoX's `embed_out` is `lm_head`, GPT-2 hub checkpoints lack the `transformer.` prefix) and
    WeightConverters, which build one parameter from several keys (per-expert weights stacked into [E, ...] and
    gate/up concatenated). A converted parameter is computed when first asked for, from only its own keys, and
    the others its conversion makes wait until asked for: no more than one conversion's tensors are in memory.
    """

    def __init__(self, ckpt: Checkpoint, model: torch.nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key

        self.ckpt, self.model = ckpt, model
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        meta_state = model.state_dict()
        self.keys: dict[str, str] = {}  # parameter -> its one checkpoint key
        self.conversions: dict[str, WeightConverter] = {}  # parameter (the converter's first target) -> conversion
        # A converted key by its name renamed alone (e.g. one expert's `...experts.3.w1.weight`): where a pre-quantized
        # checkpoint's experts are read unconverted (llmc/frontend/prequantized_experts.py).
        self.unconverted: dict[str, str] = {}
        for key in sorted(ckpt.keys(), key=dot_natural_key):  # experts in order, as transformers stacks them
            name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
            if pattern is None:
                self.keys[name] = key
                continue
            self.unconverted[rename_source_key(key, renamings, [], model.base_model_prefix, meta_state)[0]] = key
            if name not in self.conversions:
                self.conversions[name] = copy.deepcopy(by_pattern[pattern])
            self.conversions[name].add_tensor(name, key, pattern, functools.partial(ckpt.tensor, key))
        self.converted: dict[str, torch.Tensor] = {}  # made by a conversion, not yet asked for

    def names(self) -> set[str]:
        return set(self.keys) | set(self.conversions)

    def get(self, name: str) -> torch.Tensor | None:
        if name in self.keys:
            return self.ckpt.tensor(self.keys[name])
        if name in self.conversions:
            self._convert(name)
        while name not in self.converted and self.conversions:  # a conversion's other target (a split): run the rest
            self._convert(next(iter(self.conversions)))  # all their targets wait, the first too (HRM's gqkv: gate, q, ...)
        return self.converted.pop(name, None)

    def _convert(self, name: str) -> None:
        converter = self.conversions.pop(name)
        try:
            self.converted.update(converter.convert(name, model=self.model, config=self.model.config))
        except Exception as e:  # a conversion transformers cannot apply to these tensors
            raise CheckpointError(f"cannot convert {self.ckpt.path}'s weights into {name!r} ({converter}): {e}") from None


def load_weights(gm: fx.GraphModule, model: torch.nn.Module, buffers: dict[str, torch.Tensor], weights: CheckpointWeights) -> None:
    """Replace every meta attribute of `gm` by its real tensor, read from the checkpoint."""
    by_tensor: dict[int, list[str]] = {}  # tied weights are one parameter with several names
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    aliases = {name: names for names in by_tensor.values() for name in names}
    available = weights.names()
    names = [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    for name in tqdm(names, desc="loading weights", unit="tensor", leave=False, disable=len(names) < 50):
        meta = gm.get_buffer(name)
        if not meta.is_meta:  # already loaded: a pre-quantized linear's tensors (llmc/frontend/prequantized.py)
            continue
        if name in buffers:
            value = buffers[name]
        else:
            source = next((a for a in aliases.get(name, [name]) if a in available or a in weights.converted), name)
            value = weights.get(source)
            if value is None and name.rpartition(".")[2].startswith("lifted_tensor"):  # e.g. Gemma3n's icdf(0.95)
                raise CheckpointError(f"{weights.ckpt.architecture} creates a tensor constant as it runs ({name}), whose "
                                      "value llmc's trace on the meta device does not keep")
            if value is None:
                raise CheckpointError(f"weight {name!r} is missing from {weights.ckpt.path} (checkpoint incomplete or for another model?)")
        if tuple(value.shape) != tuple(meta.shape):
            raise CheckpointError(
                f"weight {name!r} in {weights.ckpt.path} has shape {tuple(value.shape)}, but config.json implies {tuple(meta.shape)}"
            )
        set_weight(gm, name, value.to(meta.dtype))


def trace(ckpt: Checkpoint, dtype: torch.dtype, max_batch_tokens: int, max_num_seqs: int,
          prequantized: Prequantized | None = None, max_seq_len: int | None = None) -> fx.GraphModule:
    """HF checkpoint -> GraphModule with real weights (the input of the pass pipeline). With `prequantized`
    (the checkpoint's quantization, llmc/frontend/prequantized.py) its quantized linears take its packed tensors."""
    stateful = sorted({str(t) for t in getattr(ckpt.config.get_text_config(), "layer_types", None) or []} & STATEFUL_LAYERS)
    if stateful:  # a step's program has no state but the KV cache: such a model would lose it between steps
        raise CheckpointError(f"{ckpt.architecture} has layers that carry a recurrent or convolution state from step to "
                              f"step ({', '.join(stateful)}), which llmc's engines do not keep")
    model = build_meta_model(ckpt, dtype)
    experts.prepare(model)  # an experts module llmc::moe cannot compute fails here, before reading anything
    weights = CheckpointWeights(ckpt, model)  # before tracing: a checkpoint llmc cannot read fails in a second
    buffers = non_persistent_buffers(model)
    rope_lengths = SimpleNamespace(value=None)
    try:
        with per_token_rope(model, rope_lengths) as rope_buffers:
            ep = export_step(model, max_batch_tokens, max_num_seqs, None if rope_buffers is None else rope_lengths,
                             max_seq_len)
    except (experts.ExpertsError, CheckpointError):  # llmc refused a feature: its message says which
        raise
    except Exception as e:  # torch.export raises many types; all mean the same thing here
        raise CheckpointError(
            f"torch.export could not trace {ckpt.architecture}{_rope_note(ckpt)}: {export_failure(e)}. "
            f"Tested architectures: {', '.join(TESTED_ARCHITECTURES)}."
        ) from e
    higher_order = sorted({str(n.target) for n in ep.graph.nodes if isinstance(n.target, torch._ops.HigherOrderOperator)})
    if higher_order:  # torch.cond, wrapped regions...: subgraphs llmc's passes do not look into
        raise CheckpointError(f"{ckpt.architecture}: its traced program calls {', '.join(higher_order)} (control flow or a "
                              "wrapped region of the model's code), which llmc does not lower")
    gm = to_graph_module(ep)
    if prequantized is not None:
        rewrite_linears(gm, prequantized, weights)
    load_weights(gm, model, {**buffers, **(rope_buffers or {})}, weights)
    return gm


def export_failure(e: Exception) -> str:
    """One line for what torch.export raised: guard failures (a value the model branches on, such as dynamic
    RoPE's sequence length) are multi-line dumps whose first line says only that a guard failed."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    if isinstance(e, GuardOnDataDependentSymNode) or "data-dependent" in str(e).lower():
        return ("the model branches on the values of its inputs (data-dependent control flow, e.g. a RoPE that "
                "depends on the sequence length), which one traced program cannot express")
    guard = re.search(r"satisfy the generated guard (.+?)\.?$", str(e), flags=re.M)
    if guard:  # a size the code specialises on (XLNet's relative shift holds for num_tokens != 1 only)
        condition = re.sub(r"L\['input_ids'\]\.size\(\)\[1\]", "num_tokens", guard.group(1))
        return (f"the model's code holds only where {condition}, and one program runs every step, from 1 token to "
                "max_batch_tokens")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else 'no message'}"


def _rope_note(ckpt: Checkpoint) -> str:
    text = ckpt.config.get_text_config()
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    kind = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    return "" if kind == "default" else f" (rope_type {kind!r})"
