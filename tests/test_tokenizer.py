"""The engine's tokenizer gives the ids AutoTokenizer gives for its checkpoint (issue 18 part 5).

transformers 5 picks some tokenizer classes by the model's config, which an engine does not carry: for a
Qwen2 checkpoint whose tokenizer_config.json says TokenizersBackend, AutoTokenizer(checkpoint) is Qwen2's
(digits one by one) and AutoTokenizer(engine/tokenizer) was not. The engine records the class.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

import llmc
from llmc.engine import CONFIG, EngineError, load_tokenizer

TEXTS = [
    "x = 1",
    "total = 12345 + 678 * 90.25 - 1,000,000",
    "tabs\t\tand   runs of    spaces\n\n\n  indented\r\n",
    "héllo wörld, ñandú, Ελληνικά, русский, 日本語のテキスト, 😀👍🏽",
    "def f(n):\n    return n ** 2  # 2024-12-07T03:20:00Z",
]


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2", "phi3_longrope"])
def test_engine_tokenizer_gives_the_checkpoints_ids(arch, checkpoints, tmp_path):
    engine = llmc.build(checkpoints[arch], tmp_path / "engine", max_seq_len=32, log=lambda _: None)
    reference = AutoTokenizer.from_pretrained(checkpoints[arch])
    tokenizer = load_tokenizer(engine)
    assert type(tokenizer) is type(reference)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == reference(text)["input_ids"], text
        assert tokenizer.decode(reference(text)["input_ids"]) == reference.decode(reference(text)["input_ids"])
    if arch == "qwen2":  # the case that differed: the files alone give another tokenizer (digits not split)
        files_only = AutoTokenizer.from_pretrained(engine / "tokenizer")
        assert files_only(TEXTS[1])["input_ids"] != reference(TEXTS[1])["input_ids"]


def test_a_tokenizer_class_that_is_not_transformers_is_refused(llama_engine_copy):
    engine = llama_engine_copy
    config = json.loads((engine / CONFIG).read_text())
    config["tokenizer_class"] = "Popen"
    (engine / CONFIG).write_text(json.dumps(config))
    with pytest.raises(EngineError, match="tokenizer_class 'Popen' is not a tokenizer class"):
        load_tokenizer(engine)
