"""Every op overload a program in an llmc engine may call, in vetted categories. Engines are untrusted files
(docs/design.md, "Engine files are untrusted"): the loader (llmc/backends/graph_format.py) resolves only
PROGRAM_OPS, never a namespace, and the ops loading inserts (prepacked linears) are never read from a file.

Before adding an op, put it in the category whose rule it meets; an op that meets none stays out:
- never: I/O (from_file, save), storage or raw strides/offsets (as_strided, set_, storage ops), random state,
  anything returning a Python number from tensor data (item), and the `operator` arithmetic on sizes (a
  hostile engine could compute a huge size from constants that no bound sees).
- not yet, though safe by these rules, because the architectures that call them would build and differ
  from transformers (docs/architectures.md): `aten.arange` (a position computed as arange(number of
  tokens) is wrong for a batch of sequences or a decode step; llmc/passes/positions.py replaces the one it
  proves is a position-table index, BART's family's, by the positions input);
  `aten.mul_.Tensor` (CTRL matches with it, but Gemma 4's text model then fails its load-time step: its
  global attention layers' head size does not reach llmc::paged_attention).
tests/test_program_ops.py checks that every tested architecture's program calls only these ops.
"""

# (a) Elementwise math, comparisons, reductions, matmul-like ops, normalizations, softmax-like ops, dtype
# casts, bounds-checked indexing: the output's size follows from the inputs' sizes, so any constant is safe.
# `aten.gather` (MoE routers read the chosen experts' scores with it) is indexing of this kind: its output has
# the index's size, and torch checks every index against the input at run time; so is `aten.scatter.value`
# (Phi-3.5-MoE's router masks its first choice with it): its output has its input's size.
COMPUTE_OPS = frozenset({
    "aten.abs.default",
    "aten.add.Tensor",
    "aten.bitwise_not.default",
    "aten.bmm.default",
    "aten.cat.default",
    "aten.clamp.Tensor",
    "aten.clamp.default",
    "aten.clone.default",
    "aten.contiguous.default",
    "aten.cos.default",
    "aten.div.Tensor",
    "aten.embedding.default",
    "aten.exp.default",
    "aten.expm1.default",
    "aten.floor.default",
    "aten.full_like.default",
    "aten.gather.default",
    "aten.gelu.default",
    "aten.gt.Scalar",
    "aten.index.Tensor",
    "aten.layer_norm.default",
    "aten.linalg_vector_norm.default",
    "aten.log.default",
    "aten.log1p.default",
    "aten.masked_fill.Scalar",
    "aten.matmul.default",
    "aten.max.dim",
    "aten.mean.dim",
    "aten.min.other",
    "aten.mul.Tensor",
    "aten.neg.default",
    "aten.ones_like.default",
    "aten.pow.Tensor_Scalar",
    "aten.pow.Tensor_Tensor",
    "aten.reciprocal.default",
    "aten.relu.default",
    "aten.rms_norm.default",
    "aten.rsqrt.default",
    "aten.scatter.value",
    "aten.sigmoid.default",
    "aten.sin.default",
    "aten.softmax.int",
    "aten.softplus.default",
    "aten.square.default",
    "aten.sub.Tensor",
    "aten.sum.dim_IntList",
    "aten.sym_size.int",
    "aten.tanh.default",
    "aten.to.dtype",
    "aten.topk.default",
    "aten.type_as.default",
    "aten.where.self",
    "aten.zeros_like.default",
    "operator.getitem",
})

# (b) Views that cannot read outside their input (no raw strides or storage offsets; out-of-range indices
# are errors, slices are clamped).
VIEW_OPS = frozenset({
    "aten.alias.default",
    "aten.chunk.default",
    "aten.flatten.using_ints",
    "aten.numpy_T.default",
    "aten.permute.default",
    "aten.reshape.default",
    "aten.select.int",
    "aten.slice.Tensor",
    "aten.split.Tensor",
    "aten.split_with_sizes.default",
    "aten.squeeze.dim",
    "aten.transpose.int",
    "aten.unbind.int",
    "aten.unsqueeze.default",
    "aten.view.default",
    "aten.view_as.default",
})

# (c) Ops whose arguments size a new allocation (or a view later ops materialize): each named argument's
# constants are bounded at load (graph_format.MAX_SIZE; a size list's constants also by their product,
# graph_format.MAX_ELEMENTS). Symbolic sizes are `aten.sym_size.int` of a tensor the program already has.
SIZED_OPS = {
    "aten.expand.default": ("size",),
    "aten.new_empty.default": ("size",),
    "aten.repeat.default": ("repeats",),
    "aten.repeat_interleave.self_int": ("repeats", "output_size"),
}

# (d) In-place ops: allowed only on intermediates. The loader refuses one whose destination is, or is a view
# of, a weight or an input (graph_format._check_in_place), so a program cannot rewrite its weights.
# `aten.scatter_` (DeepSeek's group mask, Llama 4's router scores) writes only inside its destination: torch checks
# its indices.
IN_PLACE_OPS = frozenset({
    "aten.add_.Tensor",
    "aten.copy_.default",
    "aten.div_.Tensor",
    "aten.scatter_.src",
    "aten.scatter_.value",
})

# llmc's own ops (llmc/plugins): each checks its arguments against its inputs' shapes.
LLMC_OPS = frozenset({
    "llmc.add_layer_norm.default",
    "llmc.add_rms_norm.default",
    "llmc.all_gather.default",
    "llmc.all_reduce.default",
    "llmc.expert_all_reduce.default",
    "llmc.fp8_dynamic_linear.default",
    "llmc.fp8_embedding.default",
    "llmc.fp8_linear.default",
    "llmc.fp8_moe.default",
    "llmc.gated_activation.default",
    "llmc.linear.default",
    "llmc.moe.default",
    "llmc.nvfp4_embedding.default",
    "llmc.nvfp4_linear.default",
    "llmc.nvfp4_moe.default",
    "llmc.paged_attention.default",
    "llmc.rms_norm.default",
    "llmc.rotary_embedding.default",
    "llmc.vocab_embedding.default",
})

PROGRAM_OPS = COMPUTE_OPS | VIEW_OPS | frozenset(SIZED_OPS) | IN_PLACE_OPS | LLMC_OPS
