"""Mixtures of experts: llmc::moe's kernel against its reference, checkpoints in either expert layout, and
expert parallelism (--ep) matching transformers with real gloo processes. Parity at one rank is in
test_parity.py (MoE architectures are in conftest's tiny configs)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import llmc
from llmc import LLM, SamplingParams
from llmc.engine import EngineConfig
from llmc.frontend.checkpoint import CheckpointError
from llmc.frontend.experts import ExpertsError
from llmc.passes.manager import PassError
from llmc.plugins import cpu_kernels
from llmc.plugins.linear import prepack_linears
from llmc.plugins.moe import moe, prepack_experts, prepacked_moe

from conftest import VOCAB, make_checkpoint, tokenizer
from test_parity import hf_greedy

MOE = torch.ops.llmc.moe.default
PREPACKED_MOE = torch.ops.llmc.prepacked_moe.default
PROMPTS = [[1, 2, 3], list(range(10, 40)), [5] * 7, list(range(100, 117))]
NEW_TOKENS = 12


def random_moe_inputs(dtype, tokens=9, experts=4, hidden=16, intermediate=12, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(tokens, hidden, generator=g).to(dtype),
        torch.randint(0, 2 * experts, (tokens, k), generator=g),  # half the ids are another rank's experts
        torch.rand(tokens, k, generator=g),
        torch.randn(experts, 2 * intermediate, hidden, generator=g).to(dtype),
        torch.randn(experts, hidden, intermediate, generator=g).to(dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_kernel_equals_reference(dtype, act):
    assert cpu_kernels.has_kernel(MOE)
    x, ids, w, gate_up, down = random_moe_inputs(dtype)
    for first_expert in (0, 4):
        assert torch.equal(MOE(x, ids, w, gate_up, down, act, first_expert), moe(x, ids, w, gate_up, down, act, first_expert))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_reference_with_biases_and_clamped_swiglu(dtype):
    x, ids, w, gate_up, down = random_moe_inputs(dtype)
    g = torch.Generator().manual_seed(1)
    gate_up_bias, down_bias = torch.randn(4, 24, generator=g).to(dtype), torch.randn(4, 16, generator=g).to(dtype)
    for act in ("silu", "clamped_swiglu"):
        args = (x, ids, w, gate_up, down, act, 4, gate_up_bias, down_bias, 1.702, 2.0)
        assert torch.equal(MOE(*args), moe(*args))


def test_clamped_swiglu_is_gpt_oss_experts():
    """llmc::moe over GPT-OSS's weights rearranged as the frontend does equals transformers' own experts."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from llmc.frontend.experts import _concatenated

    torch.manual_seed(0)
    experts = GptOssExperts(GptOssConfig(hidden_size=16, intermediate_size=12, num_local_experts=4, swiglu_limit=1.0))
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, ids, w = random_moe_inputs(torch.float64, experts=4)[:3]
    ids, experts = ids % 4, experts.double()
    gate_up, down = _concatenated(experts.gate_up_proj.transpose(1, 2)), experts.down_proj.transpose(1, 2)
    with torch.no_grad():
        expected = GptOssExperts.forward.__wrapped__(experts, x, ids, w)  # transformers' eager loop
        got = moe(x, ids, w, gate_up, down, "clamped_swiglu", 0, _concatenated(experts.gate_up_proj_bias),
                  experts.down_proj_bias, experts.alpha, experts.limit)
    assert (gate_up @ x.T).abs().max() > experts.limit  # the clamp binds
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # llmc::moe sums in fp32


def test_reference_is_the_sum_of_the_chosen_experts():
    x, ids, w, gate_up, down = random_moe_inputs(torch.float64, tokens=3, experts=8)
    ids = ids % 8
    expected = torch.zeros_like(x)
    for t in range(3):
        for k in range(2):
            gate, up = (gate_up[ids[t, k]] @ x[t]).chunk(2)
            expected[t] += w[t, k] * (down[ids[t, k]] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(moe(x, ids, w, gate_up, down, "silu", 0), expected, rtol=1e-5, atol=1e-5)  # sums in fp32


def test_experts_of_two_ranks_sum_to_all():
    x, ids, w, gate_up, down = random_moe_inputs(torch.float32, experts=8)
    whole = MOE(x, ids, w, gate_up, down, "silu", 0)
    parts = MOE(x, ids, w, gate_up[:4], down[:4], "silu", 0) + MOE(x, ids, w, gate_up[4:], down[4:], "silu", 4)
    torch.testing.assert_close(parts, whole)


def test_kernel_rejects_bad_arguments():
    x, ids, w, gate_up, down = random_moe_inputs(torch.float32)
    with pytest.raises(RuntimeError, match="do not fit"):
        MOE(x, ids, w, gate_up[:, :, :8], down, "silu", 0)
    with pytest.raises(RuntimeError, match="topk_ids"):
        MOE(x, ids[:3], w, gate_up, down, "silu", 0)
    with pytest.raises(RuntimeError, match="activation"):
        MOE(x, ids, w, gate_up, down, "relu", 0)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("tokens", [1, 3, 64])
def test_prepacked_kernel_matches_reference(dtype, tol, tokens):
    """llmc::prepacked_moe's kernel against llmc::moe's reference: one row, a few, more than a tile (8 rows) per expert;
    odd sizes (bf16 pads K to even, N to 16); experts with no rows; another rank's ids; biases, the clamped SwiGLU.
    It sums each product in its own order (and bf16 rounds them there), so it is close, not equal."""
    x, ids, w, gate_up, down = random_moe_inputs(dtype, tokens=tokens, experts=6, hidden=17, intermediate=13, seed=tokens)
    ids = torch.where(ids % 6 == 2, ids + 1, ids)  # expert 2 (of either rank) gets no rows
    ids[0] = torch.tensor([1, 7])  # and the first token one of each rank's
    g = torch.Generator().manual_seed(2)
    gate_up_bias, down_bias = torch.randn(6, 26, generator=g).to(dtype), torch.randn(6, 17, generator=g).to(dtype)
    packed = prepack_experts(gate_up), prepack_experts(down)
    for act, first_expert, biases, alpha, limit in (("silu", 0, (None, None), 0.0, 0.0), ("gelu_tanh", 6, (None, None), 0.0, 0.0),
                                                    ("clamped_swiglu", 0, (gate_up_bias, down_bias), 1.702, 2.0)):
        expected = moe(x, ids, w, gate_up, down, act, first_expert, *biases, alpha, limit)
        got = PREPACKED_MOE(x, ids, w, *packed, act, first_expert, *biases, alpha, limit, 26)
        assert got.dtype == dtype and expected.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol * expected.abs().max().item())
        reference = prepacked_moe(x, ids, w, *packed, act, first_expert, *biases, alpha, limit, 26)
        torch.testing.assert_close(reference, expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_prepacked_kernel_with_no_rows_here_is_zero():
    x, ids, w, gate_up, down = random_moe_inputs(torch.float32)
    got = PREPACKED_MOE(x, ids % 4 + 4, w, prepack_experts(gate_up), prepack_experts(down), "silu", 0, None, None, 0.0, 0.0, 24)
    assert torch.equal(got, torch.zeros_like(x))


def test_prepacked_kernel_rejects_bad_arguments():
    x, ids, w, gate_up, down = random_moe_inputs(torch.float32)
    packed = prepack_experts(gate_up), prepack_experts(down)
    with pytest.raises(RuntimeError, match="not in the prepacked layout"):
        PREPACKED_MOE(x, ids, w, gate_up, down, "silu", 0, None, None, 0.0, 0.0, 24)
    with pytest.raises(RuntimeError, match="do not fit"):
        PREPACKED_MOE(x, ids, w, *packed, "silu", 0, None, None, 0.0, 0.0, 40)
    with pytest.raises(RuntimeError, match="all float32 or all bfloat16"):
        PREPACKED_MOE(x.bfloat16(), ids, w, *packed, "silu", 0, None, None, 0.0, 0.0, 24)
    with pytest.raises(RuntimeError, match="down_bias"):
        PREPACKED_MOE(x, ids, w, *packed, "silu", 0, None, torch.zeros(4, 8), 0.0, 0.0, 24)


def test_loading_prepacks_the_experts():
    """The torch backend's load rewrites llmc::moe (its optional arguments left out, as DBRX's forward calls it) into
    llmc::prepacked_moe over the experts' prepacked weights; the layer's output is unchanged."""
    x, ids, w, gate_up, down = random_moe_inputs(torch.float32)
    root, graph = torch.nn.Module(), torch.fx.Graph()
    root.register_buffer("gate_up", gate_up)
    root.register_buffer("down", down)
    inputs = [graph.placeholder(name) for name in ("x", "ids", "w")]
    graph.output(graph.call_function(MOE, (*inputs, graph.get_attr("gate_up"), graph.get_attr("down"), "silu", 0)))
    gm = torch.fx.GraphModule(root, graph)
    expected = gm(x, ids, w)
    assert prepack_linears(gm) == 1
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [PREPACKED_MOE]
    assert gm.gate_up.shape == (4, 2, 16, 16) and gm.down.shape == (4, 1, 12, 16)
    torch.testing.assert_close(gm(x, ids, w), expected, rtol=1e-5, atol=1e-5)


def engine_matches_transformers(checkpoint, engine_dir, **options):
    engine = llmc.build(checkpoint, engine_dir, max_seq_len=64, max_batch_tokens=16, log=lambda _: None, **options)
    with LLM(engine) as llm:
        outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    return [out.outputs[0].token_ids for out in outputs] == [hf_greedy(reference, p, NEW_TOKENS) for p in PROMPTS]


def test_fused_expert_checkpoint_builds(tmp_path):
    """A checkpoint already in transformers' fused layout ([E, ...] expert tensors) loads as is."""
    per_expert = make_checkpoint("qwen3_moe", tmp_path / "per_expert")
    model = AutoModelForCausalLM.from_pretrained(per_expert)
    fused = tmp_path / "fused"
    fused.mkdir()
    model.config.save_pretrained(fused)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, fused / "model.safetensors")
    tokenizer().save_pretrained(fused)
    assert any(k.endswith("experts.gate_up_proj") for k in model.state_dict())
    assert engine_matches_transformers(fused, tmp_path / "engine")


# DeepSeek-V3 and V2 at tp 2 alone too: their MLA's head projections shard by heads, the latent ones stay whole.
DEEPSEEKS = ("deepseek_v3", "deepseek_v2")


@pytest.mark.parametrize("arch,tp,ep", [(arch, tp, ep) for arch in ("mixtral", "qwen3_moe", "qwen2_moe", "llama4_text", *DEEPSEEKS)
                                        for tp, ep in ((1, 2), (2, 2))] + [(arch, 2, 1) for arch in DEEPSEEKS])
def test_expert_parallel_matches_transformers(arch, tp, ep, tmp_path):
    checkpoint = make_checkpoint(arch, tmp_path / "checkpoint", seed=3)
    assert engine_matches_transformers(checkpoint, tmp_path / "engine", tp=tp, ep=ep)
    config = EngineConfig.load(tmp_path / "engine")
    assert config.mapping.get("ep", 1) == ep and config.world_size == tp * ep
    if arch in DEEPSEEKS and tp > 1:
        from safetensors import safe_open

        with safe_open(tmp_path / "engine" / "rank1" / "weights.safetensors", "pt") as f:
            shapes = {k.removeprefix("model.layers.0.self_attn."): f.get_slice(k).get_shape() for k in f.keys()}
        # 2 of the 4 heads: q 24 features a head, k_nope + v 16 + 12, v 12; the latent projections whole
        # (q_a 16 and kv_a 32 + 8 rope features, merged as they read the same input).
        assert shapes["q_b_proj.weight"] == [48, 16] and shapes["kv_b_proj.weight"] == [56, 32]
        assert shapes["o_proj.weight"] == [64, 24] and shapes["q_a_proj.weight_merged"] == [56, 64]


def moe_router(model_type: str, tmp_path):
    """The tiny model's first MoE router, and a function giving the experts it chooses for 64 fixed tokens."""
    model = AutoModelForCausalLM.from_pretrained(make_checkpoint(model_type, tmp_path / "checkpoint", seed=3))
    router = model.model.layers[1].mlp.gate
    x = torch.randn(64, router.hidden_dim, generator=torch.Generator().manual_seed(0))

    def chosen():
        with torch.no_grad():
            return router(x)[2].sort(dim=-1).values

    return router, chosen


def test_deepseek_v3_routing_depends_on_score_bias_and_groups(tmp_path):
    """The tiny DeepSeek-V3 exercises what its router adds to plain top-k: without the score bias, or choosing
    from every group, some tokens would go to other experts (so matching transformers tests both)."""
    router, chosen = moe_router("deepseek_v3", tmp_path)
    routed = chosen()
    router.topk_group = router.num_group
    assert not torch.equal(chosen(), routed)
    router.topk_group, bias = 1, router.e_score_correction_bias.clone()
    router.e_score_correction_bias.zero_()
    assert not torch.equal(chosen(), routed)
    router.e_score_correction_bias.copy_(bias)
    assert torch.equal(chosen(), routed)


def test_deepseek_v2_routing_depends_on_groups(tmp_path):
    """The tiny DeepSeek-V2 routes within the best group (group_limited_greedy): choosing from every group, some
    tokens would go to other experts (so matching transformers tests it)."""
    router, chosen = moe_router("deepseek_v2", tmp_path)
    routed = chosen()
    router.topk_method = "greedy"
    assert not torch.equal(chosen(), routed)


def test_llama4_with_several_experts_a_token_is_a_build_error(tmp_path):
    """Llama 4 scales each expert's input by its score: llmc::moe computes that for one expert a token only."""
    checkpoint = make_checkpoint("llama4_text", tmp_path / "checkpoint", num_experts_per_tok=2)
    with pytest.raises(ExpertsError, match=r"^Llama4TextMoe with 2 experts a token: its router scores scale each expert's "
                                           r"input, which llmc::moe computes for one expert a token only$"):
        llmc.build(checkpoint, tmp_path / "engine", max_seq_len=64, log=lambda _: None)


def test_expert_parallel_shards_the_experts(tmp_path):
    from safetensors import safe_open

    checkpoint = make_checkpoint("mixtral", tmp_path / "checkpoint")
    engine = llmc.build(checkpoint, tmp_path / "engine", max_seq_len=64, tp=2, ep=2, log=lambda _: None)
    for rank in range(4):
        with safe_open(engine / f"rank{rank}" / "weights.safetensors", "pt") as f:
            gate_up = next(f.get_slice(k).get_shape() for k in f.keys() if k.endswith("experts.gate_up_proj"))
        assert gate_up == [2, 96, 64]  # 4 experts over ep 2; 2 x 96 intermediate features over tp 2


def test_ep_errors(tmp_path):
    mixtral = make_checkpoint("mixtral", tmp_path / "mixtral")
    with pytest.raises(PassError, match="ep=3 does not divide the 4 experts"):
        llmc.build(mixtral, tmp_path / "e1", max_seq_len=64, ep=3, log=lambda _: None)
    llama = make_checkpoint("llama", tmp_path / "llama")
    with pytest.raises(PassError, match="has none"):
        llmc.build(llama, tmp_path / "e2", max_seq_len=64, ep=2, log=lambda _: None)
    with pytest.raises(ValueError, match="ep must be >= 1"):
        llmc.build(mixtral, tmp_path / "e3", ep=0, log=lambda _: None)


def test_unsupported_expert_layout_is_a_build_error(tmp_path, monkeypatch):
    from transformers.models.mixtral import modeling_mixtral

    checkpoint = make_checkpoint("mixtral", tmp_path / "checkpoint")
    original = modeling_mixtral.MixtralExperts.__init__

    def with_post_norm(self, config, *args, **kwargs):
        original(self, config, *args, **kwargs)
        self.has_post_expert_norm = True

    monkeypatch.setattr(modeling_mixtral.MixtralExperts, "__init__", with_post_norm)
    with pytest.raises(CheckpointError, match="MixtralExperts has a norm after each expert, which llmc::moe does not compute"):
        llmc.build(checkpoint, tmp_path / "engine", max_seq_len=64, log=lambda _: None)


def test_a_gate_not_proven_clamped_swiglu_is_a_build_error(tmp_path, monkeypatch):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    checkpoint = make_checkpoint("gpt_oss", tmp_path / "checkpoint")
    original = GptOssExperts._apply_gate
    monkeypatch.setattr(GptOssExperts, "_apply_gate", lambda self, gate_up: original(self, gate_up) * 1.0001)
    with pytest.raises(CheckpointError, match="GptOssExperts has a custom gate .* which llmc::moe does not compute"):
        llmc.build(checkpoint, tmp_path / "engine", max_seq_len=64, log=lambda _: None)


def test_quantized_experts_are_the_dequantized_layer():
    from llmc.plugins.quant_formats import dequantize_fp8, dequantize_nvfp4, quantize_fp8_weight, quantize_nvfp4

    x, ids, w, gate_up, down = random_moe_inputs(torch.float32, hidden=32, intermediate=16)
    fp8 = [quantize_fp8_weight(e) for e in gate_up], [quantize_fp8_weight(e) for e in down]
    (gu, gu_s), (dn, dn_s) = [[torch.stack(p) for p in zip(*parts)] for parts in fp8]
    dequantized = [torch.stack([dequantize_fp8(q, s[:, None]) for q, s in zip(a, b)]) for a, b in ((gu, gu_s), (dn, dn_s))]
    assert torch.equal(torch.ops.llmc.fp8_moe(x, ids, w, gu, gu_s, dn, dn_s, "silu", 0), moe(x, ids, w, *dequantized, "silu", 0))

    nv = [[torch.stack(p) for p in zip(*[quantize_nvfp4(e) for e in t])] for t in (gate_up, down)]
    dequantized = [torch.stack([dequantize_nvfp4(*parts) for parts in zip(*t)]) for t in nv]
    assert torch.equal(torch.ops.llmc.nvfp4_moe(x, ids, w, *nv[0], *nv[1], "silu", 4), moe(x, ids, w, *dequantized, "silu", 4))


@pytest.mark.parametrize("quant", ["fp8", "nvfp4-weight-only"])
def test_quantized_moe_builds_and_runs(quant, tmp_path):
    checkpoint = make_checkpoint("qwen3_moe", tmp_path / "checkpoint")
    engine = llmc.build(checkpoint, tmp_path / "engine", max_seq_len=64, quant=quant, calib_samples=2, ep=2,
                        log=lambda _: None)
    record = EngineConfig.load(engine).ranks[0]["passes"][-1]
    assert record["pass"] == "quantize" and not any("experts" in name for name in record["kept"])
    program = (engine / "rank0" / "program.json").read_text()
    assert ("llmc.fp8_moe" if quant == "fp8" else "llmc.nvfp4_moe") in program and '"llmc.moe.default"' not in program
    with LLM(engine) as llm:
        out = llm.generate([[1, 2, 3, 4, 5]], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0]
    assert len(out.token_ids) == 8 and all(0 <= t < VOCAB for t in out.token_ids)


def test_olmoe_matches_transformers_at_tp1_ep2_and_tp2(tmp_path):
    checkpoint = make_checkpoint("olmoe", tmp_path / "checkpoint")
    assert engine_matches_transformers(checkpoint, tmp_path / "tp1")
    assert engine_matches_transformers(checkpoint, tmp_path / "ep2", ep=2)  # attention replicated, experts split
    # q/k norms over all heads: q and k projected whole on each rank, normalised, then cut to the rank's heads
    assert engine_matches_transformers(checkpoint, tmp_path / "tp2", tp=2)


def test_dbrx_experts_loop_matches_transformers_at_tp1_ep2_and_tp2(tmp_path):
    # DBRX loops over its experts in its own code: lowered to llmc::moe, its stacked weights rearranged at build.
    checkpoint = make_checkpoint("dbrx", tmp_path / "checkpoint")
    assert engine_matches_transformers(checkpoint, tmp_path / "tp1")
    assert engine_matches_transformers(checkpoint, tmp_path / "ep2", ep=2)
    assert engine_matches_transformers(checkpoint, tmp_path / "tp2", tp=2)


def test_phimoe_sparsemixer_routing_matches_transformers(tmp_path):
    checkpoint = make_checkpoint("phimoe", tmp_path / "checkpoint")
    assert engine_matches_transformers(checkpoint, tmp_path / "tp1")
    assert engine_matches_transformers(checkpoint, tmp_path / "ep2", ep=2)


def test_mixture_of_attention_is_refused_in_one_line(tmp_path):
    from llmc import sweep

    sweep.make_checkpoint("jetmoe", tmp_path / "checkpoint")  # JetMoE: attention heads routed through experts
    with pytest.raises(CheckpointError, match=r"^JetMoeMoA computes a mixture of attention heads") as e:
        llmc.build(tmp_path / "checkpoint", tmp_path / "engine", max_seq_len=64, max_batch_tokens=16, log=lambda _: None)
    assert "\n" not in str(e.value)
