"""Run by onnxruntime-genai's own interpreter (its virtualenv): the latency workload of
benchmarks/latency.py on an ORT-genai model. Prompts come as JSON on stdin; prints JSON."""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

sys.path.append(str(Path(__file__).resolve().parent.parent))  # last: benchmarks/triton.py must not shadow the triton package
from latency import median_seconds  # noqa: E402  (the same timing as llmc's side of the run)

model_dir, new_tokens, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
prompts = json.loads(sys.stdin.read())
model = og.Model(model_dir)


def run(batch, n):
    params = og.GeneratorParams(model)
    length = len(batch[0]) + n
    params.set_search_options(max_length=length, min_length=length, do_sample=False, batch_size=len(batch))
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(batch, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()


print(json.dumps({
    "batch1_tokens_per_s": new_tokens / median_seconds(lambda: run(prompts["one"], new_tokens), repeats),
    "batch8_tokens_per_s": 8 * new_tokens / median_seconds(lambda: run(prompts["eight"], new_tokens), repeats),
    "prefill_512_ms": 1000 * median_seconds(lambda: run(prompts["long"], 1), repeats),
}))
