"""The torch backend's runner: one rank's program (a generated step function, step_function.py) and its slice of
the paged KV cache, run on the step inputs (docs/design.md, the step contract)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from llmc.backends.base import StepInputs

if TYPE_CHECKING:
    from llmc.engine import EngineConfig


class TorchRunner:
    """One rank's program and its KV cache: [its layers, 2, num_blocks, block_size, its KV heads, head_dim]."""

    def __init__(self, program: Callable, input_names: list[str], config: EngineConfig, rank: int, num_blocks: int,
                 device: torch.device):
        self.program = program  # called with the step inputs in the order of input_names
        self.input_names = input_names
        self.device = device
        kv = config.ranks[rank]["kv_cache"]
        self.kv_cache = torch.zeros(
            (kv["num_layers"], 2, num_blocks, config.kv_cache["block_size"], kv["num_kv_heads"], kv["head_dim"]),
            dtype=getattr(torch, config.kv_cache["dtype"]),
            device=device,
        )

    @torch.inference_mode()
    def run(self, step_inputs: StepInputs) -> tuple[torch.Tensor, ...]:
        values = {**step_inputs, "kv_cache": self.kv_cache}
        out = self.program(*[torch.as_tensor(values[name], device=self.device) for name in self.input_names])
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)
