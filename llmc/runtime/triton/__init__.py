"""Serving llmc engines from NVIDIA Triton Inference Server (Python backend).

`write_repository` generates a model repository shaped like TensorRT-LLM's (ensemble, preprocessing,
the engine's model, postprocessing); `TritonServer` starts the server bundled in the nvidia-pytriton
wheel on loopback. The models' code is llmc's own (`llmc_model.py`, `tokenizer_models.py`): each
generated model.py imports it, so it runs in the server's Python wherever llmc is installed.
"""

from llmc.runtime.triton.repository import write_repository
from llmc.runtime.triton.server import TritonServer, TritonServerError

__all__ = ["write_repository", "TritonServer", "TritonServerError"]
