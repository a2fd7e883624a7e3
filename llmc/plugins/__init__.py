"""Custom ops that passes insert, registered with torch.library under the `llmc` namespace."""

from llmc.plugins import activations, attention, collectives, linear, norms, quant_embedding, quant_linear, rotary  # noqa: F401
