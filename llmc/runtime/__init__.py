"""Load an engine and serve it: scheduler, KV blocks, sequences, sampler, the `LLM` API."""

from llmc.runtime.guided_decoding_params import GuidedDecodingParams
from llmc.runtime.llm import LLM
from llmc.runtime.outputs import CompletionOutput, RequestOutput
from llmc.runtime.sampling_params import SamplingParams

__all__ = ["GuidedDecodingParams", "LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
