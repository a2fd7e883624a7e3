"""`llmc eval`: perplexity of an engine, or of a Hugging Face model as the reference, on a text file.

Both score the same token windows the same way: the text's tokens (the engine's or the checkpoint's
tokenizer, which are the same files) are cut into consecutive windows of `window` tokens, each
scored from scratch, and perplexity is exp of the mean negative log-likelihood of every token but
the first of each window. An engine scores a window in chunks of at most its max_batch_tokens,
through its paged KV cache, exactly as a prompt is prefilled.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from llmc.engine import CONFIG
from llmc.frontend.calibration import read_text
from llmc.runtime.llm_engine import LLMEngine
from llmc.runtime.step_inputs import prepare_inputs
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.sequence import Sequence

DEFAULT_WINDOW = 512


def is_engine(path: str | os.PathLike) -> bool:
    config = Path(path) / CONFIG
    return config.is_file() and "schema_version" in json.loads(config.read_text())


def perplexity(model: str | os.PathLike, text_file: str | os.PathLike, window: int | None = None,
               max_tokens: int | None = None, **engine_options) -> dict:
    """{"ppl", "tokens" (scored), "windows", "window"} for an engine directory or a HF model directory."""
    text = read_text(text_file)
    score = EngineScorer(model, **engine_options) if is_engine(model) else HFScorer(model)
    try:
        window = min(window or DEFAULT_WINDOW, score.max_window)
        if window < 2:
            raise ValueError(f"window must be at least 2 tokens, got {window}")
        ids = score.tokenizer(text, verbose=False)["input_ids"][:max_tokens]
        windows = [ids[i : i + window] for i in range(0, len(ids), window)]
        windows = [w for w in windows if len(w) > 1]
        if not windows:
            raise ValueError(f"{text_file} has {len(ids)} token(s); perplexity needs at least 2")
        nll = sum(_nll(score.logits(w), w[1:]) for w in windows)
    finally:
        score.close()
    tokens = sum(len(w) - 1 for w in windows)
    return {"ppl": math.exp(nll / tokens), "tokens": tokens, "windows": len(windows), "window": window}


def _nll(logits: torch.Tensor, targets: list[int]) -> float:
    """Summed negative log-likelihood of `targets` under `logits` [len(targets), vocab]."""
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(targets), reduction="sum").item()


class EngineScorer:
    def __init__(self, engine_dir, **options):
        self.engine = LLMEngine(engine_dir, **options)
        self.tokenizer = self.engine.tokenizer
        self.max_window = self.engine.max_seq_len

    def logits(self, ids: list[int]) -> torch.Tensor:
        """[len(ids) - 1, vocab]: the engine's prediction after each token but the last."""
        engine = self.engine
        seq = Sequence(ids, SamplingParams(max_tokens=1))
        # Nothing else runs: the window takes the cache's first blocks.
        seq.block_table = list(range(-(-len(ids) // engine.block_size)))
        chunk = engine.config.limits["max_batch_tokens"]
        logits = []
        while seq.num_computed_tokens < len(ids) - 1:
            n = min(chunk, len(ids) - 1 - seq.num_computed_tokens)  # the last token is only a target
            inputs, _ = prepare_inputs([(seq, n)], engine.block_size)
            inputs["logits_indices"] = np.arange(n, dtype=np.int64)
            logits.append(engine.executor.execute(inputs))
            seq.num_computed_tokens += n
        return torch.cat(logits)

    def close(self) -> None:
        self.engine.shutdown()


class HFScorer:
    def __init__(self, model_dir):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from llmc.frontend.checkpoint import resolve_model_path

        path = resolve_model_path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.max_window = self.model.config.get_text_config().max_position_embeddings

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids])).logits[0, :-1]

    def close(self) -> None:
        pass
