"""Train the example model that ships with llmc: a small Llama on CPython's standard library.

It is an ordinary Hugging Face checkpoint (config.json, model.safetensors, tokenizer files), so it
goes through exactly the path a downloaded model would. Everything it needs is on any machine that
has Python: the training text is the interpreter's own `Lib/` sources.

    python examples/train_example_model.py --out examples/stdlib-llama --minutes 95 --threads 1

The shipped checkpoint was made with the command above (see examples/stdlib-llama/TRAINING.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def stdlib_files() -> list[Path]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test"}
    return sorted(p for p in lib.rglob("*.py") if not skip & set(p.relative_to(lib).parts))


def is_heldout(path: Path) -> bool:
    """One file in 25, chosen by a stable hash of its name, is kept out of training for evaluation."""
    return int(hashlib.sha1(path.name.encode()).hexdigest(), 16) % 25 == 0


def read_texts(files: list[Path]) -> list[str]:
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, model_max_length=1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "stdlib-llama")
    ap.add_argument("--minutes", type=float, default=90.0, help="wall-clock training budget")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    files = stdlib_files()
    train_files = [f for f in files if not is_heldout(f)]
    heldout_files = [f for f in files if is_heldout(f)]
    train_texts = read_texts(train_files)
    print(f"{len(train_files)} training files, {len(heldout_files)} held out", flush=True)

    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    tokenizer.save_pretrained(args.out)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for text in train_texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(eos_id)
    data = torch.tensor(ids, dtype=torch.long)
    print(f"{len(data)} training tokens", flush=True)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.minutes * 60
    warmup = 200
    start = time.time()
    step = 0
    smoothed = None
    while (elapsed := time.time() - start) < budget:
        # Cosine schedule over the wall-clock budget, so the run ends annealed whatever the speed.
        frac = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch_size,))
        batch = torch.stack([data[s : s + args.seq_len + 1] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss  # HF shifts the labels
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        step += 1
        if step % 50 == 0:
            tok_s = step * args.batch_size * args.seq_len / (time.time() - start)
            print(f"step {step} loss {smoothed:.3f} lr {lr:.2e} {tok_s:.0f} tok/s {elapsed / 60:.1f} min", flush=True)
        if step % 1000 == 0:
            model.save_pretrained(args.out)

    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    # Shipped in bf16: half the bytes, and llmc builds it in fp32 (or bf16) all the same.
    model.to(getattr(torch, args.save_dtype)).save_pretrained(args.out)
    tokens_seen = step * args.batch_size * args.seq_len
    (args.out / "training.json").write_text(
        json.dumps(
            {
                "steps": step,
                "tokens_seen": tokens_seen,
                "train_tokens": len(data),
                "final_loss": smoothed,
                "minutes": (time.time() - start) / 60,
                "threads": args.threads,
                "parameters": n_params,
                "torch": torch.__version__,
                "args": {k: str(v) for k, v in vars(args).items()},
            },
            indent=2,
        )
    )
    print(f"done: {step} steps, {tokens_seen} tokens, loss {smoothed:.3f}", flush=True)


if __name__ == "__main__":
    main()
