"""llmc.paged_attention against dense causal attention over each sequence's whole context."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from llmc.plugins import cpu_kernels
from llmc.plugins.attention import paged_attention as reference
from llmc.plugins.linear import prepack_linears, prepack_weight, prepacked_linear, unpack_weight

BLOCK, HEADS, KV_HEADS, DIM = 4, 4, 2, 8


def dense(q, k, v, window):
    """q, k, v: [heads, n, d] of one whole sequence."""
    n = q.shape[1]
    pos = torch.arange(n)
    mask = pos[None, :] <= pos[:, None]
    if window:
        mask &= pos[None, :] > pos[:, None] - window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)


def kernel(*args):
    assert cpu_kernels.has_kernel(torch.ops.llmc.paged_attention.default), "no C++ kernel for this CPU"
    return torch.ops.llmc.paged_attention(*args)


@pytest.mark.parametrize("impl", [reference, kernel], ids=["reference", "cpu-kernel"])
@pytest.mark.parametrize("window", [0, 5])
def test_chunked_ragged_steps_equal_dense_attention(window, impl):
    g = torch.Generator().manual_seed(0)
    lengths = [11, 6]
    qs = [torch.randn(HEADS, n, DIM, generator=g) for n in lengths]
    ks = [torch.randn(KV_HEADS, n, DIM, generator=g) for n in lengths]
    vs = [torch.randn(KV_HEADS, n, DIM, generator=g) for n in lengths]
    cache = torch.zeros(2, 2, 12, BLOCK, KV_HEADS, DIM)  # two layers; use layer 1
    tables = [[7, 2, 9], [4, 0]]  # blocks in no particular order
    block_tables = torch.tensor([tables[0], tables[1] + [0]], dtype=torch.int32)
    out = [torch.empty(HEADS, n, DIM) for n in lengths]
    # Two steps: a first chunk of each sequence, then the rest.
    for chunk in ((0, 7, 0, 4), (7, 11, 4, 6)):
        spans = [(chunk[0], chunk[1]), (chunk[2], chunk[3])]
        q = torch.cat([qs[i][:, a:b] for i, (a, b) in enumerate(spans)], dim=1)[None]
        k = torch.cat([ks[i][:, a:b] for i, (a, b) in enumerate(spans)], dim=1)[None]
        v = torch.cat([vs[i][:, a:b] for i, (a, b) in enumerate(spans)], dim=1)[None]
        slots = [tables[i][p // BLOCK] * BLOCK + p % BLOCK for i, (a, b) in enumerate(spans) for p in range(a, b)]
        starts = [0, spans[0][1] - spans[0][0], sum(b - a for a, b in spans)]
        result = impl(
            q, k, v, cache, 1, torch.tensor(slots), block_tables,
            torch.tensor([b for _, b in spans], dtype=torch.int32), torch.tensor(starts, dtype=torch.int32), 0.3, window,
        )
        for i, (a, b) in enumerate(spans):
            out[i][:, a:b] = result[0, :, starts[i] : starts[i + 1]]
    assert cache[0].abs().sum() == 0  # other layers untouched
    for i in range(2):
        torch.testing.assert_close(out[i], dense(qs[i], ks[i], vs[i], window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cpu_kernel_matches_reference_on_a_mixed_step(dtype, tol):
    """A decode of one sequence and a prefill chunk of another in one step, GQA, both cache layouts written."""
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(3, 2, 10, BLOCK, KV_HEADS, DIM, generator=g).to(dtype)
    q = torch.randn(1, HEADS, 5, DIM, generator=g).to(dtype)
    k, v = (torch.randn(1, KV_HEADS, 5, DIM, generator=g).to(dtype) for _ in range(2))
    args = (2, torch.tensor([13, 20, 21, 22, 23]), torch.tensor([[8, 2, 3, 1], [5, 9, 0, 0]], dtype=torch.int32),
            torch.tensor([14, 8], dtype=torch.int32), torch.tensor([0, 1, 5], dtype=torch.int32), 0.35, 0)
    cache_ref = cache.clone()
    expected = reference(q, k, v, cache_ref, *args)
    got = kernel(q, k, v, cache, *args)
    assert torch.equal(cache, cache_ref)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


PREFILL_STEPS = {  # (context before the step, new tokens) of three sequences
    "fresh-prompts": [(0, 97), (20, 1), (0, 33)],
    "chunk-after-context": [(150, 64), (3, 1), (0, 1)],
    "odd-sizes": [(31, 71), (0, 1), (7, 9)],
}


@pytest.mark.parametrize("dtype, cache_dtype, tol", [(torch.float32, torch.float32, 3e-5), (torch.bfloat16, torch.bfloat16, 2e-2),
                                                     (torch.float32, torch.float8_e4m3fn, 3e-5)], ids=["fp32", "bf16", "fp8-cache"])
@pytest.mark.parametrize("window", [0, 37])
@pytest.mark.parametrize("step", list(PREFILL_STEPS))
@pytest.mark.parametrize("dim", [24, 64, 41])
def test_prefill_kernel_matches_reference_across_query_and_key_tiles(step, window, dtype, cache_dtype, tol, dim):
    """Steps that are mostly prefill (the kernel's blocked flash attention): chunks of 1 to 97 tokens, some after
    earlier context, beside a decode, so that tiles of 32 queries and 64 keys are whole, partial, or cross the
    diagonal and the window's edge; 3 query heads a KV head, pages of 16 in no order, the previous context random in
    the cache. Head dims: 24 (not a whole column block), 64 (whole AMX tiles where the CPU has them), 41 (odd: bf16
    pads it to pairs)."""
    g = torch.Generator().manual_seed(4)
    heads, kv_heads, block = 6, 2, 16
    seqs = PREFILL_STEPS[step]
    cache = (torch.randn(2, 2, 24, block, kv_heads, dim, generator=g) * 3).to(cache_dtype)
    pages = torch.randperm(24, generator=g).tolist()
    tables, slots = [], []
    for past, new in seqs:
        tables.append([pages.pop() for _ in range(-(-(past + new) // block))])
        slots += [tables[-1][p // block] * block + p % block for p in range(past, past + new)]
    width = max(map(len, tables))
    T = len(slots)
    q = torch.randn(1, heads, T, dim, generator=g).to(dtype)
    k, v = (torch.randn(1, kv_heads, T, dim, generator=g).to(dtype) for _ in range(2))
    starts = [0]
    for _, new in seqs:
        starts.append(starts[-1] + new)
    args = (1, torch.tensor(slots), torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            torch.tensor([past + new for past, new in seqs], dtype=torch.int32), torch.tensor(starts, dtype=torch.int32),
            0.2, window, *((torch.tensor(0.02), torch.tensor(0.015)) if cache_dtype == torch.float8_e4m3fn else (None, None)))
    assert T > 8 * len(seqs)  # the blocked path
    cache_ref = cache.clone()
    expected = reference(q, k, v, cache_ref, *args)
    got = kernel(q, k, v, cache, *args)
    assert torch.equal(cache.view(torch.uint8), cache_ref.view(torch.uint8))
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_fp8_kv_cache_kernel_matches_reference():
    """An E4M3 cache with per-layer scales: the kernel writes the reference's bytes (saturating) and reads them back alike."""
    g = torch.Generator().manual_seed(2)
    cache = (torch.randn(3, 2, 10, BLOCK, KV_HEADS, DIM, generator=g) * 100).to(torch.float8_e4m3fn)
    q = torch.randn(1, HEADS, 5, DIM, generator=g)
    k, v = (torch.randn(1, KV_HEADS, 5, DIM, generator=g) for _ in range(2))
    k[0, 0, 0, 0] = 1e4  # beyond 448 x k_scale: saturates
    scales = torch.tensor(0.02), torch.tensor(0.015)
    args = (2, torch.tensor([13, 20, 21, 22, 23]), torch.tensor([[8, 2, 3, 1], [5, 9, 0, 0]], dtype=torch.int32),
            torch.tensor([14, 8], dtype=torch.int32), torch.tensor([0, 1, 5], dtype=torch.int32), 0.35, 0, *scales)
    cache_ref = cache.clone()
    expected = reference(q, k, v, cache_ref, *args)
    got = kernel(q, k, v, cache, *args)
    assert torch.equal(cache.view(torch.uint8), cache_ref.view(torch.uint8))
    assert cache[2, 0].view(-1, KV_HEADS, DIM)[13, 0, 0].float() == 448
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim, rotary_dim, interleaved", [(DIM, DIM, False), (DIM, 4, False), (DIM, 4, True), (64, 64, False),
                                                             (64, 32, False)])
@pytest.mark.parametrize("tokens", [5, 40], ids=["decode-kernel", "prefill-kernel"])
@pytest.mark.parametrize("fp8", [False, True], ids=["", "fp8-cache"])
def test_rope_folded_into_attention_equals_rotary_then_attention(dtype, head_dim, rotary_dim, interleaved, tokens, fp8):
    """cos / sin given to the op: the cache and the output are bit for bit those of llmc::rotary_embedding on
    q's and k's first rotary_dim channels, then the op (a step of a decode and a prefill chunk, either path; head
    dims of 64 take the kernel's rows 16 channels at a time)."""
    g = torch.Generator().manual_seed(3)
    cache = torch.zeros(3, 2, 16, BLOCK, KV_HEADS, head_dim, dtype=torch.float8_e4m3fn if fp8 else dtype)
    q = torch.randn(1, HEADS, tokens, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(1, KV_HEADS, tokens, head_dim, generator=g).to(dtype) for _ in range(2))
    cos, sin = (torch.randn(tokens, rotary_dim, generator=g).to(dtype) for _ in range(2))
    slots = torch.tensor([13] + list(range(20, 20 + tokens - 1)))
    args = (2, slots, torch.tensor([[8, 2, 3, 1] + [0] * 8, list(range(5, 5 + 12))], dtype=torch.int32),
            torch.tensor([14, tokens - 1], dtype=torch.int32), torch.tensor([0, 1, tokens], dtype=torch.int32), 0.35, 0,
            *((torch.tensor(0.02), torch.tensor(0.015)) if fp8 else (None, None)))

    def rope(x):
        turned = torch.ops.llmc.rotary_embedding(x[..., :rotary_dim], cos.view(1, 1, tokens, -1), sin.view(1, 1, tokens, -1),
                                                 interleaved)
        return torch.cat((turned, x[..., rotary_dim:]), dim=-1)

    cache_unfused = cache.clone()
    expected = torch.ops.llmc.paged_attention(rope(q), rope(k), v, cache_unfused, *args)
    got = torch.ops.llmc.paged_attention(q, k, v, cache, *args, cos=cos, sin=sin, rotary_interleaved=interleaved)
    assert torch.equal(cache.view(torch.uint8), cache_unfused.view(torch.uint8))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17, 40])
@pytest.mark.parametrize("in_features", [70, 71, 96])
@pytest.mark.parametrize("bias", [True, False])
def test_prepacked_linear_matches_torch(dtype, tol, rows, in_features, bias):
    """llmc::prepacked_linear on CPU: any rows (tiles of 8 and a tail; AMX tiles of 16 for bf16 with K a multiple of
    32 where the CPU has them), N not a multiple of the block (33), K odd (bf16 pads it to pairs); the kernel against
    the reference and F.linear in fp32."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, in_features, generator=g).to(dtype)
    w = torch.randn(33, in_features, generator=g).to(dtype)
    b = torch.randn(33, generator=g).to(dtype) if bias else None
    packed = prepack_weight(w)
    assert torch.equal(unpack_weight(packed, 33, in_features), w)
    expected = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    got = torch.ops.llmc.prepacked_linear(x, packed, b, 33)
    assert got.shape == (1, rows, 33) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    torch.testing.assert_close(got, prepacked_linear(x, packed, b, 33), rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [33, 768])
def test_rms_norm_kernels_match_their_references(dtype, hidden):
    """llmc::rms_norm and llmc::add_rms_norm on CPU: the residual sum bit for bit (rounded as torch's add), the norm
    within the dtype's tolerance (its sum of squares is added in another order); a hidden size that is not a whole
    number of vectors, and one that is."""
    g = torch.Generator().manual_seed(hidden)
    x, residual = (torch.randn(37, hidden, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(hidden, generator=g).to(dtype)
    y, h = torch.ops.llmc.add_rms_norm(x, residual, w, 1e-6)
    alone = torch.ops.llmc.rms_norm(x, w, 1e-6)
    with cpu_kernels.references():
        y_ref, h_ref = torch.ops.llmc.add_rms_norm(x, residual, w, 1e-6)
        alone_ref = torch.ops.llmc.rms_norm(x, w, 1e-6)
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(alone, alone_ref)


@pytest.mark.parametrize("in_features", [70, 71, 96])
def test_bf16_prepacked_linear_on_many_rows_equals_a_few_rows_at_a_time(in_features):
    """Many bf16 rows (where a level without bf16 dot products widens x and the weights to fp32 tiles; AMX tiles
    where K is a multiple of 32 and the CPU has them) give, bit for bit, what the same rows give a few at a time:
    the same products, summed in the same order."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 45, in_features, generator=g).to(torch.bfloat16)
    w = torch.randn(50, in_features, generator=g).to(torch.bfloat16)
    b = torch.randn(50, generator=g).to(torch.bfloat16)
    packed = prepack_weight(w)
    few = torch.cat([torch.ops.llmc.prepacked_linear(x[:, i : i + 5], packed, b, 50) for i in range(0, 45, 5)], dim=1)
    assert torch.equal(torch.ops.llmc.prepacked_linear(x, packed, b, 50), few)


def test_prepacked_linear_rejects_what_does_not_fit():
    """A wrong input width or an unpacked weight is an error that names the mismatch, not a wrong answer."""
    packed = prepack_weight(torch.randn(33, 70))
    with pytest.raises(RuntimeError, match="input features 64 do not match the weight's 70"):
        torch.ops.llmc.prepacked_linear(torch.randn(2, 64), packed, None, 33)
    with pytest.raises(RuntimeError, match="not in the prepacked layout"):
        torch.ops.llmc.prepacked_linear(torch.randn(2, 70), torch.randn(33, 70), None, 33)
    with pytest.raises(RuntimeError, match="out_features 50 exceeds the weight's"):
        torch.ops.llmc.prepacked_linear(torch.randn(2, 70), packed, None, 50)


def test_prepack_linears_rewrites_the_graph():
    """Loading for CPU prepacks each linear's weight once: in place when only linears read it, as a copy
    beside it when something else does too (a tied LM head); the program's outputs are unchanged."""
    g = torch.Generator().manual_seed(0)
    root = torch.nn.Module()
    root.register_buffer("shared", torch.randn(24, 24, generator=g))  # read by two linears
    root.register_buffer("tied", torch.randn(40, 24, generator=g))  # a linear and an embedding read it
    graph = fx.Graph()
    x, ids = graph.placeholder("x"), graph.placeholder("ids")
    shared, tied = graph.get_attr("shared"), graph.get_attr("tied")
    h = graph.call_function(torch.ops.llmc.linear.default, (x, shared, None))
    h = graph.call_function(torch.ops.llmc.linear.default, (graph.call_function(torch.ops.aten.relu.default, (h,)), shared, None))
    logits = graph.call_function(torch.ops.llmc.linear.default, (h, tied, None))
    graph.output((logits, graph.call_function(torch.ops.aten.embedding.default, (tied, ids))))
    gm = fx.GraphModule(root, graph)
    inputs = torch.randn(3, 24, generator=g), torch.tensor([1, 7])
    expected = gm(*inputs)

    assert prepack_linears(gm) == 3
    assert gm.shared.shape == (2, 24, 16) and gm.tied.shape == (40, 24) and gm.tied_prepacked.shape == (3, 24, 16)
    assert not any(n.target == torch.ops.llmc.linear.default for n in gm.graph.nodes)
    for got, want in zip(gm(*inputs), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 0.0)])
def test_rotary_embedding_kernel_matches_reference(dtype, tol):
    """On the layouts the graph gives it: q as a transposed view [1, H, T, D], cos/sin [1, 1, T, D].
    bf16 rounds after each op as the reference's torch ops do, so it is exact; fp32 may fuse a multiply-add."""
    from llmc.plugins.rotary import rotary_embedding

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, 3, 16, generator=g).to(dtype).transpose(1, 2)
    cos, sin = torch.randn(2, 1, 1, 5, 16, generator=g).to(dtype)
    got = torch.ops.llmc.rotary_embedding(x, cos, sin)
    assert got.shape == x.shape and got.dtype == dtype
    torch.testing.assert_close(got, rotary_embedding(x, cos, sin), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 0.0)])
def test_interleaved_rotary_embedding_kernel_matches_reference(dtype, tol):
    """GPT-J's layout: the first rotary_dim channels of q [1, T, H, D] (a slice of a view, not transposed),
    cos/sin [1, T, 1, rotary_dim] with each value repeated for its pair; the reference is HF's GPT-J RoPE."""
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb

    from llmc.plugins.rotary import rotary_embedding

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, 3, 16, generator=g).to(dtype)[..., :6]
    sin_half, cos_half = torch.randn(2, 1, 5, 3, generator=g).to(dtype)
    expected = apply_rotary_pos_emb(x, sin_half, cos_half)
    cos, sin = (t[:, :, None].repeat_interleave(2, -1) for t in (cos_half, sin_half))
    got = torch.ops.llmc.rotary_embedding(x, cos, sin, True)
    assert got.shape == x.shape and got.dtype == dtype
    torch.testing.assert_close(rotary_embedding(x, cos, sin, True), expected, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rms_norm_kernel_matches_reference(dtype, tol):
    from llmc.plugins.norms import rms_norm

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 7, 96, generator=g).to(dtype), torch.randn(96, generator=g).to(dtype)
    torch.testing.assert_close(torch.ops.llmc.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_add_rms_norm_kernel_matches_reference(dtype, tol):
    from llmc.plugins.norms import add_rms_norm

    g = torch.Generator().manual_seed(1)
    x, r = (torch.randn(3, 5, 64, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(64, generator=g).to(dtype)
    normed, total = add_rms_norm(x, r, w, 1e-6)
    got = torch.ops.llmc.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(got[1], total)
    torch.testing.assert_close(got[0], normed, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_add_layer_norm_kernel_matches_reference(dtype, tol):
    from llmc.plugins.norms import add_layer_norm

    g = torch.Generator().manual_seed(3)
    x, residual = (torch.randn(1, 5, 48, generator=g).to(dtype) for _ in range(2))
    w, b = torch.randn(48, generator=g).to(dtype), torch.randn(48, generator=g).to(dtype)
    (y, h), (y_ref, h_ref) = torch.ops.llmc.add_layer_norm(x, residual, w, b, 1e-5), add_layer_norm(x, residual, w, b, 1e-5)
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)


# The kernel computes in torch's own vectorized math, so most outputs equal the reference's bit for bit;
@pytest.mark.parametrize("act, fn", [("silu", torch.nn.functional.silu), ("gelu", torch.nn.functional.gelu),
                                     ("gelu_tanh", lambda x: torch.nn.functional.gelu(x, approximate="tanh"))])
def test_gated_activation_op(act, fn):
    gate, up = torch.randn(3, 10), torch.randn(3, 10)
    torch.testing.assert_close(torch.ops.llmc.gated_activation(gate, up, act), fn(gate) * up)  # the CPU kernel: the test below


# torch itself computes some elements otherwise (std::exp / std::tanh in its kernels' scalar tails,
# oneDNN's GELU on contiguous fp32 and bf16), where the two differ by rounding: at most one bf16 ulp
# (2^-7 relative); in fp32 a few ulps, and up to about 1e-6 absolute where oneDNN's 1 + erf(x) cancels.
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-6), (torch.bfloat16, 2**-7)])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("rows", [1, 150])
@pytest.mark.parametrize("merged", [True, False], ids=["merged-gate-up", "separate"])
def test_gated_activation_kernel_matches_reference(dtype, rtol, act, rows, merged):
    """An odd width, one row (decode) and enough rows for two threads; gate and up as the halves of a merged
    gate/up linear's output (rows twice as far apart) or as tensors of their own."""
    from llmc.plugins.activations import gated_activation

    atol = 1e-5 if act == "gelu" else 1e-6
    g = torch.Generator().manual_seed(4)
    gate_up = torch.randn(1, rows, 2 * 131, generator=g).to(dtype)
    gate, up = gate_up.split(131, dim=-1) if merged else (t.contiguous() for t in gate_up.split(131, dim=-1))
    got = torch.ops.llmc.gated_activation(gate, up, act)
    assert got.shape == gate.shape and got.dtype == dtype
    torch.testing.assert_close(got, gated_activation(gate, up, act), rtol=rtol, atol=atol)


def test_references_context_runs_the_references():
    from llmc.plugins.activations import gated_activation

    gate, up = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    with cpu_kernels.references():
        assert torch.equal(torch.ops.llmc.gated_activation(gate, up, "gelu"), gated_activation(gate, up, "gelu"))
    assert cpu_kernels.has_kernel(torch.ops.llmc.gated_activation.default)
