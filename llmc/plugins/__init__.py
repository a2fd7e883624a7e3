"""Custom ops that passes insert, registered with torch.library under the `llmc` namespace."""

from llmc.plugins import activations, attention, collectives, cpu_kernels, cuda_kernels, linear, moe, norms, quant_embedding, quant_linear, rotary  # noqa: F401

cpu_kernels.load()  # the C++ kernels for this CPU, registered with the dispatcher (unless LLMC_DISABLE_KERNELS=1)
cuda_kernels.register()  # the Triton kernels for CUDA tensors, imported at their first call (same switch)

# What the torch backend's generated step calls directly for an llmc op on CPU, skipping a round trip through
# torch's dispatcher (llmc/backends/step_function.py): the op's reference where it has no C++ kernel here. An op
# with a kernel is called at its C++ entry point (`OpOverload._op`), as aten ops are.
CPU_FUNCTIONS = cpu_kernels.cpu_functions()
