"""A graph's weights by name: the buffers its get_attr nodes read, at dotted paths ("model.layers.0.mlp.weight").

Shared by the frontend (loading a checkpoint), the passes (rewriting weights) and the plugins (prepacking at
load time), which the runtime imports without the passes.
"""

from __future__ import annotations

import torch
import torch.fx as fx


def set_weight(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    """Register `value` as the weight (buffer) called `name`."""
    owner, _, attr = name.rpartition(".")
    gm.get_submodule(owner).register_buffer(attr, value)
