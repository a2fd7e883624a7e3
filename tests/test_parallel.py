"""Tensor and pipeline parallel engines: the same tokens and logprobs as one rank, each rank holding
its share of the weights, real gloo processes, and failures that stop every rank in bounded time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

import llmc
from llmc import LLM, SamplingParams
from llmc.engine import EngineConfig
from llmc.passes.manager import PassError
from llmc.runtime.executor import RankError, free_port

from conftest import make_checkpoint

# Eight query heads and two KV heads, so that tp 4 and 8 replicate KV heads. Qwen2's vocabulary
# (325) does not divide by tp: its last vocab shard is padded.
PARALLEL_CONFIGS = {
    "llama": dict(num_attention_heads=8, num_key_value_heads=2),
    "qwen2": dict(num_attention_heads=8, num_key_value_heads=2, vocab_size=325),
    "gptj": dict(n_head=8, rotary_dim=4),
    "gpt_neox": dict(num_attention_heads=8, num_hidden_layers=3),
    "gpt2": dict(n_head=8),  # one fused QKV projection, split in sections
}
# tp 8 alone is not among them: tp8-pp2 shards and replicates as it does, and tp 2 and 4 cover tp > 1 at pp 1.
MAPPINGS = [(2, 1), (4, 1), (1, 2), (8, 2)]
PROMPTS = [[1, 2, 3], list(range(10, 40)), [5] * 7, list(range(100, 117)), [200, 7, 9, 300, 11]]
PARAMS = SamplingParams(max_tokens=10, temperature=0, logprobs=4)
LOGPROB_ATOL = 1e-4  # fp32; the sums of an all-reduce run in another order (measured: < 1e-6)


@pytest.fixture(scope="module")
def parallel_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    return {arch: make_checkpoint(arch, root / arch, seed=1, **cfg) for arch, cfg in PARALLEL_CONFIGS.items()}


@pytest.fixture(scope="module")
def single_rank_outputs(parallel_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    outputs = {}
    for arch, ckpt in parallel_checkpoints.items():
        with LLM(llmc.build(ckpt, root / arch, max_seq_len=64, log=lambda _: None)) as llm:
            outputs[arch] = llm.generate(PROMPTS, PARAMS)
    return outputs


def assert_same_outputs(expected, got):
    for a, b in zip(expected, got):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        for want, have in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert want.keys() == have.keys()
            assert max(abs(want[t] - have[t]) for t in want) <= LOGPROB_ATOL


@pytest.mark.parametrize("tp,pp", MAPPINGS, ids=[f"tp{tp}-pp{pp}" for tp, pp in MAPPINGS])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gptj", "gpt_neox"])
def test_parallel_engine_matches_single_rank(arch, tp, pp, parallel_checkpoints, single_rank_outputs, tmp_path):
    engine = llmc.build(parallel_checkpoints[arch], tmp_path / "engine", max_seq_len=64, tp=tp, pp=pp, log=lambda _: None)
    config = EngineConfig.load(engine)
    assert config.mapping["tp"] == tp and config.mapping["pp"] == pp and len(config.ranks) == tp * pp
    with LLM(engine, max_num_seqs=3) as llm:  # fewer seqs than prompts: requests join and leave mid-flight
        assert_same_outputs(single_rank_outputs[arch], llm.generate(PROMPTS, PARAMS))


@pytest.mark.parametrize("arch,mapping", [("phi3_longrope", {"tp": 2}), ("gemma2", {"tp": 2}), ("falcon_alibi", {"pp": 2}),
                                          ("falcon_alibi", {"tp": 2})])
def test_parallel_matches_transformers(arch, mapping, tmp_path):
    """Phi-3's fused QKV and gate/up (cut by slices and chunk), Gemma2's (1 + weight) norms left as ops, Falcon's own
    linears (x @ W.T + b) (OLMoE's q/k norms over all heads: tests/test_moe.py)."""
    from transformers import AutoModelForCausalLM

    from test_parity import hf_greedy

    # Falcon's default init gives one token repeated; larger weights make tokens that depend on every layer.
    overrides = {"initializer_range": 0.2} if arch == "falcon_alibi" else {}
    checkpoint = make_checkpoint(arch, tmp_path / "checkpoint", seed=1, **overrides)
    engine = llmc.build(checkpoint, tmp_path / "engine", max_seq_len=64, max_batch_tokens=16, log=lambda _: None, **mapping)
    with LLM(engine) as llm:
        outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0))
    for prompt, out in zip(PROMPTS, outputs):
        reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()  # fresh: Phi-3's RoPE depends on length
        assert out.outputs[0].token_ids == hf_greedy(reference, prompt, 10)


def _phi3_mlp_through(op):
    """Phi-3's MLP with `op` between its fused gate/up projection and the chunk that cuts it into gate and up."""
    def forward(self, x):
        gate, up = op(self, self.gate_up_proj(x)).chunk(2, dim=-1)
        return self.down_proj(up * self.activation_fn(gate))
    return forward


def test_fused_projection_through_a_pointwise_op_shards_by_section(monkeypatch, tmp_path):
    """tanh maps each feature to itself: the sections after it are the projection's (before, it was sharded as one
    block and every token differed at tp 2)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    from test_parity import hf_greedy

    monkeypatch.setattr(Phi3MLP, "forward", _phi3_mlp_through(lambda self, y: torch.tanh(y) * 3))
    checkpoint = make_checkpoint("phi3_longrope", tmp_path / "checkpoint", seed=1)
    engine = llmc.build(checkpoint, tmp_path / "engine", max_seq_len=64, max_batch_tokens=16, tp=2, log=lambda _: None)
    with LLM(engine) as llm:
        outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0))
    for prompt, out in zip(PROMPTS, outputs):
        reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()  # fresh: Phi-3's RoPE depends on length
        assert out.outputs[0].token_ids == hf_greedy(reference, prompt, 10)


def _phi3_mlp_viewed_as_gate_and_up(self, x):
    gate, up = self.gate_up_proj(x).view(*x.shape[:-1], 2, -1).unbind(-2)  # the two halves as a dim of 2 "heads"
    return self.down_proj(up * self.activation_fn(gate))


@pytest.mark.parametrize("forward, op, cut", [
    (_phi3_mlp_through(lambda self, y: y * self.gate_up_proj.weight[:, 0]), "aten.mul.Tensor", "aten.(chunk|split)"),
    (_phi3_mlp_viewed_as_gate_and_up, "aten.view.default", "aten.unbind.int"),
], ids=["per-feature scale", "view into halves"])
def test_fused_projection_through_an_op_llmc_cannot_follow_is_refused(forward, op, cut, monkeypatch, tmp_path):
    """An op before the cut that the pass cannot prove maps each feature to itself, or a view into groups of features
    that are cut apart: the pass refuses instead of guessing the layout."""
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    monkeypatch.setattr(Phi3MLP, "forward", forward)
    checkpoint = make_checkpoint("phi3_longrope", tmp_path / "checkpoint", seed=1)
    with pytest.raises(PassError, match=rf"Phi3ForCausalLM's .*gate_up_proj.weight output goes through .*{op}.* "
                                        rf"before .*{cut}.* cuts its features, .*build with --tp 1$"):
        llmc.build(checkpoint, tmp_path / "engine", max_seq_len=64, tp=2, log=lambda _: None)
    llmc.build(checkpoint, tmp_path / "tp1", max_seq_len=64, log=lambda _: None)  # --tp 1 builds


def test_attention_gate_viewed_into_heads_shards_by_heads(tmp_path):
    """HRM-Text's sigmoid gate of the attention's output: a projection viewed into heads that no attention reads,
    sharded by whole heads as the attention it multiplies."""
    from llmc import sweep

    model = sweep.make_checkpoint("hrm_text", tmp_path / "checkpoint")
    engine = llmc.build(tmp_path / "checkpoint", tmp_path / "engine", max_seq_len=64, max_batch_tokens=16, tp=2,
                        log=lambda _: None)
    with LLM(engine) as llm:
        outputs = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=8, temperature=0))
    for prompt, out in zip(PROMPTS, outputs):
        with torch.no_grad():
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):]
        assert out.outputs[0].token_ids == expected.tolist()


def test_gpt2_fused_qkv_shards_by_section(parallel_checkpoints, single_rank_outputs, tmp_path):
    engine = llmc.build(parallel_checkpoints["gpt2"], tmp_path / "engine", max_seq_len=64, tp=4, pp=2, log=lambda _: None)
    with LLM(engine) as llm:
        assert_same_outputs(single_rank_outputs["gpt2"], llm.generate(PROMPTS, PARAMS))


def _parameters(path) -> dict[str, int]:
    with safe_open(path, "pt") as f:
        return {name: f.get_slice(name).get_shape() for name in f.keys()}


def test_each_rank_holds_its_share_of_the_weights(parallel_checkpoints, tmp_path):
    ckpt = parallel_checkpoints["gpt_neox"]  # untied, kv heads not replicated: every matrix divides
    whole = llmc.build(ckpt, tmp_path / "whole", max_seq_len=64, log=lambda _: None)
    total = sum(torch.Size(s).numel() for s in _parameters(whole / "rank0/weights.safetensors").values())
    tp, pp = 4, 3
    engine = llmc.build(ckpt, tmp_path / "sharded", max_seq_len=64, tp=tp, pp=pp, log=lambda _: None)
    per_rank = []
    for rank in range(tp * pp):
        shapes = _parameters(engine / f"rank{rank}/weights.safetensors")
        matrices = sum(torch.Size(s).numel() for s in shapes.values() if len(s) == 2)
        # Replicated: norm weights and the biases added after an all-reduce (vectors; 5% of this tiny model).
        vectors = sum(torch.Size(s).numel() for s in shapes.values() if len(s) == 1)
        per_rank.append(matrices)
        assert vectors < 0.1 * total / (tp * pp)
    # Every matrix is split tp ways and lives on one stage; the stages are balanced by parameters.
    assert sum(per_rank) <= total
    assert max(per_rank) <= 1.4 * total / (tp * pp), per_rank


def test_tp_that_does_not_divide_the_heads_names_the_values_that_do(parallel_checkpoints, tmp_path):
    """Checked against the checkpoint's config before tracing (the passes check the graph itself again)."""
    with pytest.raises(ValueError, match=r"tp=3 does not divide the model's 8 attention heads.*tp can be 1, 2, 4, 8"):
        llmc.build(parallel_checkpoints["llama"], tmp_path / "e", max_seq_len=64, tp=3, log=lambda _: None)
    with pytest.raises(ValueError, match=r"pp=5 exceeds the model's 2 layers"):
        llmc.build(parallel_checkpoints["llama"], tmp_path / "e", max_seq_len=64, pp=5, log=lambda _: None)
    with pytest.raises(ValueError, match=r"pp_layers \[3, 0\] must give each of the 2 stages"):
        llmc.build(parallel_checkpoints["llama"], tmp_path / "e", max_seq_len=64, pp=2, pp_layers=[3, 0], log=lambda _: None)


@pytest.fixture(scope="module")
def tp2_pp2_engine(parallel_checkpoints, tmp_path_factory):
    return llmc.build(parallel_checkpoints["gpt_neox"], tmp_path_factory.mktemp("e") / "tp2pp2", max_seq_len=64, tp=2, pp=2,
                      log=lambda _: None)


def test_ranks_started_by_torchrun_on_two_nodes(tp2_pp2_engine):
    """Two torchrun agents (two "machines" on loopback), two ranks each; rank 0 runs `llmc generate`."""
    port = free_port()
    prompts = ["def fib(n):", "class A:\n    pass"]

    def agent(node_rank):
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node_rank),
             "--rdzv-backend", "static", "--master-addr", "127.0.0.1", "--master-port", str(port),
             "-m", "llmc.cli", "generate", str(tp2_pp2_engine), "--max-tokens", "8", "--json", "-p", prompts[0], "-p", prompts[1]],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    nodes = [agent(0), agent(1)]
    outs = [p.communicate(timeout=180) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    got = [json.loads(line)["token_ids"] for line in outs[0][0].splitlines() if line.startswith("{")]
    with LLM(tp2_pp2_engine) as llm:
        assert got == [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0))]


def _gone(pid: int) -> bool:
    """Exited (a zombie left to a parent that is itself gone counts: it runs nothing)."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_failed_rank_stops_every_rank_with_an_error(fault, tp2_pp2_engine):
    timeout = 4.0
    llm = LLM(tp2_pp2_engine, rank_timeout=timeout)
    pids = [p.pid for p in llm.engine.executor.procs]
    stream = llm.stream(list(range(10, 20)), SamplingParams(max_tokens=50, temperature=0))
    next(stream)
    victim = pids[3]  # the last stage's second tensor-parallel rank
    os.kill(victim, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    start = time.monotonic()
    named = f"rank 3 \\(pid {victim}\\) was killed by SIGKILL" if fault == "kill" else f"rank 3 \\(pid {victim}, stopped: SIGSTOP\\?\\) did not finish a step"
    with pytest.raises(RankError, match=named):
        for _ in stream:
            pass
    assert time.monotonic() - start < timeout + 10
    assert all(_gone(pid) for pid in pids)
    with pytest.raises(RankError, match="ranks were stopped"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                ppid = int(open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(stat))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def test_llmc_serve_starts_and_stops_the_ranks(tp2_pp2_engine):
    import httpx

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "llmc.cli", "serve", str(tp2_pp2_engine), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        ranks = _descendants(server.pid)
        assert len(ranks) >= 5  # the forkserver and the four ranks
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                       json={"prompt": "def fib(n):", "max_tokens": 8, "temperature": 0}, timeout=60)
        assert r.status_code == 200
        with LLM(tp2_pp2_engine) as llm:
            assert r.json()["choices"][0]["text"] == llm.generate("def fib(n):", SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text
    finally:
        server.terminate()
        server.wait(timeout=30)
    deadline = time.monotonic() + 10
    while any(not _gone(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [pid for pid in ranks if not _gone(pid)] == []


def test_verify_passes_checks_each_ranks_merges(parallel_checkpoints, tmp_path):
    engine = llmc.build(parallel_checkpoints["llama"], tmp_path / "e", max_seq_len=64, tp=2, pp=2, verify_passes=True,
                        log=lambda _: None)
    for rank in EngineConfig.load(engine).ranks:
        merge = next(r for r in rank["passes"] if r["pass"] == "merge_linears")
        assert merge["linears_merged"] > 0 and merge["verify_max_abs_diff"] < 1e-5
        assert all("verify_max_abs_diff" not in r for r in rank["passes"] if r["pass"] in ("pipeline_parallel", "tensor_parallel"))


def test_bad_pp_layers_and_a_torchrun_of_the_wrong_size_are_clear_errors(tp2_pp2_engine, monkeypatch):
    from click.testing import CliRunner

    from llmc.cli import main
    from llmc.runtime.worker import join_torchrun

    result = CliRunner().invoke(main, ["build", "any-model", "-o", "x", "--pp", "2", "--pp-layers", "3,a"])
    assert result.exit_code == 2 and "'3,a' is not a comma-separated list of layer counts" in result.output
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"the engine has 4 ranks \(tp=2, pp=2\) but torchrun started 3"):
        join_torchrun(EngineConfig.load(tp2_pp2_engine), timeout=5)
