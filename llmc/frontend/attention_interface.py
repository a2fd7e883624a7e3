"""llmc's attention for transformers' AttentionInterface: what a model traced by llmc calls instead of SDPA.

The model is traced with attn_implementation="llmc" (docs/design.md, "Attention"). Every attention that goes
through transformers' interface becomes one `llmc_trace::attention` node holding all it computes: q, and k, v
before any GQA expansion, the scaling, the logit soft-cap, the sink logits (GPT-OSS's `s_aux`) and the mask.
Every mask transformers' masking_utils builds becomes one `llmc_trace::causal_mask(sliding_window)` node, made
only after the mask function transformers asked for is recognised (evaluated on a grid of positions) as the
causal mask, possibly within a sliding window. The attention pass lowers the pair to llmc::paged_attention;
anything else reaching an attention's mask (a model's own bias) is matched there or refused. A feature this
module does not know (an unknown keyword, a padding mask, dropout, non-causal attention) fails the trace.

Both ops exist only between tracing and the attention pass: no engine ever holds them. Their plain-torch
implementations are the definitions the pass's lowering must match (and what `--verify-passes` runs).
"""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._python_dispatch import _disable_current_modes

from llmc.frontend.checkpoint import CheckpointError

IMPLEMENTATION = "llmc"
# Keywords transformers' models pass to an attention function that change nothing here: what a position or a
# cache is (the op computes positions from the step), and the flash-attention hint of the sliding window (the
# mask, like SDPA's, is what defines the window), and what the model returns beside its logits (MoE's router logits).
IGNORED_KWARGS = {"position_ids", "cache_position", "output_attentions", "use_cache", "sliding_window", "layer_idx",
                  "past_key_values", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "is_causal",
                  "output_router_logits", "output_hidden_states", "return_dict"}

torch.library.define("llmc_trace::causal_mask", "(SymInt q_length, int sliding_window, Device device) -> Tensor")
torch.library.define(
    "llmc_trace::attention",
    "(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, float softcap, Tensor? sinks) -> Tensor",
)


def causal_mask(q_length, sliding_window, device):
    """[1, 1, q, q] bool: key j visible to query i when j <= i (and i - j < sliding_window when that is positive)."""
    pos = torch.arange(q_length, device=device)
    allowed = pos[None, :] <= pos[:, None]
    if sliding_window > 0:
        allowed &= pos[None, :] > pos[:, None] - sliding_window
    return allowed[None, None]


torch.library.impl("llmc_trace::causal_mask", "CompositeExplicitAutograd", causal_mask)

# A mask llmc does not recognise: an error only where an attention uses it (models build masks they do not use,
# e.g. Qwen2-MoE's sliding one when every layer is full attention). It names the mask function; it never runs.
torch.library.define("llmc_trace::unrecognised_mask", "(SymInt q_length, str mask_function, Device device) -> Tensor")


@torch.library.register_fake("llmc_trace::unrecognised_mask")
def _unrecognised_mask_fake(q_length, mask_function, device):
    return torch.empty((1, 1, q_length, q_length), dtype=torch.bool, device=device)


@torch.library.register_fake("llmc_trace::causal_mask")
def _causal_mask_fake(q_length, sliding_window, device):
    return torch.empty((1, 1, q_length, q_length), dtype=torch.bool, device=device)


def attention(q, k, v, mask, scale, softcap, sinks):
    """Eager attention: q [1, H, T, dk], k [1, Hkv, T, dk], v [1, Hkv, T, dv] -> [1, H, T, dv]. `mask` is bool
    (True: visible) or additive; `softcap` > 0 caps the scaled logits at softcap * tanh(x / softcap); `sinks`
    [H] are extra logits in each row's softmax whose probability is dropped."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    if sinks is not None:
        sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs.to(v.dtype) @ v).contiguous()


torch.library.impl("llmc_trace::attention", "CompositeExplicitAutograd", attention)


@torch.library.register_fake("llmc_trace::attention")
def _attention_fake(q, k, v, mask, scale, softcap, sinks):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _architecture(module) -> str:
    config = getattr(module, "config", None)
    return getattr(config, "model_type", None) or type(module).__name__


def llmc_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, s_aux=None,
                   **kwargs):
    """transformers' attention-function signature; returns ([B, T, H, dv], None) as its functions do."""
    arch = _architecture(module)
    unknown = sorted(k for k, v in kwargs.items() if k not in IGNORED_KWARGS and v is not None)
    if unknown:
        raise CheckpointError(f"{arch}: its attention passes {', '.join(unknown)}, which llmc's attention does not implement")
    if dropout:
        raise CheckpointError(f"{arch}: attention dropout {dropout} at trace time; llmc traces models in eval mode")
    if attention_mask is None:
        if not getattr(module, "is_causal", True):
            raise CheckpointError(f"{arch}: non-causal attention; llmc's attention is causal")
        # What SDPA does without a mask for a causal module: plain causal attention.
        attention_mask = torch.ops.llmc_trace.causal_mask(query.shape[2], 0, query.device)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    out = torch.ops.llmc_trace.attention(query, key, value, attention_mask, scale, float(softcap or 0.0), s_aux)
    return out.transpose(1, 2).contiguous(), None


# Positions the engine computes are below its max_seq_len (set while tracing a build): a mask is recognised over
# those alone, so a window or chunk no sequence can outgrow (Llama 4's 8192-token chunks) is the causal mask.
_positions = {"limit": None}


@contextlib.contextmanager
def positions_below(max_seq_len: int | None):
    _positions["limit"] = max_seq_len
    try:
        yield
    finally:
        _positions["limit"] = None


def _recognised_window(mask_function, local_size) -> int | None:
    """0 for the causal mask, w for the causal mask within a window of w tokens, None for anything else. The mask
    function is evaluated on real tensors (outside the trace) at rows chosen to show any window of up to
    max(local_size, 256) tokens: the first rows, the rows around the window's edge, and far beyond it, all below
    the engine's max_seq_len when it is known."""
    span = max(int(local_size or 0), 256)
    n = min(2 * span + 2, _positions["limit"] or 2 * span + 2)
    rows = sorted({r for r in (*range(min(n, 64)), *range(span - 2, span + 3), *range(2 * span - 2, n)) if r < n} | {n - 1})
    with unset_fake_temporarily(), _disable_current_modes():
        q_idx = torch.tensor(rows, device="cpu")[:, None]
        kv_idx = torch.arange(n, device="cpu")[None, :]
        try:
            got = mask_function(torch.tensor(0, device="cpu"), torch.tensor(0, device="cpu"), q_idx, kv_idx)
        except Exception:  # a mask function that is not a function of positions alone
            return None
        got = torch.as_tensor(got).expand(len(rows), n)
        window = int(got[-1].sum())
        window = 0 if window == n else window
        expected = kv_idx <= q_idx
        if window:
            expected &= kv_idx > q_idx - window
        return window if torch.equal(got, expected) else None


def llmc_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
              local_size=None, config=None, device="cpu", **kwargs):
    """transformers' mask-interface signature: a `llmc_trace::causal_mask` node, or a CheckpointError."""
    arch = getattr(config, "model_type", None) or "this model"
    if attention_mask is not None:
        raise CheckpointError(f"{arch}: a padding mask at trace time; llmc traces one unpadded sequence")
    if batch_size != 1 or q_offset != 0 or kv_offset != 0 or kv_length is not q_length and kv_length != q_length:
        raise CheckpointError(f"{arch}: an attention mask over a cache or a batch at trace time; llmc traces one sequence")
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk and local_size == chunk:  # transformers' chunked mask: it reads the left padding (meta here, and none)
        from transformers.masking_utils import chunked_causal_mask_function

        with unset_fake_temporarily(), _disable_current_modes():
            mask_function = chunked_causal_mask_function(chunk, torch.zeros(1, dtype=torch.long, device="cpu"))
    window = _recognised_window(mask_function, local_size)
    if window is None and chunk and local_size == chunk:
        raise CheckpointError(f"{arch}: chunked attention (chunks of {chunk} tokens), which llmc's attention does not "
                              f"implement; with max_seq_len <= {chunk} it is causal attention and builds")
    if window is None:
        name = str(getattr(mask_function, "__qualname__", mask_function))
        return torch.ops.llmc_trace.unrecognised_mask(q_length, name, torch.device(device))
    return torch.ops.llmc_trace.causal_mask(q_length, window, torch.device(device))


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, llmc_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, llmc_mask)


@contextlib.contextmanager
def unpacked_sequences():
    """While tracing, transformers sees one sequence. The traced positions are those of llmc's flat step, several
    sequences side by side, which transformers would take for packed sequences and mask apart by their position
    ids; llmc::paged_attention keeps the sequences apart itself (query_start_loc), so the traced mask is the
    causal mask of one sequence."""
    from transformers import masking_utils

    found = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = found
