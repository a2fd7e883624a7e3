"""Greedy parity with transformers on CUDA for three architectures, through LLM(engine, device="cuda"):
python3 scripts/gpu_parity.py OUT.json. Part of scripts/gpu_check.sh.

fp32: llmc's greedy tokens must be transformers' (the gate). bf16: both sides round differently in every kernel, so
greedy tokens may part after a while: how many leading tokens agree is recorded, not gated. An architecture that
fails to build or run records its error; the exit status says whether every fp32 comparison held.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

ARCHITECTURES = ("llama", "qwen2", "gemma2")  # GQA + RoPE; bias; softcap + sliding window (tests/conftest.py's configs)
PROMPT_LENGTHS = (3, 11, 40)
NEW_TOKENS = 16


def hf_greedy(checkpoint, prompt, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval().to("cuda")
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(prompt):].tolist()


def leading_agreement(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check(arch, folder: Path) -> dict:
    import llmc
    from conftest import VOCAB, make_checkpoint
    from llmc import LLM, SamplingParams

    checkpoint = make_checkpoint(arch, folder / arch)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    result = {}
    for dtype in ("float32", "bfloat16"):
        start = time.perf_counter()
        engine = llmc.build(checkpoint, folder / f"{arch}-{dtype}", dtype=dtype, max_seq_len=96, max_batch_tokens=16,
                            log=lambda _: None)
        with LLM(engine, device="cuda") as llm:
            outputs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
        got = [o.outputs[0].token_ids for o in outputs]
        expected = [hf_greedy(checkpoint, p, getattr(torch, dtype)) for p in prompts]
        agree = [leading_agreement(a, b) for a, b in zip(got, expected)]
        result[dtype] = {"leading_tokens_agreeing": agree, "of": NEW_TOKENS, "seconds": round(time.perf_counter() - start, 1)}
        if dtype == "float32":
            result[dtype]["identical"] = got == expected
    return result


def main(out_path: str) -> int:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHITECTURES:
            try:
                results[arch] = check(arch, Path(tmp))
            except Exception as e:  # recorded, and the next architecture still runs
                results[arch] = {"error": f"{type(e).__name__}: {e}"[:1000], "traceback": traceback.format_exc()[-3000:]}
    Path(out_path).write_text(json.dumps(results, indent=1) + "\n")
    ok = all(r.get("float32", {}).get("identical") for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
