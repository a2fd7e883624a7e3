"""What llmc's ops run on CPU tensors: a C++ kernel (csrc/), else the op's plain-torch reference.

The kernels are compiled when llmc is installed (setup.py): the same sources once per ISA level, into
llmc/_C_<level>. `load` (at import of llmc.plugins) loads the best level this CPU runs; the library
registers its kernels with torch's dispatcher for CPU tensors, so `torch.ops.llmc.X` reaches C++
directly. An op with no kernel at that level (the FP8 and NVFP4 linears need AVX2 or AVX-512) runs its reference,
registered for every device with `reference`. A library that is missing or fails to load is an error:
nothing falls back silently. LLMC_DISABLE_KERNELS=1 loads none, so every op runs its reference (=cpu: none of
these, the CUDA kernels still, cuda_kernels.py).
`llmc env` shows what was chosen.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from pathlib import Path

import torch

LEVELS = ("avx512bf16", "avx512", "avx2", "default")  # setup.py's, best first

# op (OpOverload) -> its reference, the plain-torch definition of its numerics.
REFERENCES: dict = {}


def reference(qualname: str, fn) -> None:
    """Register `fn` as the reference of op `qualname` ("llmc::name"): what runs where no kernel does."""
    torch.library.impl(qualname, "CompositeExplicitAutograd", fn)
    namespace, name = qualname.split("::")
    REFERENCES[getattr(getattr(torch.ops, namespace), name).default] = fn


# op -> (the op it runs as with llmc's CPU kernels, {argument index of a weight [N, ...]: how to prepack it}).
# The prepacked op takes the same arguments, those weights prepacked, and out_features (N) last; the torch backend
# rewrites the op into it as it loads a rank (llmc/plugins/linear.py: prepack_linears).
PREPACKED: dict = {}


def register_prepacked(op, prepacked_op, packers: dict) -> None:
    PREPACKED[op] = (prepacked_op, packers)


def cpu_level() -> str:
    """The best ISA level this CPU runs, as torch's own kernels see it (ATEN_CPU_CAPABILITY=avx2 or default lowers it)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return "avx512bf16" if torch.cpu._is_avx512_bf16_supported() else "avx512"
    return "avx2" if capability == "AVX2" else "default"


@functools.cache
def load() -> str | None:
    """Loads the kernel library for this CPU, once; returns its level (None with LLMC_DISABLE_KERNELS=1 or cpu)."""
    if os.environ.get("LLMC_DISABLE_KERNELS") in ("1", "cpu"):
        return None
    level = cpu_level()
    spec = importlib.util.find_spec(f"llmc._C_{level}")
    if spec is None or spec.origin is None:
        raise ImportError(f"llmc's C++ CPU kernels for {level} are not built: install llmc (`pip install -e .` in a "
                          "checkout, again after editing llmc/plugins/csrc), or set LLMC_DISABLE_KERNELS=1 to run the "
                          "plain-torch references")
    check_stamp(Path(spec.origin).parent)
    torch.ops.load_library(spec.origin)
    return level


def check_stamp(folder: Path) -> None:
    """Refuses libraries built from other sources than the checkout's csrc has now (llmc/plugins/kernel_sources.py)."""
    from llmc.plugins.kernel_sources import CSRC, STAMP, sources_digest

    stamp = folder / STAMP
    if CSRC.is_dir() and stamp.is_file() and stamp.read_text().strip() != sources_digest():
        raise ImportError("llmc's C++ CPU kernels were built from other sources than llmc/plugins/csrc holds now: "
                          "rebuild them (`pip install -e .` in the checkout), or set LLMC_DISABLE_KERNELS=1")


def has_kernel(op: torch._ops.OpOverload) -> bool:
    """Whether CPU calls of `op` reach a C++ kernel (only the kernel library registers CPU implementations)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU")


def cpu_functions() -> dict:
    """op -> the Python function to call for it on CPU without a round trip through the dispatcher: its reference,
    for each op that has no kernel here (llmc/backends/step_function.py; a kernel's direct call is `op._op`)."""
    return {op: fn for op, fn in REFERENCES.items() if not has_kernel(op)}


@contextlib.contextmanager
def references():
    """Within it, CPU calls of every llmc op run its reference, as with LLMC_DISABLE_KERNELS=1 (to compare the two)."""
    library = torch.library.Library("llmc", "IMPL")
    try:
        with warnings.catch_warnings():  # that these override the kernels is the point
            warnings.filterwarnings("ignore", "Warning only once for all operators")
            for op, fn in REFERENCES.items():
                if has_kernel(op):
                    library.impl(op._opname, fn, "CPU")
        yield
    finally:
        library._destroy()


FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
            "avx512_fp16", "amx_tile", "amx_bf16")


def environment() -> dict:
    """What `llmc env` shows: the CPU, the kernel library loaded for it, and what each llmc op runs on CPU."""
    cpu, flags = "unknown", set()
    with contextlib.suppress(OSError):  # Linux's; elsewhere only torch's view below
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    def runs(op) -> str:
        if has_kernel(op):
            return "kernel"
        if op in PREPACKED and has_kernel(PREPACKED[op][0]):  # the torch backend rewrites it when it loads an engine
            return f"kernel, as {PREPACKED[op][0].name()}"
        return "reference"

    level = load()
    spec = importlib.util.find_spec(f"llmc._C_{level}") if level else None
    return {
        "cpu": cpu,
        "features": [f for f in FEATURES if f in flags],
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "level": level,
        "library": spec.origin if spec else None,
        "ops": {op.name(): runs(op) for op in sorted(REFERENCES, key=lambda op: op.name())},
    }
