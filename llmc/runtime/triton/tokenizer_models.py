"""Triton Python-backend models around the engine's tokenizer: preprocessing and postprocessing.

They run inside Triton's Python stub, where `triton_python_backend_utils` exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def parameter(args: dict, key: str) -> str:
    """A string parameter of the model's config.pbtxt."""
    return json.loads(args["model_config"])["parameters"][key]["string_value"]


def model_path(args: dict, key: str) -> Path:
    """A path parameter: absolute, or relative to the model's folder."""
    return Path(args["model_repository"]) / parameter(args, key)


def tensor(request, name: str) -> np.ndarray | None:
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def strings(array: np.ndarray) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in array.reshape(-1)]


def padded(rows: list[list[int]], fill: int) -> np.ndarray:
    width = max(1, max(map(len, rows)))
    return np.array([row + [fill] * (width - len(row)) for row in rows], dtype=np.int32)


def errors_as_responses(one):
    """execute() for models with one response per request: a ValueError answers that request alone."""

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=one(self, request)))
            except ValueError as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return responses

    return execute


class _TokenizerModel:
    def initialize(self, args):
        from llmc.engine import load_tokenizer

        self.tokenizer = load_tokenizer(model_path(args, "tokenizer_dir").parent)  # the engine's tokenizer/


class Preprocessing(_TokenizerModel):
    """QUERY [B, 1] text -> INPUT_ID [B, L] (rows padded with 0), REQUEST_INPUT_LEN [B, 1], and
    BAD_WORDS_DICT [B, n] words -> BAD_WORDS_IDS [B, 2, W] in TensorRT-LLM's layout: row 0 the words'
    token ids one after another, row 1 the offsets where each word ends, padded with -1."""

    @errors_as_responses
    def execute(self, request):
        ids = [self.tokenizer(text)["input_ids"] for text in strings(tensor(request, "QUERY"))]
        bad = tensor(request, "BAD_WORDS_DICT")
        bad_rows = [strings(row) for row in bad] if bad is not None else [[] for _ in ids]
        return [
            pb_utils.Tensor("INPUT_ID", padded(ids, 0)),
            pb_utils.Tensor("REQUEST_INPUT_LEN", np.array([[len(i)] for i in ids], dtype=np.int32)),
            pb_utils.Tensor("BAD_WORDS_IDS", self._word_lists(bad_rows)),
        ]

    def _word_lists(self, rows: list[list[str]]) -> np.ndarray:
        flat, ends = [], []
        for words in rows:
            encoded = [self.tokenizer(w, add_special_tokens=False)["input_ids"] for w in words if w]
            flat.append([t for word in encoded for t in word])
            ends.append(np.cumsum([len(word) for word in encoded]).tolist())
        ids, offsets = padded(flat, 0), padded(ends, -1)
        width = max(ids.shape[1], offsets.shape[1])
        ids = np.pad(ids, ((0, 0), (0, width - ids.shape[1])))
        offsets = np.pad(offsets, ((0, 0), (0, width - offsets.shape[1])), constant_values=-1)
        return np.stack([ids, offsets], axis=1)


class Postprocessing(_TokenizerModel):
    """TOKENS_BATCH [B, L] token ids (the first SEQUENCE_LENGTH of each row, if given) -> OUTPUT [B, 1] text."""

    @errors_as_responses
    def execute(self, request):
        ids = tensor(request, "TOKENS_BATCH")
        lengths = tensor(request, "SEQUENCE_LENGTH")
        rows = [row[: int(lengths[i][0])] if lengths is not None else row for i, row in enumerate(ids)]
        texts = [self.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in rows]
        return [pb_utils.Tensor("OUTPUT", np.array([[t.encode()] for t in texts], dtype=np.object_))]
