"""Real clients against a real `llmc serve` (a subprocess on loopback) of the shipped example model:
the official openai client, and lm-evaluation-harness's `local-completions` model, whose scores must
equal its `hf` model's on the same checkpoint (loglikelihoods to 1e-4 in fp32, greedy generations identical)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from test_server import CHAT_TEMPLATE, free_port, wait_until_healthy

MODEL = Path(__file__).resolve().parent.parent / "examples" / "stdlib-llama"
TASKS = Path(__file__).resolve().parent / "data" / "lm_eval"
PROMPTS = ["def read_config(path):\n", "import os\nimport sys\n\n"]
LOGLIKELIHOOD_TOLERANCE = 1e-4  # fp32 both sides; the kernels sum in another order than transformers' matmuls


@pytest.fixture(scope="module")
def url(example_engine, tmp_path_factory):
    """`llmc serve` of the example model, with a chat template (it ships none)."""
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llmc.cli", "serve", str(example_engine), "--port", str(port),
                             "--chat-template", str(template)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, timeout=120)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference():
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(MODEL)


def hf_greedy(reference, prompt: str, max_new_tokens: int) -> str:
    model, tok = reference
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return tok.decode(out[0, ids.shape[1]:])


def test_openai_client_completions_chat_streaming_n(client, reference):
    model = client.models.list().data[0].id
    want = hf_greedy(reference, PROMPTS[0], 24)
    out = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=24, temperature=0, n=2)
    assert [c.text for c in out.choices] == [want, want] and out.usage.completion_tokens == 48
    streamed = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want

    messages = [{"role": "user", "content": "def fib(n):"}]
    chat_prompt = reference[1].apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True)
    want = hf_greedy(reference, chat_prompt, 16)
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0, n=2)
    assert [c.message.content for c in chat.choices] == [want, want]
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want


def lm_eval_run(model: str, model_args: dict, monkeypatch) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(TASKS)  # the task yamls name their jsonl relative to here
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=["llmc_stdlib_choice", "llmc_stdlib_complete"],
        task_manager=TaskManager(include_path=str(TASKS)), batch_size=1, log_samples=True, random_seed=0,
    )


@pytest.mark.slow
def test_lm_eval_harness_scores_equal_its_hf_model(url, client, monkeypatch):
    model = client.models.list().data[0].id
    served = lm_eval_run("local-completions", {
        "base_url": url + "/v1/completions", "model": model, "tokenizer": str(MODEL), "tokenizer_backend": "huggingface",
        "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1,
    }, monkeypatch)
    hf = lm_eval_run("hf", {"pretrained": str(MODEL), "dtype": "float32", "device": "cpu"}, monkeypatch)

    def responses(run, task):
        return [s["resps"] for s in sorted(run["samples"][task], key=lambda s: s["doc_id"])]

    # loglikelihood: one (logprob, is_greedy) per choice of each question
    ours, theirs = responses(served, "llmc_stdlib_choice"), responses(hf, "llmc_stdlib_choice")
    assert len(ours) == len(theirs) == 6
    for a, b in zip(ours, theirs):
        assert [x[0][0] for x in a] == pytest.approx([x[0][0] for x in b], abs=LOGLIKELIHOOD_TOLERANCE)
        assert [x[0][1] for x in a] == [x[0][1] for x in b]
    assert served["results"]["llmc_stdlib_choice"]["acc,none"] == hf["results"]["llmc_stdlib_choice"]["acc,none"]
    # generate_until: greedy generations identical
    ours, theirs = responses(served, "llmc_stdlib_complete"), responses(hf, "llmc_stdlib_complete")
    assert len(ours) == 4 and ours == theirs and any(r[0][0] for r in ours)
    assert served["results"]["llmc_stdlib_complete"] == hf["results"]["llmc_stdlib_complete"]
