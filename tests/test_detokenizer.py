"""IncrementalDetokenizer against full `decode`, with real (offline-built) byte-level and sentencepiece-like tokenizers.

The property checked everywhere: after every token, the text streamed so far is a prefix of the full decode of
every longer output (it never changes, and holds no transient "\ufffd"), and streaming a prefix of the output then
`flush()` gives exactly the full decode of that prefix (as the continuation of the prompt's text).
"""

from __future__ import annotations

import functools
import json
import os
import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from llmc.runtime.detokenizer import IncrementalDetokenizer

TEXT = (
    "héllo wörld 你好 🙂🚀 The quick brown fox jumps over the lazy dog. café naïve résumé\n"
    "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)  # 🙂 ok\n"
) * 8
EMOJI = "🙂"
EOS = "<|endoftext|>"


@functools.cache
def byte_level() -> PreTrainedTokenizerFast:
    """GPT-2 style: ByteLevel BPE, vocab small enough that é, 你, 🙂 are split over several byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@functools.cache
def llama_style() -> PreTrainedTokenizerFast:
    """Laid out like Llama 2's tokenizer.json: "▁" normalizer, BPE with byte fallback, Strip decoder, BOS added."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # training only: merges within words
    rare = "你好🙂🚀öjx"  # left out of training: they are spelled with byte tokens
    tok.train_from_iterator([TEXT.translate({ord(c): None for c in rare})], trainers.BpeTrainer(
        vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    spec = json.loads(tok.to_str())
    for b in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
    spec["model"]["byte_fallback"] = True
    spec["pre_tokenizer"] = None
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@functools.cache
def metaspace() -> PreTrainedTokenizerFast:
    """Metaspace pre-tokenizer and decoder (Unigram; its vocab written out, as Unigram training is not reproducible)."""
    words = "▁The ▁quick ▁brown ▁fox ▁jumps ▁over ▁the ▁lazy ▁dog ▁h llo ▁w rld ▁你 ▁🙂 ▁ok ▁def ▁fib ▁return".split()
    chars = sorted(set(TEXT.replace(" ", "▁")) - {"\n"})
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(w, -2.0) for w in words] + [(c, -5.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TOKENIZERS = {"byte_level": byte_level, "llama_style": llama_style, "metaspace": metaspace}


def decode(tok, ids, skip=True) -> str:
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def reference(tok, prompt, out, skip=True) -> str:
    """The output's text: what decoding prompt + output adds to the prompt's text (a "\ufffd" that ends the
    prompt's text, an incomplete character, is replaced when the output completes it)."""
    full, head = decode(tok, prompt + out, skip), decode(tok, prompt, skip)
    assert full.startswith(head) or head.endswith("\ufffd")
    return full[len(os.path.commonprefix([full, head])):]


def stream(tok, prompt, out, **kw) -> tuple[IncrementalDetokenizer, list[str]]:
    det = IncrementalDetokenizer(tok, prompt, **kw)
    deltas = [det.add(t) for t in out]
    deltas.append(det.flush())
    return det, deltas


def check_stream(tok, prompt, out, skip=True) -> None:
    refs = [reference(tok, prompt, out[:k], skip) for k in range(len(out) + 1)]
    det, so_far = IncrementalDetokenizer(tok, list(prompt), skip), ""
    for k, t in enumerate(out, 1):
        so_far += det.add(t)
        assert det.text == so_far
        assert all(r.startswith(so_far) for r in refs[k:]), (k, so_far, refs[k:])
    for k in range(len(out) + 1):  # stop after k tokens: streamed + flushed == full decode
        det, deltas = stream(tok, list(prompt), out[:k], skip_special_tokens=skip)
        assert "".join(deltas) == det.text == refs[k], (k, deltas, refs[k])


def byte_ids(tok, data: bytes) -> list[int]:
    """One single-byte token per byte (byte-level alphabet, or sentencepiece byte fallback)."""
    if tok is byte_level():
        return tok.convert_tokens_to_ids([bytes_to_unicode()[b] for b in data])
    return tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in data])


def pieces(tok) -> list[int]:
    """Token ids worth mixing: the byte / multi-byte pieces of TEXT, some ASCII ones, the special tokens."""
    ids = sorted(set(tok.encode(TEXT[:200], add_special_tokens=False)))
    if tok is llama_style():
        ids += tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in (0x41, 0x80, 0x9F, 0xBD, 0xC3, 0xE4, 0xF0, 0xFF)])
    return ids + [tok.eos_token_id] + ([tok.bos_token_id] if tok.bos_token_id is not None else [])


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_random_sequences_match_full_decode(name, skip):
    tok, rng = TOKENIZERS[name](), random.Random(0)
    pool = pieces(tok)
    prompts = [[], tok.encode("The quick brown")]  # (a prompt ending in a byte token could be changed by the output)
    for i in range(12):
        out = [rng.choice(pool) if rng.random() < 0.7 else rng.randrange(len(tok)) for _ in range(rng.randint(1, 18))]
        check_stream(tok, prompts[i % 2], out, skip)


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_adversarial_sequences(name):
    tok = TOKENIZERS[name]()
    enc = functools.partial(tok.encode, add_special_tokens=False)
    prompt = tok.encode("fox jumps")
    multi = enc(" 你好 🙂🚀 wörld")
    cases = [
        multi,                                   # characters split over tokens
        multi[::-1],                             # lead bytes after continuation bytes
        multi[:-1] + enc(" ok") + multi[-1:],    # character cut mid-sequence, then text, then a stray byte
        multi[1:] + multi[:1] + enc("x"),        # starts with continuation bytes, ends with a lone lead byte
        multi[:2] * 6 + enc("!"),                # repeated truncated sequences
        [tok.eos_token_id] + multi + [tok.eos_token_id] + multi[:1] + [tok.eos_token_id],
    ]
    for out in cases:
        for skip in (True, False):
            check_stream(tok, prompt, out, skip)


@pytest.mark.parametrize("name", ["byte_level", "llama_style"])
def test_byte_soup(name):
    """One token per byte: valid, truncated and invalid UTF-8, mixed with words and EOS."""
    tok, rng = TOKENIZERS[name](), random.Random(1)
    words = tok.encode(" ok", add_special_tokens=False) + [tok.eos_token_id]
    explicit = [
        b"\x80" * 4 + "🙂".encode() + b"\xf0" + "🙂".encode()[1:] + b"ok",  # invalid bytes, then 4-byte characters
        b"\x80" * 3 + "🙂".encode()[:3] + b"\x80" + b"!",
        b"A\x80 " + "你".encode()[:2] + b"\xff" + "é".encode(),
    ]
    cases = [byte_ids(tok, d) for d in explicit]
    cases.append(byte_ids(tok, b"A") + [tok.eos_token_id] + byte_ids(tok, b"\x80") + words)  # EOS inside a byte run
    for _ in range(12):
        out = []
        while len(out) < 24:
            c, r = rng.choice("aé你🙂").encode(), rng.random()
            data = (c if r < 0.4 else c[:rng.randrange(1, len(c))] if r < 0.6 and len(c) > 1
                    else bytes([rng.randrange(0x80, 0xC0)]) if r < 0.75 else b"\xff" if r < 0.8 else b"")
            out += byte_ids(tok, data) if data else [rng.choice(words)]
        cases.append(out)
    for out in cases:
        for skip in (True, False):
            check_stream(tok, tok.encode("fox jumps"), out, skip)


def test_multibyte_never_streams_replacement_char():
    tok = byte_level()
    ids = tok.encode("héllo wörld 你好 🙂🚀")
    assert any(decode(tok, [i]) == "\ufffd" for i in ids)  # the tokenizer really splits characters
    det, deltas = stream(tok, [], ids)
    assert "".join(deltas) == "héllo wörld 你好 🙂🚀" and not any("\ufffd" in d for d in deltas)
    assert EMOJI in deltas or any(d.endswith(EMOJI) for d in deltas)  # the whole character in one delta


def test_invalid_bytes_do_not_stall_the_stream():
    tok = byte_level()
    cont = byte_ids(tok, b"\x80")[0]  # a lone continuation byte
    det = IncrementalDetokenizer(tok, [])
    deltas = [det.add(cont) for _ in range(200)]
    assert "".join(deltas) == "\ufffd" * 197  # released once it is certainly invalid (3 bytes later)
    assert len(det._ids) < 10  # the decode window stays bounded
    assert "".join(deltas) + det.flush() == decode(tok, [cont] * 200)
    # ... but not too early: skipped tokens carry no bytes; a token may complete one character and begin another
    b = functools.partial(byte_ids, tok)
    eos = tok.eos_token_id
    check_stream(tok, [], b(b"\x80\xf0") + [eos] * 3 + b(b"\x9f\x99\x82") + [eos, eos] + b(b"\x80ok"))
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()), eos_token=EOS)
    tok.add_tokens([AddedToken("".join(bytes_to_unicode()[c] for c in b"\x82\xf0"), normalized=False)])
    check_stream(tok, [], b(b"\x80\xf0\x9f\x99") + [len(tok) - 1] + b(b"\x9f\x99\x82ok"))


@pytest.mark.parametrize("name", ["byte_level", "llama_style"])
def test_prompt_ending_inside_a_character(name):
    """A character the prompt leaves incomplete ("\ufffd" in its decode) is output text if the output completes it."""
    tok = TOKENIZERS[name]()
    ids = tok.encode("ok 你好你好 🚀!")
    cuts = [k for k in range(len(ids)) if decode(tok, ids[:k]).endswith("\ufffd")]
    assert len(cuts) >= 3
    other = tok.encode(" ok", add_special_tokens=False)
    for k in cuts:
        for out in (ids[k:], other, []):
            det, _ = stream(tok, ids[:k], out)
            assert det.text == reference(tok, ids[:k], out) and "\ufffd" not in det.text
    assert stream(tok, ids[:cuts[-1]], ids[cuts[-1]:])[0].text == "🚀!"


@pytest.mark.parametrize("name", ["llama_style", "metaspace"])
def test_space_after_prompt(name):
    tok = TOKENIZERS[name]()
    ids = tok.encode("The quick brown fox")
    assert ids[0] == tok.bos_token_id
    k = next(k for k in range(len(ids)) if decode(tok, ids[:k]) == "The quick")
    assert decode(tok, ids[k:]) == "brown fox"  # decoding the output alone loses the space
    det, _ = stream(tok, ids[:k], ids[k:])
    assert det.text == " brown fox"
    det, _ = stream(tok, [tok.bos_token_id], ids[1:])  # right after BOS there is no space
    assert det.text == "The quick brown fox"
    det, _ = stream(tok, [tok.bos_token_id], ids[1:], skip_special_tokens=False)
    assert det.text == reference(tok, [tok.bos_token_id], ids[1:], skip=False)
    long_prompt = tok.encode("The quick") + [tok.eos_token_id] * 10  # context of only skipped tokens
    det, _ = stream(tok, long_prompt, ids[k:])
    assert det.text == reference(tok, long_prompt, ids[k:]) == " brown fox"


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_skip_special_tokens_with_eos_in_the_middle(name):
    tok = TOKENIZERS[name]()
    enc = functools.partial(tok.encode, add_special_tokens=False)
    prompt, out = tok.encode("fox"), enc(" quick") + [tok.eos_token_id] + enc(" brown")
    det, _ = stream(tok, prompt, out)
    assert tok.eos_token not in det.text and det.text.replace(" ", "") == "quickbrown"
    assert det.text == reference(tok, prompt, out)
    det, _ = stream(tok, prompt, out, skip_special_tokens=False)
    assert tok.eos_token in det.text and det.text == reference(tok, prompt, out, skip=False)


# ---- stop strings (byte-level tokenizer: its decode of the output alone is the plain text)

def run_stop(text, stop, include=False, tok=None):
    tok = tok or byte_level()
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok, [], stop=stop, include_stop_str_in_output=include)
    streamed, fed = "", 0
    for t in ids:
        if det.stopped:
            assert det.add(t) == ""
            continue
        streamed += det.add(t)
        fed += 1
        if not det.stopped:  # held back: exactly the longest suffix that could begin a stop string
            full = decode(tok, ids[:fed])
            held = 0 if include else max(k for s in stop for k in range(len(s)) if full.endswith(s[:k]))
            assert streamed == full[:len(full) - held] or full.endswith("\ufffd"), (streamed, full)
    streamed += det.flush()
    assert streamed == det.text
    return det, ids, fed


def test_stop_string_spanning_tokens():
    det, ids, fed = run_stop("The quick brown fox jumps over", ["brown fox"])
    assert [decode(byte_level(), [i]) for i in ids[4:8]] == [" ", "br", "ow", "n"]  # it spans 4+ tokens
    assert det.stopped and det.text == "The quick " and fed < len(ids)
    det, *_ = run_stop("The quick brown fox jumps over", ["brown fox"], include=True)
    assert det.text == "The quick brown fox"
    det, *_ = run_stop("The quick brown fox jumps over", ["ox j"])  # stop ends inside a token
    assert det.text == "The quick brown f"


def test_stop_string_at_start_and_false_starts():
    det, *_ = run_stop("The quick brown fox", ["The"])
    assert det.stopped and det.text == ""
    det, *_ = run_stop("The quick brown fox", ["brown cow"])  # "brown " held back, then released
    assert not det.stopped and det.text == "The quick brown fox"
    det, *_ = run_stop("The quick bro", ["brown"])  # held back at the end; flush releases it
    assert not det.stopped and det.text == "The quick bro"


def test_two_stop_strings_first_occurrence_wins():
    for stop in (["lazy", "fox"], ["fox", "lazy"]):
        det, *_ = run_stop("The quick brown fox jumps over the lazy dog", stop)
        assert det.text == "The quick brown "
    det, *_ = run_stop("The quick brown fox", ["k brown fox", "brown"])  # completes first
    assert det.text == "The quick "
    for stop in (["own", "brown"], ["brown", "own"]):  # complete at the same character: the longer one
        det, *_ = run_stop("The quick brown fox", stop)
        assert det.text == "The quick "
    assert decode(byte_level(), byte_level().encode("The")[:1]) == "The"
    for stop in (["e", "Th"], ["Th", "e"]):  # both in one token's text: the one complete first
        det, *_ = run_stop("The quick brown fox", stop)
        assert det.stopped and det.text == ""


def test_stop_string_with_multibyte_characters():
    det, *_ = run_stop("héllo wörld 你好 🙂🚀 ok", ["🙂🚀"])
    assert det.text == "héllo wörld 你好 "
    det, *_ = run_stop("héllo wörld 你好 🙂🚀 ok", ["好 🙂"], include=True)
    assert det.text == "héllo wörld 你好 🙂"
    tok = llama_style()
    ids = tok.encode("fox 你好 🙂🚀 ok")
    assert decode(tok, ids[:3]) == "fox"
    det = IncrementalDetokenizer(tok, ids[:3], stop=[" 🙂"])
    text = "".join(det.add(t) for t in ids[3:]) + det.flush()
    assert det.stopped and text == det.text == " 你好"
