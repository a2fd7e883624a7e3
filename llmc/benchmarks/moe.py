"""`llmc bench moe`: decode speed of a mixture of experts (a random Mixtral-shaped model: 8 experts, top 2,
hidden 512, 4 layers) for llmc and for Hugging Face transformers, in the same run; prints JSON with the ratios.

The model is made in a temporary directory with a byte-level BPE tokenizer trained on llmc's calibration
corpus (its vocabulary is the model's). The workload and method are `llmc bench latency`'s: greedy, random
32-token prompts, --new-tokens new tokens, EOS ignored, median of --repeats runs after a warm-up.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from llmc.benchmarks.latency import bench_hf, bench_llmc, make_prompts, report, speedups

CALIBRATION_TEXT = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"


def make_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CALIBRATION_TEXT.read_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def make_checkpoint(path: Path, args) -> dict:
    """Save the random Mixtral and its tokenizer at `path`; returns its shape."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    tokenizer = make_tokenizer(args.vocab)
    shape = dict(hidden_size=args.hidden, intermediate_size=args.intermediate or 7 * args.hidden // 2,
                 num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64 or 1,
                 num_key_value_heads=max(args.hidden // 256, 1), num_local_experts=args.experts,
                 num_experts_per_tok=args.top_k, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MixtralConfig(**shape, eos_token_id=tokenizer.eos_token_id,
                                                           bos_token_id=None, pad_token_id=None)).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"type": "mixtral", **shape, "parameters": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="llmc bench moe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, help="each expert's [default: 3.5 x hidden, Mixtral's ratio]")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096, help="the tokenizer's (and model's) vocabulary, at most")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import llmc

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        model = make_checkpoint(checkpoint, args)
        engine = llmc.build(checkpoint, Path(tmp) / "engine", dtype=args.dtype, max_seq_len=512 + args.new_tokens,
                            log=lambda _: None)
        prompts = make_prompts(model["vocab_size"])
        result = {
            "model": model,
            "workload": {"prompt_tokens": 32, "new_tokens": args.new_tokens, "prefill_tokens": 512, "dtype": args.dtype,
                         "threads": torch.get_num_threads()},
            "llmc": bench_llmc(str(engine), prompts, args.new_tokens, args.repeats),
            "hf": bench_hf(str(checkpoint), args.dtype, prompts, args.new_tokens, args.repeats),
        }
    result["speedups"] = {"hf": speedups(result["llmc"], result["hf"])}
    return report(result)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
