"""Tensor parallel (Megatron-LM's scheme): keep tensor-parallel rank `ctx.tp_rank`'s slice of every layer.

Roles come from the graph, not from parameter names:
- a linear whose input is computed from an attention or from other linears (without a norm
  between) is *row parallel*: it keeps its slice of input features, and an all-reduce follows it
  (then its bias, once);
- the linears those inputs come from, and those that feed an attention's query, key or value, are
  *column parallel*: they keep their slice of output features, whole heads at a time, section by
  section where one linear computes several tensors that a split or chunk separates (GPT-2's and Phi-3's
  fused QKV, Phi-3's fused gate/up);
  key/value heads are replicated when tp exceeds their number; a projection whose whole output is
  normalised before it is cut into heads (OLMoE's q/k norms) is replicated, and its rank's heads are
  sliced after the norm;
- the LM head (any other linear as wide as the vocabulary) and the token embedding are *vocab
  parallel*: each rank holds ceil(vocab/tp) rows; logits are all-gathered, embeddings all-reduced;
- any other linear is replicated.
Reshapes between column and row linears that spell out a sharded size (`view(x, [-1, 4096])`) are
rewritten for the rank's size while the graph runs once on example inputs, which checks the result.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

import llmc.plugins.collectives  # noqa: F401  (registers torch.ops.llmc.all_reduce, ...)
from llmc.passes.graph import CASTS, calls
from llmc.passes.manager import BuildContext, PassError, example_step, register_pass
from llmc.passes.pipeline_parallel import NORMS, activations
from llmc.weights import set_weight

aten = torch.ops.aten
llmc = torch.ops.llmc
LINEAR, ATTENTION = llmc.linear.default, llmc.paged_attention.default
# The linears of a pre-quantized checkpoint, quantized from the start (llmc/frontend/prequantized.py), shard too:
# op -> (index of the bias argument, [(index of a weight tensor, input features per column of it, or None where
# the tensor has no input dimension)]). All have the output features first; their other arguments are per tensor.
LINEARS = {
    LINEAR: (2, [(1, 1)]),
    llmc.fp8_linear.default: (4, [(1, 1), (2, None)]),
    llmc.fp8_dynamic_linear.default: (3, [(1, 1), (2, None)]),
    llmc.nvfp4_linear.default: (5, [(1, 2), (2, 16)]),  # two E2M1 codes a byte; an E4M3 scale a block of 16
}
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
SPLITS = (aten.split.Tensor, aten.split_with_sizes.default)
CHUNK = aten.chunk.default  # by count: each rank's chunks are its share of each section, unchanged
# Ops that cut a tensor's features into parts (what a split of sections or heads does), checked by `_unproven_cut`.
CUTS = (*SPLITS, CHUNK, aten.slice.Tensor, aten.narrow.default, aten.select.int, aten.unbind.int, aten.index_select.default,
        aten.index.Tensor, aten.gather.default, aten.unfold.default, aten.as_strided.default)


def _feature_by_feature(node: fx.Node, source: fx.Node) -> bool:
    """An op of `source` alone that maps each feature to itself (DBRX's clipped QKV, a dtype cast, tanh...): ATen's
    pointwise ops whose only tensor argument is `source`, which keep its shape."""
    target = node.target
    if calls(node, CASTS):
        return node.args[0] is source
    if not (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags):
        return False
    return (node.all_input_nodes == [source] and isinstance(node.meta.get("val"), torch.Tensor)
            and _shape(node) == _shape(source))


def _cone(node: fx.Node, stop_at_norms: bool) -> set[fx.Node]:
    """Linears and attentions that `node` is (or is computed from), looking back no further than those."""
    found, stack, seen = set(), [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.target in LINEARS or n.target == ATTENTION:
            found.add(n)
        elif n.target == aten.type_as.default:  # of its second argument it reads the dtype alone
            stack.append(n.args[0])
        elif not (stop_at_norms and (n.target in NORMS or _rms_normalised(n))):
            stack.extend(n.all_input_nodes)
    return found


def _rms_normalised(node: fx.Node) -> bool:
    """x * rsqrt(...): an RMSNorm the fusion left as ops (Gemma's (1 + weight) norms), a norm all the same."""
    return node.target == aten.mul.Tensor and any(isinstance(a, fx.Node) and a.target == aten.rsqrt.default for a in node.args)


def _norm_over_all_heads(linear: fx.Node) -> fx.Node | None:
    """The RMSNorm a column linear's whole output goes through before it is cut into heads (OLMoE's q/k norms)."""
    users = list(linear.users)
    if len(users) == 1 and users[0].target == llmc.rms_norm.default and users[0].args[0] is linear:
        return users[0]
    return None


def _shape(node: fx.Node) -> tuple:
    return tuple(node.meta["val"].shape)


def _layout(linear: fx.Node, features: int) -> tuple[list[int], int, tuple[fx.Node, fx.Node] | None]:
    """(section sizes, head size, head split) of a column linear's output features.

    Sections are the parts a split along the features cuts them into before heads are formed, or a split
    of the heads right after (Falcon's multi-query QKV: (view, split), the head split);
    the head size is the last dim of the reshape that first splits features into heads (1: none).
    """
    sections, stack = None, [linear]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.target in SPLITS or u.target == CHUNK:
                dim = u.args[2] if len(u.args) > 2 else 0
                if dim % len(_shape(n)) == len(_shape(n)) - 1:
                    size = _shape(n)[-1] // u.args[1] if u.target == CHUNK else u.args[1]  # chunk(x, count)
                    sections = list(size) if isinstance(size, (list, tuple)) else [size] * (_shape(n)[-1] // size)
                    stack.append(u)
            elif u.target == operator.getitem or _feature_by_feature(u, n):
                stack.append(u)
            elif u.target in VIEWS:
                before, after = _shape(u.args[0]), _shape(u)
                if len(after) == len(before) + 1 and after[-2] * after[-1] == before[-1]:
                    head = int(after[-1])
                    split = next((v for v in u.users if v.target == aten.split_with_sizes.default
                                  and (v.args[2] if len(v.args) > 2 else 0) % len(after) == len(after) - 2), None)
                    if sections is None and split is not None:
                        return [size * head for size in split.args[1]], head, (u, split)
                    return sections or [features], head, None
                stack.append(u)
    return sections or [features], 1, None


def _unproven_cut(linear: fx.Node, heads: bool) -> tuple[fx.Node, fx.Node] | None:
    """(op, cut) where a column linear's output reaches an op that `_layout` does not follow and, from there, an op
    that cuts its features: sections `_layout` cannot see, which the rank's shard would mix up. Views into heads are
    known where the linear feeds an attention (`heads`), and cuts in any other linear's output are its own."""
    stack, seen = [linear], set()
    while stack:
        n = stack.pop()
        if not isinstance(n.meta.get("val"), torch.Tensor):  # a split: its getitems are followed
            stack.extend(u for u in n.users if u.target == operator.getitem and u not in seen)
            continue
        features = _shape(n)[-1]
        for u in n.users:
            if u in seen or u.target in LINEARS or u.target == ATTENTION:
                continue
            seen.add(u)
            if _feature_by_feature(u, n):
                stack.append(u)
            elif u.target in SPLITS or u.target == CHUNK:
                dim = u.args[2] if len(u.args) > 2 else 0
                if dim % len(_shape(n)) == len(_shape(n)) - 1:
                    stack.append(u)
                else:
                    cut = _cut_after(u, features)
                    if cut is not None:
                        return u, cut
            elif u.target in VIEWS and _shape(u)[-1] == features:
                stack.append(u)
            elif u.target in VIEWS and _into_groups(_shape(u), features):
                # Groups of features, sharded whole: fine for an attention's heads (Bloom's [heads, 3, d], DeepSeek's
                # [heads, nope + v]), and elsewhere (HRM's per-head gate of the attention's output) unless something
                # cuts into them (a fused gate/up viewed as [2, I])
                cut = None if heads else _cut_after(u, None)
                if cut is not None:
                    return u, cut
            else:
                cut = _cut_after(u, features)
                if cut is not None:
                    return u, cut
    return None


def _into_groups(shape: tuple, features: int) -> bool:
    """Whether a view of that shape cuts `features` features into its last dims: [..., groups, (...,) size]."""
    size = 1
    for d in reversed(shape):
        if not isinstance(d, int) or size >= features:
            break
        size *= d
    return size == features and shape[-1] != features


def _cut_after(op: fx.Node, features: int | None) -> fx.Node | None:
    """The first op from `op` on (up to the next linear or attention) that cuts a dim of `features` features
    (None: that cuts any dim)."""
    stack, seen = [op], set()
    while stack:
        n = stack.pop()
        if n in seen or n.target in LINEARS or n.target == ATTENTION or n.op != "call_function":
            continue
        seen.add(n)
        source = n.args[0] if n.args else None
        if features is None and n.target in CUTS:
            return n
        if _has_dim(source, features) and (n.target in CUTS or n.target in VIEWS and not _has_dim(n, features)):
            return n
        stack.extend(n.users)
    return None


class _Plan:
    """Row indices of each sharded weight, and what to check about the tp degree."""

    def __init__(self, tp: int, rank: int):
        self.tp, self.rank = tp, rank
        self.rows: dict[str, torch.Tensor] = {}  # weight name -> output rows (column/vocab) kept
        self.cols: dict[str, slice] = {}  # weight name -> input columns (row) kept
        self.problems: list[str] = []
        self.divisors: list[tuple[int, int | None]] = []  # (units that must split, or replicate when tp is a multiple)

    def heads(self, sections: list[int], unit: int, query_heads: int) -> torch.Tensor:
        rows, offset = [], 0
        for size in sections:
            heads = size // unit
            kv = unit > 1 and heads < query_heads  # key/value heads of grouped-query attention may replicate
            self.divisors.append((heads, heads if kv else None))
            if heads % self.tp == 0:
                per = heads // self.tp
                first, count = self.rank * per, per
            elif kv and self.tp % heads == 0:
                first, count = self.rank // (self.tp // heads), 1
            else:
                first, count = 0, 0
                what = "attention heads" if unit > 1 else "features"
                self.problems.append(f"tp={self.tp} does not divide the {heads} {what} of a projection")
            rows.append(torch.arange(offset + first * unit, offset + (first + count) * unit))
            offset += size
        return torch.cat(rows)

    def valid_tp(self) -> list[int]:
        limit = max(n for n, _ in self.divisors)
        return [t for t in range(1, limit + 1) if all(n % t == 0 or (r and t % r == 0) for n, r in self.divisors)]


@register_pass("tensor_parallel", sharding=True)
def tensor_parallel(gm: fx.GraphModule, ctx: BuildContext):
    if ctx.tp_size == 1:
        return gm, {}
    graph, tp, rank = gm.graph, ctx.tp_size, ctx.tp_rank
    vocab = ctx.hf_config.get_text_config().vocab_size
    attentions = [n for n in graph.nodes if n.target == ATTENTION]
    linears = [n for n in graph.nodes if n.target in LINEARS]
    rows = [n for n in linears if _cone(n.args[0], stop_at_norms=True)]
    attention_columns = {lin: att for att in attentions for arg in att.args[:3] for lin in _cone(arg, False) if lin.target in LINEARS}
    mlp_columns = {lin for row in rows for lin in _cone(row.args[0], True) if lin.target in LINEARS} - set(attention_columns)
    others = [n for n in linears if n not in rows and n not in attention_columns and n not in mlp_columns]
    vocab_linears = [n for n in others if gm.get_buffer(n.args[1].target).shape[0] == vocab]
    acts = activations(graph)
    embeddings = [n for n in graph.nodes if n.target == aten.embedding.default and n.args[1] in acts]  # token ids, not positions
    plan = _Plan(tp, rank)
    normed_heads: dict[fx.Node, torch.Tensor] = {}  # a norm over all heads' features -> the rank's features after it
    fixed_sizes: dict[fx.Node, list] = {}  # a view or split of heads -> the sizes it names on this rank

    for lin in linears:
        if (lin in attention_columns and _norm_over_all_heads(lin) is None) or lin in mlp_columns:
            unproven = _unproven_cut(lin, heads=lin in attention_columns)
            if unproven is not None:
                op, cut = unproven
                raise PassError(f"tensor_parallel: {ctx.architecture}'s {lin.args[1].target} output goes through "
                                f"{_op_name(op)} before {_op_name(cut)} cuts its features, a layout llmc cannot shard; "
                                "build with --tp 1")
        if lin in attention_columns:
            sections, unit, head_split = _layout(lin, gm.get_buffer(lin.args[1].target).shape[0])
            query_heads = _shape(attention_columns[lin].args[0])[1]
            kept = plan.heads(sections, unit, query_heads)
            if head_split is not None:  # the rank's heads of each section: what its view and split name
                view, split = head_split
                bounds = torch.tensor(sections).cumsum(0)
                counts = [int(c) // unit for c in torch.bucketize(kept, bounds, right=True).bincount(minlength=len(sections))]
                shape = list(view.args[1])
                shape[-2] = sum(counts)
                fixed_sizes[view], fixed_sizes[split] = shape, counts
            norm = _norm_over_all_heads(lin)
            if norm is None:
                plan.rows[lin.args[1].target] = kept
            else:  # replicated, normalised whole, then cut to the rank's heads
                normed_heads[norm] = kept
        elif lin in mlp_columns:  # sections: a fused gate/up (Phi-3) shards as its two halves
            sections, _, _ = _layout(lin, gm.get_buffer(lin.args[1].target).shape[0])
            plan.rows[lin.args[1].target] = plan.heads(sections, 1, 0)
        elif lin in rows:
            features = gm.get_buffer(lin.args[1].target).shape[1] * LINEARS[lin.target][1][0][1]
            unit = max(per for _, per in LINEARS[lin.target][1] if per)  # NVFP4 blocks stay whole
            plan.divisors.append((features // unit, None))
            plan.cols[lin.args[1].target] = slice(rank * features // tp, (rank + 1) * features // tp)
            if features % (tp * unit):
                blocks = f" in blocks of {unit}" if unit > 1 else ""
                plan.problems.append(f"tp={tp} does not divide the {features} input features{blocks} of a projection")
    if plan.problems:
        raise PassError(f"{plan.problems[0]}; tp can be {', '.join(map(str, plan.valid_tp()))} for this model")
    per_rank = -(-vocab // tp)
    vocab_rows = torch.arange(rank * per_rank, (rank + 1) * per_rank)  # past the vocabulary: zero rows

    sharded: set[str] = set()

    def shard(name: str, index: torch.Tensor | slice, dim: int) -> None:
        if name in sharded:
            return  # a tied weight: the embedding and the LM head share one shard
        sharded.add(name)
        w = gm.get_buffer(name)
        if isinstance(index, slice):
            set_weight(gm, name, (w[:, index] if dim == 1 else w[index]).contiguous())
            return
        padded = torch.zeros((len(index), *w.shape[1:]), dtype=w.dtype)
        inside = index < w.shape[0]
        padded[inside] = w[index[inside]]
        set_weight(gm, name, padded.contiguous())

    def insert_after(node: fx.Node, target, *args) -> fx.Node:
        with graph.inserting_after(node):
            new = graph.call_function(target, (node, *args))
        node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        return new

    for lin in linears:
        bias_index, parts = LINEARS[lin.target]
        w, bias = lin.args[1].target, lin.args[bias_index]
        if w in plan.rows:
            for i, _ in parts:
                shard(lin.args[i].target, plan.rows[w], 0)
            if bias is not None:
                shard(bias.target, plan.rows[w], 0)
        elif w in plan.cols:
            cols = plan.cols[w]
            for i, per in parts:
                if per is not None:
                    shard(lin.args[i].target, slice(cols.start // per, cols.stop // per), 1)
            lin.update_arg(bias_index, None)
            reduced = insert_after(lin, llmc.all_reduce.default)
            if bias is not None:
                insert_after(reduced, aten.add.Tensor, bias)
        elif lin in vocab_linears:
            for i, _ in parts:
                shard(lin.args[i].target, vocab_rows, 0)
            if bias is not None:
                shard(bias.target, vocab_rows, 0)
            insert_after(lin, llmc.all_gather.default, vocab)
    for norm, kept in normed_heads.items():
        first, last = int(kept[0]), int(kept[-1]) + 1
        if not torch.equal(kept, torch.arange(first, last)):
            raise PassError(f"tensor_parallel: the heads rank {rank} keeps after {norm.name} (a norm over all heads) are not "
                            "one run of features; use a tp that divides the KV heads")
        insert_after(norm, aten.slice.Tensor, -1, first, last)
    for emb in embeddings:
        shard(emb.args[0].target, vocab_rows, 0)
        emb.target, emb.args = llmc.vocab_embedding.default, (emb.args[0], emb.args[1], rank * per_rank)
        insert_after(emb, llmc.all_reduce.default)

    kv_heads = ctx.kv_cache["num_kv_heads"]
    ctx.kv_cache = {**ctx.kv_cache, "num_kv_heads": kv_heads // tp if kv_heads % tp == 0 else 1}
    _fit_reshapes(gm, ctx, fixed_sizes)
    return gm, {
        "column_parallel": len(attention_columns) + len(mlp_columns),
        "row_parallel": len(rows),
        "vocab_parallel": len(vocab_linears) + len(embeddings),
        "replicated": len(others) - len(vocab_linears),
        "kv_heads_per_rank": ctx.kv_cache["num_kv_heads"],
    }


def _has_dim(node, size: int) -> bool:
    """Whether `node` is a tensor with a dim of `size` (a number: symbolic dims are the tokens')."""
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(v, torch.Tensor) and any(isinstance(d, int) and d == size for d in v.shape)


def _op_name(node: fx.Node) -> str:
    return f"{node.name} ({node.target})" if isinstance(node.target, torch._ops.OpOverload) else node.name


def _sharded_dim(full: tuple, local: torch.Size) -> tuple[int, int] | None:
    """(dim, factor) where a rank's tensor is 1/factor of the traced one; None if it is whole."""
    for i, (f, l) in enumerate(zip(full, local)):
        if isinstance(f, int) and f != l:
            return i, f // l
    return None


class _ReshapeFitter(fx.Interpreter):
    """Runs the rank's graph; before each reshape or split of a sharded tensor, divides the size it names."""

    def __init__(self, gm: fx.GraphModule, rank: int, fixed_sizes: dict[fx.Node, list]):
        super().__init__(gm)
        self.rank, self.fixed_sizes = rank, fixed_sizes
        self.sharded: list[fx.Node] = []  # nodes whose traced shape is no longer the rank's
        self.broadcast_inputs: dict[fx.Node, torch.Tensor] = {}

    def _fit_head_constants(self, n: fx.Node) -> None:
        """ALiBi slopes and sinks, one per query head, keep the heads this rank's q has (a contiguous run of them)."""
        heads = self.env[n.args[0]].shape[1]
        for name in ("alibi_slopes", "sinks"):
            node = n.kwargs.get(name)
            if node is None or self.env[node].shape[0] == heads:
                continue
            if node.op != "get_attr":
                raise PassError(f"tensor_parallel: the {name} of {n.name} are computed in the graph; llmc cannot shard them")
            value = self.module.get_buffer(node.target)
            if value.shape[0] != heads:  # not yet sliced by another layer reading the same weight
                value = value[self.rank * heads : (self.rank + 1) * heads].contiguous()
                set_weight(self.module, node.target, value)
            self.env[node] = value

    def _fit_new_tensor_size(self, n: fx.Node) -> None:
        """A tensor made in the shape of a sharded one (MLA's key: new_empty(kv, [b, heads, s, d])) takes the rank's."""
        found = _sharded_dim(_shape(n.args[0]), self.env[n.args[0]].shape)
        size = list(n.args[1])
        if found is not None and size[found[0]] == _shape(n.args[0])[found[0]]:
            size[found[0]] //= found[1]
            n.update_arg(1, size)

    def _fit_copied_broadcast(self, n: fx.Node) -> None:
        """A broadcast made to fill a sharded tensor (MLA's shared rope key, expanded to every head of the key)
        takes that tensor's rank shape: their traced shapes were the same."""
        dest, src = n.args[0], n.args[1]
        if src.target != aten.expand.default or _shape(src) != _shape(dest):
            return
        shape = self.env[dest].shape
        if self.env[src].shape != shape:
            src.update_arg(1, [r if isinstance(s, int) and s != -1 else s for s, r in zip(src.args[1], shape)])
            self.env[src] = self.broadcast_inputs.pop(src).expand(shape)
            self.sharded.append(src)

    def run_node(self, n: fx.Node):
        if n.target == ATTENTION:
            self._fit_head_constants(n)
        if n.target == aten.new_empty.default and "val" in n.args[0].meta:
            self._fit_new_tensor_size(n)
        if n.target == aten.copy_.default:
            self._fit_copied_broadcast(n)
        if n.target == aten.expand.default and any(u.target == aten.copy_.default and u.args[1] is n for u in n.users):
            # kept for _fit_copied_broadcast: the interpreter frees the input once the expand has run
            self.broadcast_inputs[n] = self.env[n.args[0]]
        if n in self.fixed_sizes:
            n.update_arg(1, self.fixed_sizes[n])
        elif (n.target in VIEWS or n.target in SPLITS) and "val" in n.args[0].meta:
            found = _sharded_dim(_shape(n.args[0]), self.env[n.args[0]].shape)
            if found is not None:
                dim, factor = found
                if n.target in VIEWS:
                    _fit_view(n, factor)
                elif (n.args[2] if len(n.args) > 2 else 0) % len(_shape(n.args[0])) == dim:
                    size = n.args[1]
                    n.update_arg(1, [s // factor for s in size] if isinstance(size, (list, tuple)) else size // factor)
        try:
            out = super().run_node(n)
        except Exception as e:
            raise PassError(f"tensor_parallel: {n.format_node()} fails on the rank's shapes: {e}") from e
        if isinstance(out, torch.Tensor) and isinstance(n.meta.get("val"), torch.Tensor):
            if _sharded_dim(_shape(n), out.shape) is not None:
                self.sharded.append(n)
        return out


def _fit_view(n: fx.Node, factor: int) -> None:
    shape, full = list(n.args[1]), _shape(n)
    if any(s == -1 and isinstance(f, int) for s, f in zip(shape, full)):
        return  # an inferred feature dim takes the rank's size by itself
    for i, (s, f) in enumerate(zip(shape, full)):
        if isinstance(s, int) and isinstance(f, int) and s > 1 and s % factor == 0:
            shape[i] = s // factor
            n.update_arg(1, shape)
            return


def _fit_reshapes(gm: fx.GraphModule, ctx: BuildContext, fixed_sizes: dict[fx.Node, list]) -> None:
    gm.recompile()
    fitter = _ReshapeFitter(gm, ctx.tp_rank, fixed_sizes)
    with torch.no_grad():
        fitter.run(*example_step(gm, ctx).values())
    for n in fitter.sharded:
        del n.meta["val"]  # the traced shape is the whole model's
