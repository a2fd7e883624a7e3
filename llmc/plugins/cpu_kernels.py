"""C++ CPU kernels for llmc's ops, compiled on first use with torch's extension builder and cached.

Set LLMC_DISABLE_KERNELS=1 to run the plain-torch reference implementations instead; without a
working compiler that is what happens, with a warning.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
NAME = "llmc_cpu_kernels"


@functools.cache
def load():
    if os.environ.get("LLMC_DISABLE_KERNELS") == "1":
        return None
    try:
        from torch.utils import cpp_extension

        build_dir = Path(cpp_extension._get_build_directory(NAME, verbose=False))
        if not (build_dir / f"{NAME}.so").exists():
            print("[llmc] compiling the CPU kernels (first use only, about a minute)...", file=sys.stderr, flush=True)
        return cpp_extension.load(
            name=NAME,
            sources=[str(p) for p in sorted(CSRC.glob("*.cpp"))],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as e:  # no compiler, no ninja, a failed build: the reference still works
        warnings.warn(f"llmc: C++ CPU kernels unavailable, using the plain-torch reference ({type(e).__name__}: {e})")
        return None
