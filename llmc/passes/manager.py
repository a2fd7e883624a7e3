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


def register_pass(name: str) -> Callable[[Pass], Pass]:
    def register(fn: Pass) -> Pass:
        PASSES[name] = fn
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
    # Filled by the attention pass: the KV cache the program expects.
    kv_cache: dict[str, int] = field(default_factory=dict)


class PassError(RuntimeError):
    pass


def example_step(gm: fx.GraphModule, ctx: BuildContext, num_tokens: int = 7) -> dict[str, torch.Tensor]:
    """Inputs for one prefill of a single sequence, for whichever step inputs `gm` takes."""
    vocab = ctx.hf_config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    blocks = -(-num_tokens // ctx.block_size)
    inputs = {
        "input_ids": torch.randint(0, vocab, (1, num_tokens), generator=g),
        "position_ids": torch.arange(num_tokens)[None],
        "logits_indices": torch.tensor([num_tokens // 2, num_tokens - 1]),
        "slot_mapping": torch.arange(num_tokens),
        "block_tables": torch.arange(blocks, dtype=torch.int32)[None],
        "seq_lens": torch.tensor([num_tokens], dtype=torch.int32),
        "query_start_loc": torch.tensor([0, num_tokens], dtype=torch.int32),
    }
    if ctx.kv_cache:
        kv = ctx.kv_cache
        shape = (kv["num_layers"], 2, blocks, ctx.block_size, kv["num_kv_heads"], kv["head_dim"])
        inputs["kv_cache"] = torch.zeros(shape, dtype=ctx.dtype)
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    return {name: inputs[name] for name in names}


def _run(gm: fx.GraphModule, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = gm(**inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


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
) -> tuple[fx.GraphModule, list[Record]]:
    """Run `pipeline` over `gm`; returns the final module and one record per pass."""
    if dump_dir is not None:
        dump_dir = Path(dump_dir)
        dump_dir.mkdir(parents=True, exist_ok=True)
        (dump_dir / "00-traced.txt").write_text(gm.print_readable(print_output=False))
    records: list[Record] = []
    for i, name in enumerate(pipeline, start=1):
        before = _run(gm, example_step(gm, ctx)) if verify else None
        start = time.perf_counter()
        gm, record = PASSES[name](gm, ctx)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        _drop_unused_weights(gm)
        gm.recompile()
        record = {"pass": name, **record, "seconds": round(time.perf_counter() - start, 4)}
        if verify:
            after = _run(gm, example_step(gm, ctx))
            err = (after.float() - before.float()).abs().max().item()
            tol = 1e-4 if ctx.dtype == torch.float32 else 5e-2 * max(1.0, before.float().abs().max().item())
            record["verify_max_abs_diff"] = err
            if not err <= tol:
                raise PassError(f"pass {name!r} changed the logits by {err:.3g} (tolerance {tol:.3g})")
        if dump_dir is not None:
            (dump_dir / f"{i:02d}-{name}.txt").write_text(gm.print_readable(print_output=False))
        log(f"pass {name}: " + ", ".join(f"{k}={v}" for k, v in record.items() if k != "pass"))
        records.append(record)
    return gm, records
