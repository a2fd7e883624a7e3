"""The torch backend: each rank's program as llmc.fx JSON, its weights as safetensors.

Loading rebuilds the FX graph from allow-listed ops (no pickle, no code from the engine) and runs
it eagerly on the target device, CPU or CUDA, as one generated Python function (step_function.py).
On CPU the linears' weights are prepacked for llmc's kernel as they load (llmc/plugins/linear.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import llmc.plugins  # noqa: F401  (the ops the program calls)
from llmc.plugins.linear import prepack_linears
from llmc.backends.allowed_ops import PROGRAM_OPS
from llmc.backends.base import first_token_step
from llmc.backends.graph_format import GraphFormatError, bind_arguments, graph_from_json, graph_to_json
from llmc.backends.step_function import step_function
from llmc.backends.torch_runner import TorchRunner
from llmc.engine_error import EngineError

if TYPE_CHECKING:
    from llmc.engine import EngineConfig

PROGRAM = "program.json"
WEIGHTS = "weights.safetensors"
ATTENTION = torch.ops.llmc.paged_attention.default


def check_build(dtype: str, tp: int, max_seq_len: int, block_size: int, kv_cache_dtype: str | None = None) -> None:
    """Every build the passes accept runs on the torch backend."""


def rank_files(record: dict) -> tuple[set[str], set[str]]:
    """A rank directory's files: those it must have, and those it may have."""
    return {PROGRAM, WEIGHTS}, set()


def write_rank(gm: fx.GraphModule, rank_dir: Path, ctx=None) -> None:
    program = graph_to_json(gm.graph)
    unknown = sorted({n["target"] for n in program["nodes"] if n["op"] == "call_function" and n["target"] not in PROGRAM_OPS})
    if unknown:  # the loader would refuse the engine (docs/design.md, "Engine files are untrusted"): refuse the build
        arch = (getattr(ctx.hf_config, "architectures", None) or ["this model"])[0] if ctx is not None else "this model"
        raise GraphFormatError(
            f"{arch} is not supported yet: its program calls {', '.join(unknown)}, which no llmc pass lowers and "
            "engines do not run (llmc/backends/allowed_ops.py)"
        )
    try:  # the loader's other checks (bounded sizes, in-place ops only on intermediates), at build time
        graph_from_json(program, allowed=PROGRAM_OPS)
    except GraphFormatError as e:
        arch = (getattr(ctx.hf_config, "architectures", None) or ["this model"])[0] if ctx is not None else "this model"
        raise GraphFormatError(f"{arch} is not supported yet: the engine loader would refuse its program: {e}") from None
    rank_dir.mkdir(parents=True, exist_ok=True)
    (rank_dir / PROGRAM).write_text(json.dumps(program, indent=1) + "\n")
    weights = {name: t.contiguous() for name, t in gm.named_buffers(remove_duplicate=False)}
    save_file(weights, rank_dir / WEIGHTS)


def load_rank(rank_dir: Path, device: torch.device | str = "cpu") -> fx.GraphModule:
    try:
        graph = graph_from_json(json.loads((rank_dir / PROGRAM).read_text()), device)
    except (GraphFormatError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise EngineError(f"cannot load {rank_dir / PROGRAM}: {e}") from None
    try:
        weights = load_file(rank_dir / WEIGHTS, device=str(device))
    except SafetensorError as e:
        raise EngineError(f"cannot load {rank_dir / WEIGHTS}: {e}; rebuild the engine") from None
    read = {n.target for n in graph.nodes if n.op == "get_attr"}
    if read != weights.keys():
        raise EngineError(f"{rank_dir / WEIGHTS} does not hold exactly the weights {rank_dir / PROGRAM} reads: it lacks "
                          f"{sorted(read - weights.keys())[:5]}, and has unread {sorted(weights.keys() - read)[:5]}; rebuild the engine")
    gm = fx.GraphModule(weights, graph)
    if torch.device(device).type == "cpu":
        prepack_linears(gm)
    return gm


def check_cache_access(graph: fx.Graph, num_layers: int, rank_dir: Path) -> None:
    """Every paged attention reads and writes the rank's KV cache input, at one of its num_layers layers
    (the kernels index the cache by these constants)."""
    for node in graph.nodes:
        if node.target is not ATTENTION:
            continue
        bound = bind_arguments(node.target, node.args, node.kwargs) or {}
        kv_cache, layer = bound.get("kv_cache"), bound.get("layer")
        if not (isinstance(kv_cache, fx.Node) and kv_cache.op == "placeholder" and kv_cache.target == "kv_cache"):
            raise EngineError(f"{rank_dir / PROGRAM}: node {node.name!r} attends over {kv_cache}, not the kv_cache input; "
                              "rebuild the engine")
        if type(layer) is not int or not 0 <= layer < num_layers:
            raise EngineError(f"{rank_dir / PROGRAM}: node {node.name!r} reads layer {layer!r} of a KV cache of "
                              f"{num_layers} layers (config.json ranks[].kv_cache.num_layers); rebuild the engine")


def make_runner(rank_dir: Path, config: EngineConfig, rank: int, num_blocks: int, device: torch.device) -> TorchRunner:
    device = torch.device(device)
    gm = load_rank(rank_dir, device)
    check_cache_access(gm.graph, config.ranks[rank]["kv_cache"]["num_layers"], rank_dir)
    inputs = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    runner = TorchRunner(step_function(gm, device, f"rank{rank}"), inputs, config, rank, num_blocks, device)
    probe_step(runner, config, rank, rank_dir)
    return runner


def probe_step(runner: TorchRunner, config: EngineConfig, rank: int, rank_dir: Path) -> None:
    """Run one one-token step as the rank loads: a weight of the wrong shape or dtype, or a program that does not
    take the step's inputs, fails here, named, not on the first request. The KV cache is zeroed after."""
    inputs = first_token_step()
    for spec in config.ranks[rank]["pp_inputs"]:
        inputs[spec["name"]] = torch.zeros([1 if d == -1 else d for d in spec["shape"]], dtype=getattr(torch, spec["dtype"]))
    try:
        runner.run(inputs)
    except Exception as e:  # whatever the program's ops raise on it
        raise EngineError(f"{rank_dir}: the program fails on a one-token step ({type(e).__name__}: {str(e)[:300]}); "
                          "rebuild the engine") from None
    finally:
        runner.kv_cache.zero_()
