"""The registry sweep: every causal LM of transformers, tiny and random, built by llmc and run against
`generate` (fp32, greedy). Each must match token for token or be refused at build time with a one-line
llmc error (docs/design.md, "Passes"). `python -m llmc.sweep` writes docs/architectures.md from it;
tests/test_architectures.py asserts it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB = 256
PROMPT_LENGTHS = (5, 11)
NEW_TOKENS = 8
MAX_PARAMS = 20_000_000

# Registry entries the sweep does not build, and why (the only ones): models that cannot run alone on text.
SKIPPED = {
    "moss_transcribe_diarize": "speech model: needs audio inputs",
    "musicgen": "audio model: predicts codebooks, needs encoder inputs",
    "musicgen_melody": "audio model: predicts codebooks, needs encoder inputs",
    "moshi": "speech model: needs audio codebook inputs",
    "gemma3": "vision-language model (ForConditionalGeneration); its text model is gemma3_text",
    "gemma3n": "vision-audio-language model (ForConditionalGeneration); its text model is gemma3n_text",
    "gemma4": "vision-language model (ForConditionalGeneration); its text model is gemma4_text",
    "gemma4_unified": "vision-language model (ForConditionalGeneration); its text model is gemma4_unified_text",
    "got_ocr2": "OCR model: needs image inputs",
    "mllama": "vision-language model: needs image inputs",
    "fuyu": "vision-language model: needs image patches",
    "phi4_multimodal": "vision-audio-language model: needs image or audio inputs",
    "emu3": "vision-language model: needs image token inputs",
    "git": "image-to-text model: needs pixel inputs",
    "trocr": "OCR decoder: needs encoder (image) hidden states",
    "whisper": "speech decoder: needs encoder (audio) hidden states",
    "gemma4_assistant": "speculative-decoding drafter: needs the main model's hidden states and KV cache",
    "gemma4_unified_assistant": "speculative-decoding drafter: needs the main model's hidden states and KV cache",
}

# Registry entries whose tiny config (`tiny_config`) transformers itself cannot run yet: the shrinker's gaps,
# not llmc's (the sweep reports them as crashed; tests/test_architectures.py expects that, strictly).
TINY_CONFIG_GAPS = {
    "blt": "transformers' generate fails on it at any size: its cache asks BltConfig for num_hidden_layers, which it lacks",
}

# Standard config attribute names (mapped to each config's own through its `attribute_map`) and the tiny values.
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
# Other size-like attributes many configs share (MoE, MLA, linear attention): clamped to at most these.
CLAMPED = {
    "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "ffn_hidden_size": 128, "d_ff": 128,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "n_shared_experts": 1, "num_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "moe_k": 2, "rotary_dim": 8,
    "num_experts_per_token": 2, "expert_ffn_hidden_size": 64, "zero_expert_num": 2, "shared_intermediate_size": 64,
    "linear_head_dim": 16, "linear_num_heads": 4, "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16,
    # Encoder-decoder families' decoders (BART, Marian, ...): the causal LM is their decoder.
    "decoder_layers": 2, "encoder_layers": 2, "decoder_attention_heads": 4, "encoder_attention_heads": 4,
    "decoder_ffn_dim": 128, "encoder_ffn_dim": 128,
}

_BLT_SUB = {"vocab_size": VOCAB, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128}
# Per-type attributes the generic shrinking cannot derive (sizes left None, layer layouts that must keep an
# attention layer among 2, sizes a validator ties together). Data only: `tiny_config` applies them last.
OVERRIDES = {
    "deepseek_v2": {"num_experts_per_tok": 2},
    "dots1": {"n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 1, "state_size": 16},
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},  # as real DBRX configs
             "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"],  # shares one block
              "attention_hidden_size": 128, "attention_head_dim": 32, "mamba_dt_rank": 4},
    "zamba2": {"layers_block_type": ["linear_attention", "hybrid"]},
    "kolibri1_1": {"index_num_heads": 2},
    "cohere_compass_text": {"rope_parameters": {t: {"rope_type": "default", "rope_theta": 10000.0}
                                                for t in ("full_attention", "sliding_attention")}},
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": [32, 32]},
    "gemma3n_text": {"num_hidden_layers": 4, "layer_types": ["sliding_attention", "full_attention"] * 2,
                     "num_kv_shared_layers": 2, "activation_sparsity_pattern": [0.95, 0.0, 0.0, 0.0]},  # 2 share 2's cache
    "inkling2_text": {"unpadded_vocab_size": VOCAB},
    "inkling2_loop_text": {"unpadded_vocab_size": VOCAB},
    "dots3_note": {"vision_config": {"adapter_out_dim": TINY["hidden_size"]},  # the adapters feed the text model
                   "audio_config": {"adapter_out_dim": TINY["hidden_size"]}},
    "xmod": {"default_language": "en_XX"},
    "xlm": {"pad_token_id": 2},  # its sequence lengths count the tokens that are not padding
    "prophetnet": {"pad_token_id": 0},  # its positions start after the padding index
    "blt": {"encoder_hash_byte_group_vocab": 512, "encoder_hash_byte_group_size": [3, 4],  # its 4 sub-models
            "patcher_config": {**_BLT_SUB, "hidden_size": 64, "num_hidden_layers": 2, "head_dim": 16},
            "encoder_config": {**_BLT_SUB, "hidden_size": 64, "hidden_size_global": 128, "num_hidden_layers": 1},
            "decoder_config": {**_BLT_SUB, "hidden_size": 64, "hidden_size_global": 128, "num_hidden_layers": 2, "head_dim": 16},
            "global_config": {**_BLT_SUB, "hidden_size": 128, "num_hidden_layers": 2, "head_dim": 32}},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                       "indexer_compress_ratio": 2, "ngram_vocab_size_base": VOCAB, "hc_lowrank": 16},
    "xlstm": {"hidden_size": 128, "embedding_dim": 128, "num_blocks": 2, "num_heads": 4},  # q/k dims: multiples of 64
}


@dataclass
class Result:
    model_type: str
    architecture: str
    status: str  # "matches", "refused", "skipped", or a failure: "differs", "crashed", "multi-line error"
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("matches", "refused", "skipped")


def tiny_config(model_type: str):
    """`model_type`'s config with its defaults, shrunk: the standard sizes, and size-like attributes clamped."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    text_config = getattr(cls, "sub_configs", {}).get("text_config")
    if getattr(text_config, "model_type", None) in CONFIG_MAPPING:  # vision-language: its text model is the causal LM
        text = tiny_config(text_config.model_type).to_dict()
        return _special_tokens_in_vocabulary(cls(text_config=text, **OVERRIDES.get(model_type, {})))
    defaults = cls().to_dict()  # the stored attributes (not properties derived from them)
    names = dict(getattr(cls, "attribute_map", {}))
    kwargs = {}
    for std, value in TINY.items():
        name = names.get(std, std)
        if name in defaults:
            kwargs[name] = value
    for std, limit in CLAMPED.items():
        name = names.get(std, std)
        current = defaults.get(name)
        if isinstance(current, int) and not isinstance(current, bool) and current > limit:
            kwargs[name] = limit
    layer_types = defaults.get("layer_types")
    if isinstance(layer_types, list) and "num_hidden_layers" in kwargs:  # hybrids: keep one attention layer
        first = next((i for i, t in enumerate(layer_types) if "attention" in str(t) and "linear" not in str(t)), 0)
        kwargs["num_hidden_layers"] = max(TINY["num_hidden_layers"], min(first + 1, 8))
    heads, kv_heads = (names.get(n, n) for n in ("num_attention_heads", "num_key_value_heads"))
    if kv_heads in kwargs and not (defaults.get(kv_heads) or 0) < (defaults.get(heads) or 0):
        kwargs[kv_heads] = TINY["num_attention_heads"]  # a model without grouped-query attention by default stays so
    if "qk_rope_head_dim" in defaults and "head_dim" in kwargs:  # MLA: the rotary part is the head dim RoPE sees
        kwargs["head_dim"] = kwargs.get("qk_rope_head_dim", defaults["qk_rope_head_dim"])
    kwargs.update(OVERRIDES.get(model_type, {}))
    try:
        config = cls(**{"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **kwargs})
    except Exception:  # noqa: BLE001  configs that require the ids (both sides ignore EOS: see `check`)
        config = cls(**kwargs)
    return _special_tokens_in_vocabulary(config)


def _special_tokens_in_vocabulary(config):
    for name, value in config.to_dict().items():  # other special tokens must exist in the tiny vocabulary
        if name.endswith(("_token_id", "_token_ids")) and isinstance(value, (int, list)):
            clamped = [min(v, VOCAB - 1) for v in value] if isinstance(value, list) else min(value, VOCAB - 1)
            setattr(config, name, clamped)
    return config


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


def make_checkpoint(model_type: str, path: Path, seed: int = 0) -> torch.nn.Module:
    """A random tiny `model_type` checkpoint at `path` (weights, config, a word-level tokenizer); returns the model."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    with torch.device("meta"):  # a size the shrinker missed must not take the machine's memory
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if params > MAX_PARAMS:
        raise ValueError(f"the tiny config still has {params / 1e6:.0f}M parameters: add its size attributes to llmc/sweep.py's CLAMPED")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    for name in ("eos_token_id", "pad_token_id", "forced_eos_token_id", "forced_bos_token_id"):  # plain greedy (BART forces EOS last)
        setattr(model.generation_config, name, None)
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return model


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def check(model_type: str, workdir: Path) -> Result:
    """Build `model_type` tiny with llmc and compare its greedy tokens with transformers'."""
    import llmc
    from llmc import LLM, SamplingParams
    from llmc.compiler import BUILD_ERRORS
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    if model_type in SKIPPED:
        return Result(model_type, arch, "skipped", SKIPPED[model_type])
    start = time.perf_counter()
    prompts = _prompts()
    try:  # transformers first: a tiny config transformers cannot run is the sweep's fault, reported as such
        model = make_checkpoint(model_type, workdir / "checkpoint")
        with torch.no_grad():
            expected = [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(p):].tolist()
                        for p in prompts]
    except Exception as e:  # noqa: BLE001
        return Result(model_type, arch, "crashed", f"tiny model in transformers: {_first_line(e)}", time.perf_counter() - start)
    try:
        engine = llmc.build(workdir / "checkpoint", workdir / "engine", max_seq_len=64, max_batch_tokens=32, max_num_seqs=4,
                            log=lambda _: None)
    except BUILD_ERRORS as e:
        message = str(e).strip()
        status = "refused" if message and "\n" not in message else "multi-line error"
        return Result(model_type, arch, status, f"{type(e).__name__}: {message}", time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001  a raw exception out of build is what the sweep exists to find
        return Result(model_type, arch, "crashed", f"build: {_first_line(e)}", time.perf_counter() - start)
    try:
        with LLM(engine) as llm:
            got = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))]
    except Exception as e:  # noqa: BLE001
        return Result(model_type, arch, "crashed", f"run: {_first_line(e)}", time.perf_counter() - start)
    seconds = time.perf_counter() - start
    if got != expected:
        same = sum(a == b for a, b in zip(got, expected))
        return Result(model_type, arch, "differs", f"{same}/{len(prompts)} prompts match", seconds)
    return Result(model_type, arch, "matches", "", seconds)


def model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def sweep(types: list[str] | None = None, log=lambda r: None) -> list[Result]:
    results = []
    for model_type in types or model_types():
        workdir = Path(tempfile.mkdtemp(prefix=f"llmc-sweep-{model_type}-"))
        try:
            results.append(check(model_type, workdir))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        log(results[-1])
    return results


def markdown(results: list[Result]) -> str:
    import transformers

    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines = [
        "# Architectures",
        "",
        f"Generated by `python -m llmc.sweep` (transformers {transformers.__version__}, torch {torch.__version__}): every",
        "causal LM of transformers' registry as a tiny random model, built by llmc and compared with",
        f"transformers' `generate` (fp32, greedy, {len(PROMPT_LENGTHS)} prompts x {NEW_TOKENS} tokens). `tests/test_architectures.py`",
        "asserts that each one matches token for token or is refused at build time with a one-line error.",
        "",
        ", ".join(f"{status}: {n}" for status, n in counts.items()) + ". Skipped: models that cannot run alone on text (llmc/sweep.py's",
        "SKIPPED). Crashed \"tiny model in transformers\": the sweep's own gaps, tiny configs transformers cannot run",
        "(TINY_CONFIG_GAPS); any other crash or difference is an llmc bug.",
        "",
        "| model_type | architecture | status | reason |",
        "| --- | --- | --- | --- |",
    ]
    for r in results:
        detail = r.detail.replace("|", "\\|")
        lines.append(f"| {r.model_type} | {r.architecture} | {r.status} | {detail} |")
    return "\n".join(lines) + "\n"


def read_table(path: Path) -> list[Result]:
    """The results a table `markdown` wrote."""
    rows = [line.split(" | ") for line in path.read_text().splitlines() if line.startswith("| ") and not line.startswith(("| model_type", "| ---"))]
    return [Result(t.removeprefix("| "), arch, status, detail.removesuffix(" |").replace("\\|", "|")) for t, arch, status, detail in
            (row[:3] + [" | ".join(row[3:])] for row in rows)]


def main(argv: list[str] | None = None) -> int:
    import transformers

    parser = argparse.ArgumentParser(prog="python -m llmc.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*", help="model types to check (default: every causal LM of transformers)")
    parser.add_argument("--write", type=Path, help="write the table as markdown to this file (e.g. docs/architectures.md); "
                        "with model types, only their rows of the table there change")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    results = sweep(args.model_types or None,
                    log=lambda r: print(f"{r.model_type:28} {r.status:9} {r.seconds:5.1f}s {r.detail}", flush=True))
    if args.write:
        if args.model_types and args.write.is_file():  # update these rows of the existing table
            new = {r.model_type: r for r in results}
            results = [new.pop(r.model_type, r) for r in read_table(args.write)] + list(new.values())
        args.write.write_text(markdown(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
