"""The pass manager: order, records, graph dumps, and numerical verification that catches a wrong pass."""

from __future__ import annotations

import functools

import pytest
import torch

import llmc
from llmc.engine import EngineConfig
from llmc.frontend.checkpoint import Checkpoint
from llmc.frontend.export import trace
from llmc.passes import PASSES, PIPELINE, BuildContext, register_pass, run_passes
from llmc.passes.manager import PassError


@pytest.fixture(scope="module")
def lowered(checkpoints):
    """(arch, dtype) -> the graph module and pass records of the whole pipeline, verified: one trace per model and
    dtype for the module's tests, which only read them."""

    @functools.cache
    def lower(arch: str, dtype: str):
        ckpt = Checkpoint(checkpoints[arch])
        ctx = BuildContext(ckpt.config, getattr(torch, dtype), 64, 64, 8)
        gm, records = run_passes(trace(ckpt, getattr(torch, dtype), 64, 8), ctx, PIPELINE, verify=True)
        return gm, {r["pass"]: r for r in records}

    return lambda arch, dtype="float32": lower(arch, dtype)


def test_verify_and_dump_every_stage(checkpoints, tmp_path):
    engine = llmc.build(
        checkpoints["gptj"], tmp_path / "engine", max_seq_len=64, verify_passes=True, dump_graphs=tmp_path / "graphs", log=lambda _: None
    )
    config = EngineConfig.load(engine)
    records = config.passes + config.ranks[0]["passes"]
    assert [r["pass"] for r in records] == list(PIPELINE)
    assert all(r["verify_max_abs_diff"] < 1e-5 for r in records)
    dumps = sorted(p.name for p in (tmp_path / "graphs").iterdir())
    assert dumps == [f"{i:02d}-{name}.txt" for i, name in enumerate(("traced", *PIPELINE))]
    assert "llmc_trace.attention" in (tmp_path / "graphs/00-traced.txt").read_text()
    attention = f"graphs/{PIPELINE.index('attention') + 1:02d}-attention.txt"
    assert "llmc.paged_attention" in (tmp_path / attention).read_text() and "llmc_trace" not in (tmp_path / attention).read_text()


@pytest.mark.parametrize("arch", ["mistral", "gpt2"])
def test_canonicalize_removes_asserts_and_attention_removes_the_mask(arch, lowered):
    gm, records = lowered(arch)
    targets = {str(n.target) for n in gm.graph.nodes}
    assert not any(word in t for t in targets for word in ("_assert", "scaled_dot_product", "cumsum", "dropout"))
    if arch == "mistral":
        attention = records["attention"]
        assert attention["num_layers"] == 2 and attention["num_kv_heads"] == 2 and attention["sliding_window"] == 8
        assert records["canonicalize"]["asserts_removed"] > 0
    else:
        assert records["canonicalize"]["eval_dropouts_removed"] == 5
        linear = records["linear"]
        assert linear["addmms"] == 8 and linear["linears"] == 1  # Conv1D layers and the LM head
    assert not any(t in ("aten.linear.default", "aten.addmm.default") for t in targets)


def test_verification_catches_a_pass_that_changes_numerics(checkpoints):
    @register_pass("test_scale_lm_head")
    def scale_lm_head(gm, ctx):
        gm.get_buffer("lm_head.weight").mul_(1.01)
        return gm, {}

    try:
        ckpt = Checkpoint(checkpoints["llama"])
        ctx = BuildContext(ckpt.config, torch.float32, 64, 64, 8)
        with pytest.raises(PassError, match="test_scale_lm_head.*changed the logits"):
            run_passes(trace(ckpt, torch.float32, 64, 8), ctx, ("canonicalize", "test_scale_lm_head"), verify=True)
    finally:
        del PASSES["test_scale_lm_head"]


@pytest.mark.parametrize("arch, groups, merged", [("llama", 4, 10), ("qwen2", 4, 10), ("gptj", 2, 6), ("gpt_neox", 0, 0)])
def test_merge_linears(arch, groups, merged, lowered):
    """Q/K/V (with or without biases) and gate/up merge; fused checkpoints (GPT-NeoX) have nothing to merge."""
    gm, records = lowered(arch)
    record = records["merge_linears"]
    assert (record["merged_groups"], record["linears_merged"], record["verify_max_abs_diff"]) == (groups, merged, 0.0)
    if arch == "llama":
        names = {n for n, _ in gm.named_buffers()}
        assert "model.layers.0.self_attn.q_proj.weight_merged" in names and "model.layers.0.self_attn.k_proj.weight" not in names


@pytest.mark.parametrize("arch, dtype, count", [("llama", "float32", 5), ("qwen2", "bfloat16", 5), ("mistral", "float16", 5), ("gpt2", "float32", 0)])
def test_fuse_rms_norm(arch, dtype, count, lowered):
    """HF's RMSNorm (with its fp32 upcast in half-precision builds) becomes llmc::rms_norm; LayerNorm models are untouched."""
    record = lowered(arch, dtype)[1]["fuse_rms_norm"]
    assert record["rms_norms"] == count
    assert record["with_residual_add"] == max(count - 1, 0)  # all but the first layer's input norm
    assert record["verify_max_abs_diff"] <= (1e-5 if dtype == "float32" else 5e-2)


@pytest.mark.parametrize("arch, norms, fused", [("gpt2", 5, 5), ("gptj", 3, 2), ("gpt_neox", 5, 2), ("llama", 0, 0)])
def test_fuse_layer_norm(arch, norms, fused, lowered):
    """Residual add + LayerNorm become llmc::add_layer_norm: all of GPT-2's (the first adds the position
    embedding); GPT-J's and GPT-NeoX's but the first layer's (no add before it) and, in NeoX's parallel
    block, the second norm of the same sum."""
    gm, records = lowered(arch)
    record = records["fuse_layer_norm"]
    assert (record["layer_norms"], record["with_residual_add"]) == (norms, fused)
    assert record["verify_max_abs_diff"] <= 1e-5
    assert sum(n.target == torch.ops.llmc.add_layer_norm.default for n in gm.graph.nodes) == fused


def test_fuse_gated_activation(lowered):
    gm, records = lowered("llama")
    record = records["fuse_gated_activation"]
    assert record["gated_activations"] == {"silu": 2} and record["verify_max_abs_diff"] == 0.0
    assert not any(n.target == torch.ops.aten.silu.default for n in gm.graph.nodes)


@pytest.mark.parametrize("arch, form", [("llama", "rotate_half"), ("qwen2", "rotate_half"), ("gpt_neox", "rotate_half"),
                                        ("gptj", "interleaved")])
def test_rotary_embedding_is_fused_then_folded_into_attention(arch, form, lowered):
    """RoPE of queries and keys in both layers becomes llmc::rotary_embedding: rotate-half (GPT-NeoX's
    partial rotary too) and GPT-J's interleaved pairs (partial rotary too); then each layer's pair folds
    into its attention op, which takes cos / sin [T, rotary_dim] and computes exactly what it did."""
    gm, records = lowered(arch)
    fused = records["fuse_rotary_embedding"]
    assert fused["rotary_embeddings"] == {form: 4} and fused["verify_max_abs_diff"] <= 1e-6
    folded = records["fold_rotary_into_attention"]
    assert folded["attentions"] == {form: 2} and folded["verify_max_abs_diff"] == 0.0
    assert not any(n.target in (torch.ops.llmc.rotary_embedding.default, torch.ops.aten.neg.default) for n in gm.graph.nodes)
    attentions = [n for n in gm.graph.nodes if n.target == torch.ops.llmc.paged_attention.default]
    rotary_dim = {"gpt_neox": 8, "gptj": 8}.get(arch, 16)  # conftest: rotary_pct=0.5, rotary_dim=8; head_dim 16
    for n in attentions:
        assert n.kwargs["rotary_interleaved"] == (form == "interleaved")
        assert all("val" in x.meta for x in n.args[:3])  # backends read q's and k's shapes (GPT-J's are new transposes)
        assert [tuple(n.kwargs[t].meta["val"].shape)[1:] for t in ("cos", "sin")] == [(rotary_dim,)] * 2


def test_complex_rotary_becomes_the_interleaved_op(lowered):
    """DeepSeek-V2's RoPE, complex multiplication by polar(1, angle), is the op's interleaved pairing: every
    query and key (4) becomes llmc::rotary_embedding and no complex value is left."""
    gm, records = lowered("deepseek_v2")
    record = records["complex_rotary"]
    assert record["rotary_embeddings"] == 4 and record["verify_max_abs_diff"] <= 1e-6
    ropes = [n for n in gm.graph.nodes if n.target == torch.ops.llmc.rotary_embedding.default]
    assert len(ropes) == 4 and all(n.args[3] is True for n in ropes)
    assert not any(isinstance(v := n.meta.get("val"), torch.Tensor) and v.is_complex() for n in gm.graph.nodes)


def test_other_complex_arithmetic_is_a_build_error(checkpoints, tmp_path, monkeypatch):
    """Turning by the table twice is complex arithmetic the pass does not prove: refused in one line."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2

    original = modeling_deepseek_v2.apply_rotary_emb
    monkeypatch.setattr(modeling_deepseek_v2, "apply_rotary_emb", lambda q, k, table: original(q, k, table * table))
    with pytest.raises(PassError, match=r"^DeepseekV2ForCausalLM: computes with complex numbers \(polar: aten.polar.default\) other than RoPE's") as e:
        llmc.build(checkpoints["deepseek_v2"], tmp_path / "engine", max_seq_len=64, log=lambda _: None)
    assert "\n" not in str(e.value)
