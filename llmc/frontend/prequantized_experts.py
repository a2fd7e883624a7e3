"""Pre-quantized MoE experts: a checkpoint's per-expert FP8 or NVFP4 projections become llmc::fp8_moe /
llmc::nvfp4_moe's stacked arguments, their bytes unchanged (docs/design.md, "Quantization formats").

Each expert's gate, up and down projections are read as a linear's (llmc/frontend/prequantized.py); gate and up
are concatenated ([gate; up], llmc::moe's layout) and the experts stacked. llmc's quantized experts are weight-only
and have one NVFP4 global scale per expert's gate_up: a checkpoint that quantizes the experts' inputs, or whose gate
and up global scales differ (llm-compressor and Model Optimizer give them one), is a CheckpointError naming it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

import llmc.plugins.moe  # noqa: F401  (registers the ops the rewrite inserts)
from llmc.frontend.checkpoint import CheckpointError
from llmc.plugins.moe import OPTIONAL_ARG_NAMES
from llmc.weights import set_weight

MOE = torch.ops.llmc.moe.default
# An expert's (gate, up, down) projections as checkpoints name them: transformers' unfused experts, Mixtral's.
PROJECTIONS = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def rewrite_experts(gm: fx.GraphModule, what: str, quantized: set[str], packed: Callable) -> dict[str, set[str]]:
    """Each llmc::moe whose experts the checkpoint holds quantized runs over the checkpoint's tensors. `packed(module)`
    maps one projection as prequantized._packed does. Returns llmc's mode -> the projections (modules) rewritten."""
    done: dict[str, set[str]] = {}
    for node in list(gm.graph.nodes):
        if node.target != MOE:
            continue
        call = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True).kwargs  # by name, through the op's schema
        gate_up, down = call["gate_up"], call["down"]
        prefix = gate_up.target.rpartition(".")[0] if gate_up.op == "get_attr" else None
        names = next((p for p in PROJECTIONS if prefix and f"{prefix}.0.{p[0]}" in quantized), None)
        if names is None or down.op != "get_attr":
            continue  # unquantized experts; quantized ones left over are the caller's error
        experts, features = gm.get_buffer(gate_up.target).shape[:2]
        mapped = [[packed(f"{prefix}.{e}.{name}") for name in names] for e in range(experts)]
        modes = {mode for projections in mapped for _, mode, _, _ in projections}
        if bad := [m for m in modes if not m.endswith("-weight-only")]:
            raise CheckpointError(f"{prefix}: the checkpoint's experts quantize their inputs ({what}, llmc mode {bad[0]}); "
                                  "llmc's quantized experts are weight-only: use a weight-only scheme for the experts "
                                  "(FP8 W8A16, NVFP4A16, W4A16_NVFP4)")
        if len(modes) > 1:
            raise CheckpointError(f"{prefix}: the checkpoint's experts mix {', '.join(sorted(modes))}; llmc's are one format")
        mode = modes.pop()
        fmt = mode.split("-")[0]
        stacked = _stack([_gate_up(f"{prefix}.{e}", gate[2], up[2]) for e, (gate, up, _) in enumerate(mapped)])
        stacked_down = _stack([down_projection[2] for _, _, down_projection in mapped])
        if stacked[0][1].shape[:2] != (experts, features) or stacked_down[0][1].shape[:2] != gm.get_buffer(down.target).shape[:2]:
            raise CheckpointError(f"{prefix}: the checkpoint's quantized experts are {tuple(stacked[0][1].shape)} and "
                                  f"{tuple(stacked_down[0][1].shape)}, which config.json's experts do not fit")
        args = []
        for weight, parts in ((gate_up, stacked), (down, stacked_down)):
            for suffix, value in parts:
                set_weight(gm, f"{weight.target}_{fmt}{suffix}", value.contiguous())
                with gm.graph.inserting_before(node):
                    args.append(gm.graph.get_attr(f"{weight.target}_{fmt}{suffix}"))
        optional = {name: call[name] for name in OPTIONAL_ARG_NAMES}  # biases stay in the build dtype
        x, ids, topk_weights, act, first_expert = (call[name] for name in ("x", "topk_ids", "topk_weights", "act", "first_expert"))
        node.target = torch.ops.llmc.fp8_moe.default if fmt == "fp8" else torch.ops.llmc.nvfp4_moe.default
        node.args, node.kwargs = (x, ids, topk_weights, *args, act, first_expert), optional
        for weight in (gate_up, down):
            if not weight.users:
                gm.graph.erase_node(weight)
                owner, _, attr = weight.target.rpartition(".")
                delattr(gm.get_submodule(owner), attr)
        done.setdefault(mode, set()).update(f"{prefix}.{e}.{name}" for e in range(experts) for name in names)
    return done


def _gate_up(expert: str, gate: list, up: list) -> list:
    """One expert's gate and up parts [(suffix, tensor)] -> its gate_up parts: per-feature tensors concatenated, the
    NVFP4 global scale (a scalar) shared."""
    parts = []
    for (suffix, g), (_, u) in zip(gate, up):
        if g.dim() == 0 and not torch.equal(g, u):
            raise CheckpointError(f"{expert}: gate and up have different NVFP4 global scales ({g.item():.4g}, {u.item():.4g}); "
                                  "llmc::nvfp4_moe has one per expert's gate_up (quantize them with a shared global "
                                  "scale, as llm-compressor and Model Optimizer do)")
        parts.append((suffix, g if g.dim() == 0 else torch.cat([g, u])))
    return parts


def _stack(per_expert: list[list]) -> list:
    """[expert][(suffix, tensor)] -> [(suffix, the experts' tensors stacked)]."""
    return [(suffix, torch.stack([parts[i][1] for parts in per_expert])) for i, (suffix, _) in enumerate(per_expert[0])]
