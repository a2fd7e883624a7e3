"""Builds llmc's C++ CPU kernels (llmc/plugins/csrc) with the package: the same sources compiled once per
ISA level into llmc/_C_<level>, of which llmc/plugins/cpu_kernels.py loads the best one the CPU runs.
Everything else is in pyproject.toml. The build needs the torch it runs with (pinned in both places)."""

import copy
import importlib.util
import os
import platform
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
# level -> (ATen's CPU_CAPABILITY, which picks at::vec's vector width; the instruction sets), best first.
X86_LEVELS = {
    "avx512bf16": ("AVX512", AVX512 + ["-mavx512bf16"]),
    "avx512": ("AVX512", AVX512),
    "avx2": ("AVX2", ["-mavx2", "-mfma", "-mf16c"]),
}
LEVELS = {**(X86_LEVELS if platform.machine().lower() in ("x86_64", "amd64") else {}), "default": ("DEFAULT", [])}


def kernels(level: str, capability: str, flags: list[str]) -> CppExtension:
    return CppExtension(
        f"llmc._C_{level}",
        ["llmc/plugins/csrc/library.cpp"],
        depends=["llmc/plugins/csrc/*.cpp", "llmc/plugins/csrc/*.h"],
        extra_compile_args=["-O3", "-g0", "-fopenmp", f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}", *flags],
        extra_link_args=["-fopenmp"],
    )


def kernel_sources():
    """llmc/plugins/kernel_sources.py, loaded on its own (importing llmc needs llmc's dependencies)."""
    spec = importlib.util.spec_from_file_location("kernel_sources", "llmc/plugins/kernel_sources.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildKernels(BuildExtension.with_options(use_ninja=False)):  # ninja would share one build file among them
    """One translation unit per level: the levels build in parallel, one per core unless `-j` says otherwise."""

    def finalize_options(self):
        super().finalize_options()
        self.parallel = self.parallel or os.cpu_count()

    def build_extension(self, ext):
        # Every level compiles the same source, whose object file would be one path for all of them: each
        # level gets its own temporary folder (on a copy of the command, as the levels build in parallel threads).
        level = copy.copy(self)
        level.build_temp = os.path.join(self.build_temp, ext.name)
        return super(BuildKernels, level).build_extension(ext)

    def run(self):
        super().run()
        sources = kernel_sources()  # the stamp beside the libraries: what they were built from
        for folder in {Path(self.get_ext_fullpath(ext.name)).parent for ext in self.extensions}:
            (folder / sources.STAMP).write_text(sources.sources_digest(Path("llmc/plugins/csrc")) + "\n")


# LLMC_SKIP_CPU_KERNELS=1 installs without them (a GPU machine: scripts/gpu_check.sh, which then runs with
# LLMC_DISABLE_KERNELS=cpu, the CPU ops on their references).
SKIP = os.environ.get("LLMC_SKIP_CPU_KERNELS") == "1"
setup(ext_modules=[] if SKIP else [kernels(level, *spec) for level, spec in LEVELS.items()], cmdclass={"build_ext": BuildKernels})
