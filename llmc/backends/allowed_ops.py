"""Every op overload a program in an llmc engine may call: exactly those llmc's passes emit for the
tested architectures in every tested build mode. The engine loader refuses any other target
(llmc/backends/graph_format.py), and the ops loading inserts (prepacked linears) are never read from a file.

Generated; tests/test_program_ops.py checks it. After checking that a new op is safe with hostile constant
arguments, regenerate with:

    PYTHONPATH=. python3 tests/test_program_ops.py > llmc/backends/allowed_ops.py
"""

PROGRAM_OPS = frozenset({
    "aten.add.Tensor",
    "aten.add_.Tensor",
    "aten.cat.default",
    "aten.chunk.default",
    "aten.contiguous.default",
    "aten.copy_.default",
    "aten.cos.default",
    "aten.div.Tensor",
    "aten.embedding.default",
    "aten.expand.default",
    "aten.gelu.default",
    "aten.index.Tensor",
    "aten.layer_norm.default",
    "aten.matmul.default",
    "aten.mean.dim",
    "aten.mul.Tensor",
    "aten.new_empty.default",
    "aten.numpy_T.default",
    "aten.permute.default",
    "aten.pow.Tensor_Scalar",
    "aten.repeat_interleave.self_int",
    "aten.reshape.default",
    "aten.rsqrt.default",
    "aten.select.int",
    "aten.sin.default",
    "aten.slice.Tensor",
    "aten.split.Tensor",
    "aten.split_with_sizes.default",
    "aten.squeeze.dim",
    "aten.sub.Tensor",
    "aten.sym_size.int",
    "aten.tanh.default",
    "aten.to.dtype",
    "aten.transpose.int",
    "aten.type_as.default",
    "aten.unsqueeze.default",
    "aten.view.default",
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
