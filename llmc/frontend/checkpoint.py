"""A Hugging Face checkpoint directory: its config, its tokenizer files, and its weights by name.

Weights are read one tensor at a time from safetensors, so nothing but the tensors asked for is
ever in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from llmc.engine import TOKENIZER_FILES

# Architectures tested against transformers in llmc's suite. Others are tried (most HF causal LMs
# trace the same way) and fail with a clear error if a pass cannot handle them.
TESTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "GPT2LMHeadModel",
    "GPTJForCausalLM",
    "GPTNeoXForCausalLM",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "OlmoeForCausalLM",
    "FalconForCausalLM",
    "BloomForCausalLM",
    "Gemma2ForCausalLM",
    "DeepseekV3ForCausalLM",
    "DeepseekV2ForCausalLM",
    "Llama4ForCausalLM",
)



class CheckpointError(ValueError):
    """A checkpoint that cannot be built: the message says what is wrong and what to do."""


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a model id of the Hugging Face hub, downloaded."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint's directory (with config.json)")
    if str(model).startswith(("/", ".", "~")) or os.sep + os.sep in str(model):
        raise CheckpointError(f"{model}: no such directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                str(model), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{model!r} is not a local directory and could not be downloaded from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Pass a checkpoint directory, "
            "or check the model id and the network."
        ) from None


class Checkpoint:
    def __init__(self, path: str | os.PathLike):
        self.path = resolve_model_path(path)
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path} has no config.json: is it a Hugging Face model directory?")
        from transformers import AutoConfig

        try:
            self.config = AutoConfig.from_pretrained(self.path)
        except (ValueError, KeyError, OSError) as e:
            raise CheckpointError(f"cannot read {self.path / 'config.json'}: {e}") from None
        self.architecture = (getattr(self.config, "architectures", None) or [type(self.config).__name__])[0]
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

        if type(self.config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise CheckpointError(
                f"architecture {self.architecture} ({self.config.model_type}) is not a causal language model; "
                f"llmc compiles decoder-only causal LMs such as {', '.join(TESTED_ARCHITECTURES)}"
            )
        self._files = self._index_weights()
        self._open: dict[Path, object] = {}

    def _index_weights(self) -> dict[str, Path]:
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            found = ", ".join(p.name for p in self.path.glob("*.bin")) or "no weight files"
            raise CheckpointError(
                f"{self.path} has no *.safetensors weights ({found}). llmc reads safetensors only: "
                "save the model with `save_pretrained(..., safe_serialization=True)`."
            )
        index: dict[str, Path] = {}
        for f in files:
            try:
                with safe_open(f, framework="pt") as st:
                    index.update(dict.fromkeys(st.keys(), f))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"corrupt safetensors file {f}: {e}. Re-download or re-save the checkpoint.") from None
        return index

    def keys(self) -> list[str]:
        return list(self._files)

    def tensor(self, key: str) -> torch.Tensor:
        path = self._files.get(key)
        if path is None:
            raise CheckpointError(f"weight {key!r} is missing from {self.path} (checkpoint incomplete?)")
        try:
            if path not in self._open:
                self._open[path] = safe_open(path, framework="pt")
            return self._open[path].get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"corrupt safetensors file {path} (reading {key!r}): {e}") from None

    def tokenizer_files(self) -> list[Path]:
        files = [self.path / name for name in TOKENIZER_FILES if (self.path / name).is_file()]
        if not any(f.name in ("tokenizer.json", "tokenizer.model", "vocab.json") for f in files):
            raise CheckpointError(
                f"{self.path} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json); "
                "an engine carries its checkpoint's tokenizer: save it beside the weights"
            )
        return files

    def tokenizer(self):
        """AutoTokenizer's tokenizer of the checkpoint: the class it resolves (by tokenizer_config.json and, in
        transformers 5, by the model's config) is what the engine records."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)
        except (OSError, ValueError, ImportError) as e:
            raise CheckpointError(f"cannot load the tokenizer of {self.path}: {str(e).splitlines()[0] if str(e) else e!r}") from None

    def eos_token_ids(self) -> list[int]:
        """EOS ids from generation_config.json, else config.json (HF's own precedence)."""
        for source in (self.path / "generation_config.json", self.path / "config.json"):
            if source.is_file():
                eos = json.loads(source.read_text()).get("eos_token_id")
                if eos is not None:
                    return [eos] if isinstance(eos, int) else list(eos)
        return []
