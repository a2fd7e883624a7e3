"""Tiny random-weight Hugging Face checkpoints of every supported architecture, with a real tokenizer."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest

import llmc  # noqa: F401  (before torch: llmc sets OpenMP's wait policy, which libgomp reads as torch loads)
import torch

torch.set_num_threads(2)

EXAMPLE_MODEL = Path(__file__).resolve().parent.parent / "examples" / "stdlib-llama"
VOCAB = 320
TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, sliding_window=8),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4),
    "gptj": dict(model_type="gptj", n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, rotary_pct=0.5),
    # Mixtures of experts (llmc::moe); save_pretrained writes their experts as per-expert keys.
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, moe_intermediate_size=32, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True),
    "qwen2_moe": dict(model_type="qwen2_moe", hidden_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      num_experts=8, num_experts_per_tok=2),
    # GPT-OSS: attention sinks, a sliding layer (window 8: prompts cross it) then a full one, experts with biases and
    # the clamped SwiGLU over interleaved gate/up features, softmax after top-k, YaRN RoPE. Weights larger than the
    # default init, so that the clamp binds and the sinks and experts change the greedy tokens.
    "gpt_oss": dict(model_type="gpt_oss", hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                    swiglu_limit=1.0, initializer_range=0.1, max_position_embeddings=256,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                     "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64}),
    # ALiBi (falcon-rw style): the bias transformers adds to the mask becomes the op's slopes.
    "falcon_alibi": dict(model_type="falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True,
                         new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=True),
    # ALiBi in the model's own attention code (llmc/passes/eager_attention.py).
    "bloom": dict(model_type="bloom", hidden_size=64, n_layer=2, n_head=4),
    # Logit soft-capping that binds (larger weights than the default init), sliding and global layers.
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, sliding_window=8, attn_logit_softcapping=1.0,
                   final_logit_softcapping=30.0, query_pre_attn_scalar=16, initializer_range=0.1),
    # MLA: K head dim (nope + rope) 24, V head dim 12; dense (first_k_dense_replace covers every layer).
    "deepseek_v3_mla": dict(model_type="deepseek_v3", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=2,
                            q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
                            n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, max_position_embeddings=256),
    # DeepSeek-V3: MLA (with a q latent) and, after one dense layer, MoE with grouped routing (sigmoid scores plus a
    # score bias, the best 1 of 2 groups, top-2 renormalised and scaled) and a shared expert.
    "deepseek_v3": dict(model_type="deepseek_v3", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1,
                        q_lora_rank=16, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
                        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                        norm_topk_prob=True, routed_scaling_factor=2.5, max_position_embeddings=256),
    # DeepSeek-V2: MLA, RoPE as complex multiplication, and MoE routed by softmax scores within the best 1 of 2
    # groups (a group's score: its best expert's), top-2 not renormalised but scaled, and a shared expert.
    "deepseek_v2": dict(model_type="deepseek_v2", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1,
                        q_lora_rank=16, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
                        n_routed_experts=8, num_experts_per_tok=2, topk_method="group_limited_greedy", n_group=2,
                        topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5, max_position_embeddings=256),
    # Llama 4: RoPE as complex multiplication with an L2 norm of q and k after it; a layer without RoPE whose queries
    # scale with their position (temperature tuning, steps of 4 tokens here: prompts cross several); chunked attention
    # (chunks longer than any engine's sequence here: causal); a dense layer then an MoE one whose sigmoid router
    # score scales the input of its one expert per token, beside a shared expert.
    "llama4_text": dict(model_type="llama4_text", hidden_size=64, intermediate_size=32, intermediate_size_mlp=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layers=[1, 0],
                        attn_temperature_tuning=True, floor_scale=4, attn_scale=0.5, attention_chunk_size=8192),
    # RoPE whose frequencies depend on the sequence's length, switching at 16 tokens: prompts and generations
    # cross it. Weights larger than the default init, so that positions change the greedy tokens.
    "phi3_longrope": dict(model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                          max_position_embeddings=128, original_max_position_embeddings=16,
                          rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                           "short_factor": [1.0 + 0.2 * i for i in range(8)],
                                           "long_factor": [1.5 + 3.0 * i for i in range(8)]}),
    "llama_dynamic_rope": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                               max_position_embeddings=16,
                               rope_parameters={"rope_type": "dynamic", "factor": 8.0, "rope_theta": 10000.0}),
}
RANDOM_BIASES = {"gpt_oss"}
ARCHITECTURES = list(TINY_CONFIGS)  # each built in every mode: dtypes, tp, pp, quantization
# Not built in every mode (tests/test_parallel.py runs OLMoE at tp 2: q/k norms over all heads).
SINGLE_RANK_CONFIGS = {
    "olmoe": dict(model_type="olmoe", hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=8, num_experts_per_tok=2),
    # DBRX: experts the model loops over in its own code (w1, v1, w2 of all experts stacked), clipped QKV.
    "dbrx": dict(model_type="dbrx", d_model=64, n_heads=4, n_layers=2, max_seq_len=256,
                 attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                 ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}),
    # Phi-3.5-MoE: sparsemixer routing (each choice's softmax over the experts within its jitter threshold), and
    # RoPE frequencies computed in every forward.
    "phimoe": dict(model_type="phimoe", hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                   router_jitter_noise=0.5),
}
TOKENIZER_TEXT = (
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n"
    "The quick brown fox jumps over the lazy dog. import os, sys\nclass A:\n    pass\n"
) * 4


@functools.cache
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TOKENIZER_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def make_checkpoint(arch: str, path: Path, *, seed: int = 0, **overrides) -> Path:
    """Save a random tiny `arch` model with the tokenizer; EOS is off so every request runs to max_tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"vocab_size": VOCAB, **(TINY_CONFIGS | SINGLE_RANK_CONFIGS)[arch], **overrides}
    config = AutoConfig.for_model(kwargs.pop("model_type"), bos_token_id=None, eos_token_id=None, pad_token_id=None, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if arch in RANDOM_BIASES:  # transformers initialises them to zero, which would test nothing
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(std=0.1)
    for name, bias in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # zero at init; a trained one steers routing (DeepSeek-V3)
            bias.normal_(std=0.1)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def step_inputs(plans, block_size: int):
    """The step inputs of each plan in turn (a plan: [(sequence, tokens to compute now)], as the scheduler
    makes them); after each step a sequence whose tokens are all computed gets a made-up next token."""
    from llmc.runtime.step_inputs import prepare_inputs

    for plan in plans:
        inputs, sampled = prepare_inputs(plan, block_size)
        yield inputs
        for seq, n in plan:
            seq.num_computed_tokens += n
            if seq in sampled:
                seq.token_ids.append(7 + len(seq))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: make_checkpoint(arch, root / arch) for arch in ARCHITECTURES}


# Engines many modules read, built once per session (issue 22: CI time). Read-only: a test that edits an engine
# copies it first (`llama_engine_copy`, or shutil.copytree into its tmp_path); teardown checks no file changed.

def file_digests(root: Path) -> dict[str, dict]:
    from llmc.engine import file_digest

    return {p.relative_to(root).as_posix(): file_digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def shared_engine(checkpoint: Path, out: Path, **options):
    """Build, hand out, then fail the session if any test wrote into the shared engine."""
    import llmc

    engine = llmc.build(checkpoint, out, log=lambda _: None, **options)
    before = file_digests(engine)
    yield engine
    assert file_digests(engine) == before, f"a test changed the shared engine {engine}: copy it before editing"


@pytest.fixture(scope="session")
def llama_engine(checkpoints, tmp_path_factory):
    """The tiny Llama, fp32, torch backend, 64 tokens a sequence."""
    yield from shared_engine(checkpoints["llama"], tmp_path_factory.mktemp("shared") / "llama", max_seq_len=64)


@pytest.fixture(scope="session")
def llama_onnx_engine(checkpoints, tmp_path_factory):
    """The tiny Llama, fp32, ONNX backend, 64 tokens a sequence."""
    yield from shared_engine(checkpoints["llama"], tmp_path_factory.mktemp("shared") / "llama-onnx", max_seq_len=64, backend="onnx")


@pytest.fixture(scope="session")
def example_engine(tmp_path_factory):
    """The shipped example model (examples/stdlib-llama), fp32, 256 tokens a sequence."""
    yield from shared_engine(EXAMPLE_MODEL, tmp_path_factory.mktemp("shared") / "stdlib-llama", max_seq_len=256)


@pytest.fixture
def llama_engine_copy(llama_engine, tmp_path) -> Path:
    """A copy of the shared Llama engine, for a test that edits its files."""
    return shutil.copytree(llama_engine, tmp_path / "engine")
