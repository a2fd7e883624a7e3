"""Every op overload a program in an llmc engine may call: exactly those llmc's passes emit for the
tested architectures in every tested build mode. The engine loader refuses any other target
(llmc/backends/graph_format.py), and the ops loading inserts (prepacked linears) are never read from a file.

Generated; tests/test_program_ops.py checks it. After checking that a new op is safe with hostile constant
arguments, regenerate with:

    PYTHONPATH=. python3 tests/test_program_ops.py > llmc/backends/allowed_ops.py
"""

PROGRAM_OPS = frozenset({
    "aten.add.Tensor",
    "aten.cat.default",
    "aten.chunk.default",
    "aten.clamp.default",
    "aten.contiguous.default",
    "aten.cos.default",
    "aten.div.Tensor",
    "aten.embedding.default",
    "aten.gelu.default",
    "aten.gt.Scalar",
    "aten.index.Tensor",
    "aten.layer_norm.default",
    "aten.mul.Tensor",
    "aten.pow.Tensor_Scalar",
    "aten.pow.Tensor_Tensor",
    "aten.reciprocal.default",
    "aten.repeat_interleave.self_int",
    "aten.reshape.default",
    "aten.sin.default",
    "aten.split.Tensor",
    "aten.split_with_sizes.default",
    "aten.sub.Tensor",
    "aten.sym_size.int",
    "aten.tanh.default",
    "aten.to.dtype",
    "aten.transpose.int",
    "aten.unsqueeze.default",
    "aten.view.default",
    "aten.where.self",
    "llmc.add_layer_norm.default",
    "llmc.add_rms_norm.default",
    "llmc.all_gather.default",
    "llmc.all_reduce.default",
    "llmc.fp8_embedding.default",
    "llmc.fp8_linear.default",
    "llmc.gated_activation.default",
    "llmc.linear.default",
    "llmc.nvfp4_embedding.default",
    "llmc.nvfp4_linear.default",
    "llmc.paged_attention.default",
    "llmc.rms_norm.default",
    "llmc.vocab_embedding.default",
    "operator.getitem",
})
