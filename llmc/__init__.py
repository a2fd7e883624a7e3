"""llmc: compile Hugging Face causal LMs into engines and serve them."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that `import llmc` for the runtime does not import the compiler (and vice versa).
    if name in ("LLM", "SamplingParams", "RequestOutput"):
        import llmc.runtime

        return getattr(llmc.runtime, name)
    if name == "build":
        from llmc.compiler import build

        return build
    raise AttributeError(f"module 'llmc' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "RequestOutput", "build", "__version__"]
