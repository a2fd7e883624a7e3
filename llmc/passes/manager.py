"""The pass manager: run the registered passes in order, lint, clean up, verify and dump each stage."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx

Record = dict[str, Any]
Pass = Callable[[fx.GraphModule, "BuildContext"], tuple[fx.GraphModule, Record]]
PASSES: dict[str, Pass] = {}
# Passes that turn the model into one rank's part of it: their output is not the model's logits.
SHARDING_PASSES: set[str] = set()
# Passes that change the numerics on purpose (quantization): verification records their change but
# does not hold them to a tolerance; `llmc eval` measures what they cost.
LOSSY_PASSES: set[str] = set()


def register_pass(name: str, *, sharding: bool = False, lossy: bool = False) -> Callable[[Pass], Pass]:
    def register(fn: Pass) -> Pass:
        PASSES[name] = fn
        if sharding:
            SHARDING_PASSES.add(name)
        if lossy:
            LOSSY_PASSES.add(name)
        return fn

    return register


@dataclass
class BuildContext:
    """What passes know about the build beyond the graph, and what they tell the backend."""

    hf_config: Any
    dtype: torch.dtype
    max_seq_len: int
    max_batch_tokens: int
    max_num_seqs: int
    block_size: int = 16
    # Filled by the attention pass (and narrowed by the sharding passes): the KV cache the program expects.
    kv_cache: dict[str, Any] = field(default_factory=dict)
    # The mapping, and which rank of it this graph is being built for (the sharding passes' input).
    tp_size: int = 1
    pp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    ep_size: int = 1  # expert parallel: each MoE layer's experts split over ep, each expert over tp
    ep_rank: int = 0
    pp_layers: list[int] | None = None  # layers per pipeline stage; None balances them by parameters
    # Filled by the pipeline pass: [{"name", "shape" (-1: the token dim), "dtype"}] a stage receives / sends.
    pp_inputs: list[dict[str, Any]] = field(default_factory=list)
    pp_outputs: list[dict[str, Any]] = field(default_factory=list)
    # Quantization (llmc/passes/quantize.py): the mode of the linears, the KV cache's dtype, the
    # weight-name patterns kept in high precision, and the token ids calibration runs the model on.
    quant_mode: str | None = None
    quant_algo: str = "rtn"  # how weights are quantized (llmc/passes/quant_algos)
    kv_cache_dtype: str | None = None
    quant_exclude: tuple[str, ...] = ("lm_head",)
    calibration_samples: list[list[int]] = field(default_factory=list)
    # Filled by the calibrate pass: amax of each linear's input (by weight name) and of each layer's K and V.
    activation_amax: dict[str, dict] = field(default_factory=dict)
    # ... and, for a --quant-algo that reads them, each linear input's statistics (by weight name).
    activation_stats: dict[str, dict] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.ep_size * self.pp_size

    @property
    def architecture(self) -> str:
        """The model's class name (what build errors name), or its model_type where the config has none."""
        return (self.hf_config.architectures or [self.hf_config.model_type])[0]


class PassError(RuntimeError):
    pass


def example_step(gm: fx.GraphModule, ctx: BuildContext, num_tokens: int = 7, input_ids: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Inputs for one prefill of a single sequence (random tokens unless given), for whichever step inputs `gm` takes."""
    vocab = ctx.hf_config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    if input_ids is not None:
        num_tokens = len(input_ids)
    blocks = -(-num_tokens // ctx.block_size)
    inputs = {
        "input_ids": torch.tensor([input_ids]) if input_ids is not None else torch.randint(0, vocab, (1, num_tokens), generator=g),
        "position_ids": torch.arange(num_tokens)[None],
        "rope_seq_lens": torch.full((1, num_tokens), num_tokens),
        "logits_indices": torch.tensor([num_tokens // 2, num_tokens - 1]),
        "slot_mapping": torch.arange(num_tokens),
        "block_tables": torch.arange(blocks, dtype=torch.int32)[None],
        "seq_lens": torch.tensor([num_tokens], dtype=torch.int32),
        "query_start_loc": torch.tensor([0, num_tokens], dtype=torch.int32),
    }
    if ctx.kv_cache:
        kv = ctx.kv_cache
        shape = (kv["num_layers"], 2, blocks, ctx.block_size, kv["num_kv_heads"], kv["head_dim"])
        inputs["kv_cache"] = torch.zeros(shape, dtype=getattr(torch, kv["dtype"]))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in placeholders:  # values a pipeline stage receives: their traced shape, at num_tokens
        if node.target not in inputs:
            val = node.meta["val"]
            shape = [d if isinstance(d, int) else num_tokens for d in val.shape]
            inputs[node.target] = torch.randn(shape, generator=g).to(val.dtype)
    return {n.target: inputs[n.target] for n in placeholders}


def _run(gm: fx.GraphModule, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = gm(**inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def propagate_shapes(gm: fx.GraphModule, ctx: BuildContext) -> None:
    """Keep every node's `meta["val"]` (a fake tensor: shape, dtype, symbolic token dims) current, so that passes
    read current shapes and never set them by hand (docs/design.md, "Passes").

    Incremental: a node is recomputed when it is new, its call changed (target or arguments), or an input's
    value changed; weights are checked against the module's tensors. Inputs keep the values the trace gave
    them; an input a pass added without one (the step's KV-cache arrays) gets its example's shape.
    """
    from torch._guards import detect_fake_mode

    from llmc.passes.graph import on_cpu

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fake_mode = detect_fake_mode([n.meta.get("val") for n in placeholders])
    if fake_mode is None:
        raise PassError("the graph's inputs carry no traced shapes (meta['val']); shapes cannot be propagated")
    missing = [n for n in placeholders if not isinstance(n.meta.get("val"), torch.Tensor)]
    examples = example_step(gm, ctx) if missing else {}
    weights = dict(gm.named_buffers(remove_duplicate=False))
    changed: set[fx.Node] = set()
    with fake_mode:
        for node in gm.graph.nodes:
            old = node.meta.get("val")
            if node.op == "placeholder":
                if node in missing:
                    node.meta["val"] = fake_mode.from_tensor(examples[node.target], static_shapes=True)
            elif node.op == "get_attr":
                w = weights[node.target]
                if not _same(old, w):
                    node.meta["val"] = fake_mode.from_tensor(w, static_shapes=True)
            elif node.op == "call_function":
                key = _call_key(node)
                if old is not None and node.meta.get("val_key") == key and not any(i in changed for i in node.all_input_nodes):
                    continue
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: on_cpu(n.meta["val"]))
                try:
                    node.meta["val"] = node.target(*args, **kwargs)
                except Exception as e:
                    raise PassError(f"{node.format_node()} fails on its inputs' shapes: {type(e).__name__}: "
                                    f"{(str(e).strip().splitlines() or [''])[0]}") from e
                node.meta["val_key"] = key
            if not _same(old, node.meta.get("val")):
                changed.add(node)


def _call_key(node: fx.Node) -> str:
    """What a node's value is a function of: its target, its constant arguments and its inputs' shapes and dtypes
    (an input rewired to another node of the same shape, as when a pass drops an alias, changes nothing)."""
    def signature(n: fx.Node):
        val = n.meta.get("val")
        return (tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else n.name

    return repr((node.target, fx.node.map_arg((node.args, node.kwargs), signature)))


def _stamp_traced_values(gm: fx.GraphModule) -> None:
    """The values the trace computed are current for the calls as traced: only a call a pass changes is recomputed."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and "val" in node.meta and "val_key" not in node.meta:
            node.meta["val_key"] = _call_key(node)


def _same(a: Any, b: Any) -> bool:
    """Whether two (fake) values have the same structure, shapes, strides and dtypes (symbolic sizes compared as
    expressions, without adding guards; meta and CPU count as one device, see `graph.on_cpu`)."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and str(a.shape) == str(b.shape) and str(a.stride()) == str(b.stride())
    return type(a) is type(b) and str(a) == str(b)


def _drop_unused_weights(gm: fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner), attr)
    gm.delete_all_unused_submodules()


def run_passes(
    gm: fx.GraphModule,
    ctx: BuildContext,
    pipeline: tuple[str, ...],
    verify: bool = False,
    dump_dir: str | Path | None = None,
    log: Callable[[str], None] = lambda _: None,
    first_stage: int = 1,
) -> tuple[fx.GraphModule, list[Record]]:
    """Run `pipeline` over `gm`; returns the final module and one record per pass.

    Stages are numbered from `first_stage` in the dumps (a pipeline run in parts continues the count).
    """
    if dump_dir is not None:
        dump_dir = Path(dump_dir)
        dump_dir.mkdir(parents=True, exist_ok=True)
        if first_stage == 1:
            (dump_dir / "00-traced.txt").write_text(gm.print_readable(print_output=False))
    records: list[Record] = []
    _stamp_traced_values(gm)
    for i, name in enumerate(pipeline, start=first_stage):
        check = verify and not (name in SHARDING_PASSES and ctx.world_size > 1)
        before = _run(gm, example_step(gm, ctx)) if check else None
        start = time.perf_counter()
        gm, record = PASSES[name](gm, ctx)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        _drop_unused_weights(gm)
        gm.recompile()
        try:
            propagate_shapes(gm, ctx)
        except PassError as e:
            raise PassError(f"after pass {name!r}: {e}") from e.__cause__
        record = {"pass": name, **record, "seconds": round(time.perf_counter() - start, 4)}
        if check:
            after = _run(gm, example_step(gm, ctx))
            err = (after.float() - before.float()).abs().max().item()
            tol = 1e-4 if ctx.dtype == torch.float32 else 5e-2 * max(1.0, before.float().abs().max().item())
            record["verify_max_abs_diff"] = err
            if not err <= tol and name not in LOSSY_PASSES:
                raise PassError(f"pass {name!r} changed the logits by {err:.3g} (tolerance {tol:.3g})")
        if dump_dir is not None:
            (dump_dir / f"{i:02d}-{name}.txt").write_text(gm.print_readable(print_output=False))
        log(f"pass {name}: " + ", ".join(f"{k}={v}" for k, v in record.items() if k != "pass"))
        records.append(record)
    return gm, records
