"""The torch backend: each rank's program as llmc.fx JSON, its weights as safetensors.

Loading rebuilds the FX graph from allow-listed ops (no pickle, no code from the engine) and runs
it eagerly on the target device, CPU or CUDA, as one generated Python function (step_function.py).
On CPU the linears' weights are prepacked for llmc's kernel as they load (llmc/plugins/linear.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.fx as fx
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import llmc.plugins  # noqa: F401  (the ops the program calls)
from llmc.plugins.linear import prepack_linears
from llmc.backends.graph_format import GraphFormatError, graph_from_json, graph_to_json
from llmc.backends.step_function import step_function
from llmc.engine import EngineError

PROGRAM = "program.json"
WEIGHTS = "weights.safetensors"


def check_build(dtype: str, tp: int, max_seq_len: int, block_size: int) -> None:
    """Every build the passes accept runs on the torch backend."""


def write_rank(gm: fx.GraphModule, rank_dir: Path, ctx=None) -> None:
    rank_dir.mkdir(parents=True, exist_ok=True)
    (rank_dir / PROGRAM).write_text(json.dumps(graph_to_json(gm.graph), indent=1) + "\n")
    weights = {name: t.contiguous() for name, t in gm.named_buffers(remove_duplicate=False)}
    save_file(weights, rank_dir / WEIGHTS)


def load_rank(rank_dir: Path, device: torch.device | str = "cpu") -> fx.GraphModule:
    try:
        graph = graph_from_json(json.loads((rank_dir / PROGRAM).read_text()), device)
        weights = load_file(rank_dir / WEIGHTS, device=str(device))
    except (GraphFormatError, json.JSONDecodeError, SafetensorError) as e:
        raise EngineError(f"cannot load {rank_dir}: {e}") from None
    missing = {n.target for n in graph.nodes if n.op == "get_attr"} - weights.keys()
    if missing:
        raise EngineError(f"{rank_dir / WEIGHTS} lacks weights the program reads: {sorted(missing)[:5]}")
    gm = fx.GraphModule(weights, graph)
    if torch.device(device).type == "cpu":
        prepack_linears(gm)
    return gm


def make_runner(rank_dir: Path, config, rank: int, num_blocks: int, device: torch.device | str):
    from llmc.runtime.model_runner import ModelRunner

    gm = load_rank(rank_dir, device)
    inputs = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    return ModelRunner(step_function(gm, device, f"rank{rank}"), inputs, config, rank, num_blocks, torch.device(device))
