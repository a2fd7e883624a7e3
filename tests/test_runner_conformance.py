"""Every backend implements the backend contract (llmc/backends/base.py), and every runner that runs here keeps the
step contract: opened as the runtime opens it (llmc.open_runner), the same step inputs give transformers' logits.

TensorRT engines build here (tensorrt_rtx builds without a GPU) but run only on an NVIDIA GPU, and llmc has no
TensorRT runner yet: its case asserts the clear error a user gets instead of a runner.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import step_inputs
from transformers import AutoModelForCausalLM

import llmc
from llmc.backends import BACKENDS
from llmc.backends.base import Backend, Runner, first_token_step
from llmc.engine import EngineConfig, EngineError
from llmc.open_runner import open_runner
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.sequence import Sequence
from llmc.runtime.step_inputs import prepare_inputs

MAX_SEQ_LEN = 64  # one cache block a sequence in every engine (block_size = max_seq_len), so the inputs are the same
NUM_BLOCKS = 4
# fp32 logits of these tiny models are O(1); every backend's stay within this of transformers' (torch and ONNX
# Runtime sum in other orders)
ATOL = 1e-4
PROMPTS = ([3, 1, 4, 1, 5], list(range(20, 31)), list(range(40, 53)))
quiet = dict(log=lambda _: None)


def _protocol_members(protocol) -> dict:
    return {name: inspect.signature(getattr(protocol, name)) for name in protocol.__dict__
            if callable(getattr(protocol, name)) and not name.startswith("_")}


def _assert_implements(obj, protocol, name: str) -> None:
    """isinstance (the members exist), and each member takes the protocol's parameters, by name and in order."""
    assert isinstance(obj, protocol), name
    for member, signature in _protocol_members(protocol).items():
        want = [p.name for p in signature.parameters.values()][1:]  # without self
        got = [p.name for p in inspect.signature(getattr(obj, member)).parameters.values()]
        assert got == want, f"{name}.{member}"


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_backend_implements_the_protocol(name):
    _assert_implements(BACKENDS[name], Backend, name)


def test_first_token_step_is_the_runtimes_step_for_one_token():
    """The step a backend probes a runner with, without the runtime, is the one the runtime makes."""
    seq = Sequence([0], SamplingParams())
    seq.block_table = [0]
    want, _ = prepare_inputs([(seq, 1)], MAX_SEQ_LEN)
    got = first_token_step()
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and (got[key] == want[key]).all(), key


@pytest.fixture(scope="module")
def llama(checkpoints):
    return checkpoints["llama"]


@pytest.fixture(scope="module")
def expected_logits(llama):
    """transformers' logits of each prompt followed by the tokens step_inputs makes up (7 + length), at every position."""
    model = AutoModelForCausalLM.from_pretrained(llama).eval()
    with torch.no_grad():
        return [model(torch.tensor([_tokens(p)])).logits[0] for p in PROMPTS]


def _tokens(prompt: list[int]) -> list[int]:
    tokens = list(prompt)
    for _ in range(2):
        tokens.append(7 + len(tokens))
    return tokens


def _steps():
    """A prefill of two prompts; their decodes beside the first chunk of a third prompt; then all three decode."""
    a, b, c = (Sequence(list(p), SamplingParams()) for p in PROMPTS)
    for row, seq in enumerate((a, b, c)):
        seq.block_table = [row]
    plans = [[(a, 5), (b, 11)], [(a, 1), (b, 1), (c, 6)], [(b, 1), (c, 7), (a, 1)]]
    # the logits rows each step returns: (prompt, position), in the order of the step's sampled sequences
    rows = [[(0, 4), (1, 10)], [(0, 5), (1, 11)], [(1, 12), (2, 12), (0, 6)]]
    return zip(step_inputs(plans, MAX_SEQ_LEN), rows)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_runner_gives_transformers_logits_on_the_same_steps(backend, llama, expected_logits, tmp_path):
    engine = llmc.build(llama, tmp_path / backend, backend=backend, max_seq_len=MAX_SEQ_LEN, block_size=MAX_SEQ_LEN, **quiet)
    runner = open_runner(engine, EngineConfig.load(engine), 0, NUM_BLOCKS, "cpu")
    _assert_implements(runner, Runner, type(runner).__name__)
    for inputs, rows in _steps():
        [logits] = runner.run(inputs)
        want = torch.stack([expected_logits[prompt][position] for prompt, position in rows])
        assert logits.shape == (1, len(rows), want.shape[-1])
        assert (logits[0].float() - want).abs().max().item() <= ATOL


def test_tensorrt_runner_is_a_clear_error(llama, tmp_path):
    """Not skipped: where TensorRT cannot run a step, opening the runner says why, and what to run instead."""
    engine = llmc.build(llama, tmp_path / "trt", backend="tensorrt", max_seq_len=MAX_SEQ_LEN, **quiet)
    why = "runs only on an NVIDIA GPU, and this machine has none" if not torch.cuda.is_available() else \
        "has no TensorRT step runner yet"
    with pytest.raises(EngineError, match=why):
        open_runner(engine, EngineConfig.load(engine), 0, NUM_BLOCKS, "cpu")
