"""llmc: compile Hugging Face causal LMs into engines and serve them."""

import os

__version__ = "0.1.0"

# llmc's kernels run on a pool of their own (plugins/csrc/parallel.h); torch's ops run on OpenMP.
# OpenMP threads (torch's CPU pool, libgomp) by default spin for a while after each parallel
# region. A step is hundreds of regions with Python in between; once another process wants a core,
# the spinning threads and the thread that drives the steps take turns on too few cores, and
# generation in the main thread ran 5-50x slower than the server. Passive threads sleep at once.
# libgomp reads this when torch loads: it takes effect here if torch is not imported yet, and in
# every process started from here (rank processes, `llmc serve`). A user's own setting wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def __getattr__(name):
    # Lazy, so that `import llmc` for the runtime does not import the compiler (and vice versa).
    if name in ("LLM", "SamplingParams", "GuidedDecodingParams", "RequestOutput", "CompletionOutput"):
        import llmc.runtime

        return getattr(llmc.runtime, name)
    if name == "build":
        from llmc.compiler import build

        return build
    raise AttributeError(f"module 'llmc' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "GuidedDecodingParams", "RequestOutput", "CompletionOutput", "build", "__version__"]
