"""llmc::paged_attention's attention features (ALiBi, soft-capping, sinks, K/V head dims) against transformers-style
eager attention over each sequence's whole context (llmc_trace::attention, the frontend's definition of them),
for the reference and the C++ kernel, on chunked, ragged steps; and what the attention pass refuses."""

from __future__ import annotations

import pytest
import torch

import llmc
from llmc.frontend.attention_interface import attention as eager
from llmc.frontend.checkpoint import CheckpointError
from llmc.passes.manager import PassError
from llmc.plugins import cpu_kernels
from llmc.plugins.attention import paged_attention as reference

from conftest import make_checkpoint

BLOCK, HEADS, KV_HEADS, DK = 4, 4, 2, 8
SCALE = 0.3
FEATURES = {
    "softcap": dict(softcap=0.5),
    "alibi": dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625])),
    "sinks": dict(sinks=torch.tensor([0.0, 1.0, -1.0, 2.0])),
    "v-head-dim": dict(dv=5),
    "k-head-dim": dict(dv=11),
    "all-windowed": dict(softcap=0.5, alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]),
                         sinks=torch.tensor([0.0, 1.0, -1.0, 2.0]), dv=5, window=5),
}


def kernel(*args, **kwargs):
    assert cpu_kernels.has_kernel(torch.ops.llmc.paged_attention.default), "no C++ kernel for this CPU"
    return torch.ops.llmc.paged_attention(*args, **kwargs)


def dense(q, k, v, window, softcap=0.0, alibi_slopes=None, sinks=None):
    """q, k, v: [heads, n, d] of one whole sequence, through the eager definition with an explicit mask."""
    n = q.shape[1]
    pos = torch.arange(n)
    allowed = pos[None, :] <= pos[:, None]
    if window:
        allowed &= pos[None, :] > pos[:, None] - window
    mask = allowed[None, None]
    if alibi_slopes is not None:  # what ALiBi models add to the mask
        bias = alibi_slopes.view(1, -1, 1, 1) * (pos[None, :] - pos[:, None])
        mask = bias.masked_fill(~allowed, float("-inf"))
    return eager(q[None], k[None], v[None], mask, SCALE, softcap, sinks)[0]


@pytest.mark.parametrize("impl", [reference, kernel], ids=["reference", "cpu-kernel"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_features_on_chunked_ragged_steps_equal_eager_attention(feature, dtype, tol, impl):
    options = dict(FEATURES[feature])
    dv, window = options.pop("dv", DK), options.pop("window", 0)
    g = torch.Generator().manual_seed(0)
    lengths = [20, 6]
    qs = [torch.randn(HEADS, n, DK, generator=g).to(dtype) for n in lengths]
    ks = [torch.randn(KV_HEADS, n, DK, generator=g).to(dtype) for n in lengths]
    vs = [torch.randn(KV_HEADS, n, dv, generator=g).to(dtype) for n in lengths]
    cache = torch.zeros(2, 2, 12, BLOCK, KV_HEADS, max(DK, dv), dtype=dtype)  # two layers; use layer 1
    tables = [[7, 2, 9, 10, 11], [4, 0]]  # blocks in no particular order
    block_tables = torch.tensor([tables[0], tables[1] + [0, 0, 0]], dtype=torch.int32)
    out = [torch.empty(HEADS, n, dv, dtype=dtype) for n in lengths]
    # A mostly-prefill step (the kernel's ATen way), then a mixed one (its per-token loop).
    for chunk in ((0, 18, 0, 1), (18, 20, 1, 6)):
        spans = [(chunk[0], chunk[1]), (chunk[2], chunk[3])]
        q, k, v = (torch.cat([x[i][:, a:b] for i, (a, b) in enumerate(spans)], dim=1)[None] for x in (qs, ks, vs))
        slots = [tables[i][p // BLOCK] * BLOCK + p % BLOCK for i, (a, b) in enumerate(spans) for p in range(a, b)]
        starts = [0, spans[0][1] - spans[0][0], sum(b - a for a, b in spans)]
        result = impl(
            q, k, v, cache, 1, torch.tensor(slots), block_tables, torch.tensor([b for _, b in spans], dtype=torch.int32),
            torch.tensor(starts, dtype=torch.int32), SCALE, window, **options,
        )
        assert result.shape == (1, HEADS, len(slots), dv)
        for i, (a, b) in enumerate(spans):
            out[i][:, a:b] = result[0, :, starts[i] : starts[i + 1]]
    assert cache[0].abs().sum() == 0  # other layers untouched
    for i in range(2):
        expected = dense(qs[i].float(), ks[i].float(), vs[i].float(), window, **options)
        torch.testing.assert_close(out[i].float(), expected, rtol=tol, atol=tol)


def test_kernel_rejects_malformed_features():
    q, k, v = torch.randn(1, HEADS, 2, DK), torch.randn(1, KV_HEADS, 2, DK), torch.randn(1, KV_HEADS, 2, DK)
    cache = torch.zeros(1, 2, 2, BLOCK, KV_HEADS, DK)
    args = (q, k, v, cache, 0, torch.tensor([0, 1]), torch.tensor([[0]], dtype=torch.int32), torch.tensor([2], dtype=torch.int32),
            torch.tensor([0, 2], dtype=torch.int32), SCALE, 0)
    with pytest.raises(RuntimeError, match="alibi_slopes must hold one float per query head"):
        kernel(*args, alibi_slopes=torch.ones(3))
    with pytest.raises(RuntimeError, match="softcap must be finite"):
        kernel(*args, softcap=-1.0)
    with pytest.raises(RuntimeError, match="k's head dim must be q's"):
        kernel(q, k[..., :4], *args[2:])


def test_a_model_attention_mask_llmc_cannot_prove_is_a_build_error(tmp_path, monkeypatch):
    """A mask transformers did not make (here: its causal mask with a bias on the first key) fails the build, naming it."""
    import transformers.models.llama.modeling_llama as llama

    checkpoint = make_checkpoint("llama", tmp_path / "checkpoint")
    forward = llama.LlamaAttention.forward

    def edited_mask(self, hidden_states, position_embeddings, attention_mask, **kwargs):
        bias = torch.zeros(attention_mask.shape, device=attention_mask.device).masked_fill(~attention_mask, float("-inf"))
        first_key = torch.arange(attention_mask.shape[-1], device=attention_mask.device) == 0
        return forward(self, hidden_states, position_embeddings, bias + 0.5 * first_key, **kwargs)

    monkeypatch.setattr(llama.LlamaAttention, "forward", edited_mask)
    with pytest.raises(PassError, match=r"LlamaForCausalLM: the attention mask of layer 0 is not transformers' causal mask"):
        llmc.build(checkpoint, tmp_path / "engine", max_seq_len=32, log=lambda _: None)


@pytest.mark.parametrize("max_seq_len", [32, 33])
def test_a_chunked_mask_is_causal_only_where_no_sequence_outgrows_a_chunk(max_seq_len, tmp_path, monkeypatch):
    """A chunked mask (Llama 4 style) with chunks of 32 tokens: causal for every position of an engine of 32 tokens a
    sequence (it builds), neither causal nor a sliding window beyond (refused in one line)."""
    from transformers import masking_utils
    from transformers.models.llama import modeling_llama

    checkpoint = make_checkpoint("llama", tmp_path / "checkpoint")

    def chunked(config, inputs_embeds, attention_mask, cache=None, position_ids=None, **kwargs):
        config.attention_chunk_size = 32
        return masking_utils.create_chunked_causal_mask(config, inputs_embeds, attention_mask, cache, position_ids)

    monkeypatch.setattr(modeling_llama, "create_causal_mask", chunked)
    if max_seq_len == 32:
        llmc.build(checkpoint, tmp_path / "engine", max_seq_len=max_seq_len, log=lambda _: None)
        return
    with pytest.raises(CheckpointError, match=r"^llama: chunked attention \(chunks of 32 tokens\), which llmc's attention "
                                              r"does not implement; with max_seq_len <= 32 it is causal attention and builds$"):
        llmc.build(checkpoint, tmp_path / "engine", max_seq_len=max_seq_len, log=lambda _: None)


def test_attention_in_the_model_own_code_is_a_clear_build_error(tmp_path, monkeypatch):
    """Attention that bypasses transformers' interface (here: Llama's eager code, whatever is asked) is refused."""
    from transformers.models.llama import modeling_llama

    checkpoint = make_checkpoint("llama", tmp_path / "checkpoint")
    monkeypatch.setattr(modeling_llama.ALL_ATTENTION_FUNCTIONS, "get_interface", lambda *_: modeling_llama.eager_attention_forward)
    with pytest.raises(PassError, match="LlamaForCausalLM: none of its 2 layers computes attention through transformers' "
                                        "attention interface"):
        llmc.build(checkpoint, tmp_path / "engine", max_seq_len=32, log=lambda _: None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_with_every_feature(dtype):
    """torch.library.opcheck with the new arguments: schema, fake tensors (V's head dim out), AOT dispatch."""
    i32 = dict(dtype=torch.int32)
    args = (torch.randn(1, 4, 3, 8).to(dtype), torch.randn(1, 2, 3, 8).to(dtype), torch.randn(1, 2, 3, 5).to(dtype),
            torch.randn(2, 2, 6, 4, 2, 8).to(dtype), 1, torch.tensor([5, 6, 20]), torch.tensor([[1, 0], [5, 2]], **i32),
            torch.tensor([7, 1], **i32), torch.tensor([0, 2, 3], **i32), 0.3, 4)
    kwargs = dict(alibi_slopes=torch.rand(4), softcap=2.0, sinks=torch.randn(4))
    torch.library.opcheck(torch.ops.llmc.paged_attention.default, args, kwargs)


@pytest.mark.parametrize("arch", ["falcon_alibi", "bloom"])
def test_alibi_slopes_follow_their_heads_at_tp2(arch, checkpoints, tmp_path):
    """Each rank keeps the slopes of its own query heads: tp 2 gives the single-rank engine's tokens."""
    from llmc import LLM, SamplingParams

    prompts = [[1, 2, 3], list(range(10, 40)), [5] * 7]
    params = SamplingParams(max_tokens=8, temperature=0)
    outputs = []
    for tp in (1, 2):
        with LLM(llmc.build(checkpoints[arch], tmp_path / f"tp{tp}", max_seq_len=64, tp=tp, log=lambda _: None)) as llm:
            outputs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
    assert outputs[0] == outputs[1]
