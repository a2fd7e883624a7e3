"""Bad input gets a clear error that names the problem, at build time and at run time."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

import llmc
from llmc import LLM, SamplingParams
from llmc.frontend.checkpoint import CheckpointError

from conftest import make_checkpoint, tokenizer


@pytest.fixture(scope="module")
def llm(checkpoints, tmp_path_factory):
    engine = llmc.build(checkpoints["gpt2"], tmp_path_factory.mktemp("e") / "engine", max_seq_len=32, log=lambda _: None)
    return LLM(engine)


def build(path, tmp_path):
    return llmc.build(path, tmp_path / "engine", max_seq_len=32, log=lambda _: None)


def test_unsupported_architecture(tmp_path):
    from transformers import T5Config

    T5Config(vocab_size=320, d_model=32, num_layers=1, num_heads=2, d_ff=64, architectures=["T5ForConditionalGeneration"]).save_pretrained(tmp_path)
    tokenizer().save_pretrained(tmp_path)
    save_file({}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"T5ForConditionalGeneration.*LlamaForCausalLM"):
        build(tmp_path, tmp_path)


def test_missing_weight(checkpoints, tmp_path):
    ckpt = shutil.copytree(checkpoints["llama"], tmp_path / "ckpt")
    weights = load_file(ckpt / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.* missing"):
        build(ckpt, tmp_path)


def test_corrupt_safetensors(checkpoints, tmp_path):
    ckpt = shutil.copytree(checkpoints["llama"], tmp_path / "ckpt")
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[8:40] = b"\x00garbage-garbage-garbage-garbag"
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt safetensors file .*model\.safetensors"):
        build(ckpt, tmp_path)


def test_no_weights(tmp_path):
    ckpt = make_checkpoint("llama", tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights"):
        build(ckpt, tmp_path)


def test_no_such_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        build(tmp_path / "nothing-here", tmp_path)


def test_max_seq_len_beyond_the_model(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match=r"max_seq_len must be in \[2, 1024\]"):
        llmc.build(checkpoints["gpt2"], tmp_path / "e", max_seq_len=5000, log=lambda _: None)


def test_output_dir_that_is_not_an_engine(checkpoints, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an llmc engine"):
        llmc.build(checkpoints["gpt2"], tmp_path, log=lambda _: None)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_prompt_longer_than_max_seq_len(llm):
    with pytest.raises(ValueError, match=r"prompt has 40 tokens.*at most 32"):
        llm.generate([[1] * 40], SamplingParams(max_tokens=4))


def test_bad_prompt_leaves_no_request_behind(llm):
    with pytest.raises(ValueError):
        llm.generate([[1, 2, 3], [1] * 40], SamplingParams(max_tokens=4))
    assert not llm.engine.schedulers[0].has_unfinished()
    assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids) == 4


def test_generation_stops_at_max_seq_len(llm):
    out = llm.generate([[1] * 30], SamplingParams(max_tokens=10, temperature=0))[0]
    assert len(out.outputs[0].token_ids) == 2 and out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=-5), "max_tokens must be an integer >= 0"),
        (dict(n=0), r"n must be an integer in \[1, 128\]"),
        (dict(n=3, best_of=2), r"best_of must be an integer in \[n, 128\]"),
        (dict(max_tokens=4, min_tokens=5), r"min_tokens must be an integer in \[0, max_tokens\]"),
        (dict(prompt_logprobs=21), r"prompt_logprobs must be an integer in \[0, 20\]"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_k=-3), "top_k must be"),
    ],
)
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_cli_reports_errors_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "llmc.cli", "build", str(tmp_path / "missing"), "-o", str(tmp_path / "e")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: {tmp_path / 'missing'}: no such directory"


def test_hub_id_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=r"'llmc-test/no-such-model' is not a local directory and could not be downloaded"):
        build("llmc-test/no-such-model", tmp_path)


def test_an_encoder_configured_model_is_refused_as_not_a_causal_decoder(tmp_path):
    from llmc import sweep
    from llmc.passes.manager import PassError

    sweep.make_checkpoint("bert", tmp_path / "ckpt")  # BertLMHeadModel with transformers' default is_decoder=False
    with pytest.raises(PassError, match=r'^BertLMHeadModel is not a causal decoder as configured \(is_decoder=False.*"is_decoder": true') as e:
        build(tmp_path / "ckpt", tmp_path)
    assert "\n" not in str(e.value)


def test_a_model_with_recurrent_state_is_refused_before_tracing(tmp_path):
    from llmc import sweep

    sweep.make_checkpoint("mamba", tmp_path / "ckpt")  # its state between steps is not a KV cache: llmc would lose it
    with pytest.raises(CheckpointError, match=r"^MambaForCausalLM has layers that carry a recurrent or convolution state "
                       r"from step to step \(linear_attention\)") as e:
        build(tmp_path / "ckpt", tmp_path)
    assert "\n" not in str(e.value)
