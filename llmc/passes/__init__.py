"""Graph passes: one file a pass, one signature, one registry, and the order in one place.

Every pass is `fn(gm, ctx) -> (gm, record)`: it rewrites the FX GraphModule, may read or fill the
build context, and returns a short JSON-able record of what it matched. The manager lints, cleans up
and recompiles after each pass, so passes do not.
"""

from llmc.passes.manager import PASSES, BuildContext, register_pass, run_passes

# Importing a pass module registers it.
from llmc.passes import (  # noqa: E402,F401
    attention, calibrate, canonicalize, complex_rotary, eager_attention, expert_parallel, fold_rotary_into_attention,
    fuse_gated_activation, fuse_layer_norm, fuse_rms_norm, fuse_rotary_embedding, linear, merge_linears,
    pipeline_parallel, positions, quantize, quantize_kv_cache, smooth_activations, tensor_parallel,
)

PIPELINE = (
    # The whole model:
    "canonicalize", "complex_rotary", "positions", "eager_attention", "attention", "fuse_rms_norm", "fuse_layer_norm", "fuse_gated_activation",
    "fuse_rotary_embedding", "linear",
    "calibrate", "smooth_activations", "quantize_kv_cache",
    # After calibration, which records the keys' amax where they enter the cache: after RoPE.
    "fold_rotary_into_attention",
    # Each rank's part of it, from here on (the build runs these once per rank):
    "pipeline_parallel", "tensor_parallel", "expert_parallel", "merge_linears", "quantize",
)
FIRST_RANK_PASS = PIPELINE.index("pipeline_parallel")

__all__ = ["FIRST_RANK_PASS", "PASSES", "PIPELINE", "BuildContext", "register_pass", "run_passes"]
