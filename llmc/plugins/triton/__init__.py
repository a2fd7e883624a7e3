"""Triton kernels for llmc's ops on CUDA tensors, one file per kernel, each computing what its op's plain-torch
reference in llmc/plugins/ defines. llmc/plugins/cuda_kernels.py registers them with torch's dispatcher for CUDA.

Importing this package imports no Triton: each kernel's module does, and `@triton.jit` decides when that module is
imported whether its kernels compile for the GPU or run in Triton's interpreter (TRITON_INTERPRET=1, which runs them
on CPU tensors: how CI checks them without a GPU, tests/test_triton_kernels.py). The kernels use nothing newer than
Triton 3.6.
"""
