"""A hostile engine: every edit of config.json, a program, the weights or the file layout is refused with an
EngineError naming the field or file, before the engine runs. Where a test edits a file it also updates the
file's size and SHA-256 in config.json (which an attacker controls as well), so that the rule under test, not
the checksum, is what refuses it."""

from __future__ import annotations

import copy
import json
import re
import shutil
import struct
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file, save_file

import llmc.engine as engine_module
from llmc import LLM
from llmc.engine import EngineConfig, EngineError, file_digest, verify_files

PROGRAM, WEIGHTS = "rank0/program.json", "rank0/weights.safetensors"


@pytest.fixture(scope="module")
def engine(llama_engine) -> Path:
    return llama_engine


@pytest.fixture
def copied(llama_engine_copy) -> Path:
    return llama_engine_copy


def read_config(engine_dir: Path) -> dict:
    return json.loads((engine_dir / "config.json").read_text())


def write_config(engine_dir: Path, raw: dict) -> None:
    (engine_dir / "config.json").write_text(json.dumps(raw))


def rehash(engine_dir: Path) -> None:
    """Record the current size and SHA-256 of every listed file that exists."""
    raw = read_config(engine_dir)
    for rel in raw["files"]:
        if (engine_dir / rel).is_file():
            raw["files"][rel] = file_digest(engine_dir / rel)
    write_config(engine_dir, raw)


def load(engine_dir: Path) -> None:
    """Everything loading does: the config, the files, the ranks' programs and weights."""
    LLM(engine_dir).shutdown()


def assert_refused(engine_dir: Path, match: str) -> None:
    with pytest.raises(EngineError, match=match):
        load(engine_dir)


def test_untouched_copy_loads(copied):
    load(copied)


# config.json

def set_at(raw: dict, path: str | tuple, value) -> None:
    *parents, last = path.split(".") if isinstance(path, str) else path
    for key in parents:
        raw = raw[int(key)] if isinstance(raw, list) else raw[key]
    raw[int(last) if isinstance(raw, list) else last] = value


BAD_VALUES = [
    ("mapping.tp", "2", r"mapping\.tp: Input should be a valid integer"),
    ("mapping.tp", 2.0, r"mapping\.tp: Input should be a valid integer"),
    ("mapping.tp", True, r"mapping\.tp: Input should be a valid integer"),
    ("mapping.pp", 0, r"mapping\.pp: Input should be greater than or equal to 1"),
    ("mapping", {"tp": 1024, "pp": 1024, "pp_layers": [2]}, r"mapping tp=1024 x pp=1024 is more than 1024 ranks"),
    ("mapping.pp_layers", [1], r"pp_layers \[1\] must be 1 stages holding kv_cache.num_layers=2"),
    ("limits", "big", r"limits: Input should be a valid dictionary"),
    ("limits.max_seq_len", 1e12, r"limits\.max_seq_len: Input should be a valid integer"),
    ("limits.max_seq_len", -5, r"limits\.max_seq_len: Input should be greater than or equal to 2"),
    ("limits.max_seq_len", 1 << 40, r"limits\.max_seq_len: Input should be less than or equal to"),
    ("limits.max_batch_tokens", 0, r"limits\.max_batch_tokens"),
    ("limits.max_num_seqs", 1 << 30, r"limits\.max_num_seqs"),
    ("kv_cache.block_size", 0, r"kv_cache\.block_size: Input should be greater than or equal to 1"),
    ("kv_cache.num_layers", 1 << 20, r"kv_cache\.num_layers"),
    ("kv_cache.num_kv_heads", -1, r"kv_cache\.num_kv_heads"),
    ("kv_cache.head_dim", "16", r"kv_cache\.head_dim"),
    ("kv_cache.dtype", "float8_e5m2", r"kv_cache\.dtype: Input should be"),
    ("kv_cache.dtype", "float16", r"kv_cache.dtype float16 is not the engine's dtype float32"),
    ("ranks", [], r"ranks has 0 entries, but mapping tp=1 x pp=1 needs 1"),
    ("ranks", "rank0", r"ranks: Input should be a valid list"),
    ("ranks.0.kv_cache.num_layers", 1, r"ranks\[0\]\.kv_cache .* does not match"),
    ("ranks.0.kv_cache", None, r"ranks\[0\]\.kv_cache: Input should be"),
    ("ranks.0.pp_inputs", [{"name": "h", "shape": [1 << 20, 1 << 20], "dtype": "float32"}], r"ranks\[0\]\.pp_inputs\[0\]: bad shape"),
    ("ranks.0.pp_inputs", [{"name": "h", "shape": [-1, 0], "dtype": "float32"}], r"ranks\[0\]\.pp_inputs\[0\]: bad shape"),
    ("ranks.0.pp_inputs", [{"name": "h; import os", "shape": [-1], "dtype": "float32"}], r"ranks\[0\]\.pp_inputs\[0\]\.name"),
    ("ranks.0.pp_inputs", [{"name": "h", "shape": [-1], "dtype": "object"}], r"ranks\[0\]\.pp_inputs\[0\]\.dtype"),
    ("ranks.0.backend", None, r"ranks\[0\]\.backend: Input should be a valid dictionary"),
    ("vocab_size", 1 << 40, r"vocab_size: Input should be less than or equal to"),
    ("vocab_size", 0, r"vocab_size: Input should be greater than or equal to 1"),
    ("dtype", "float64", r"dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    ("backend", "pickle", r"backend: Input should be 'torch', 'onnx' or 'tensorrt'"),
    ("eos_token_ids", [1 << 40], r"eos_token_ids must be token ids in \[0, vocab_size=320\)"),
    ("eos_token_ids", 0, r"eos_token_ids: Input should be a valid list"),
    ("quantization", {"mode": "int3", "kv_cache_dtype": None, "exclude": [], "calibration": None}, r"quantization\.mode"),
    ("quantization", "fp8", r"quantization: Input should be"),
    ("files", [], r"files: Input should be a valid dictionary"),
    (("files", WEIGHTS), {"bytes": -1, "sha256": "0" * 64}, r"files\.rank0/weights\.safetensors\.bytes"),
    (("files", WEIGHTS), {"bytes": 1, "sha256": "not hex"}, r"files\.rank0/weights\.safetensors\.sha256"),
    ("kv_cache.dtype", "float8_e4m3fn", r"kv_cache.dtype float8_e4m3fn is not the engine's dtype float32"),
    ("passes", {}, r"passes: Input should be a valid list"),
    ("architecture", 7, r"architecture: Input should be a valid string"),
]


@pytest.mark.parametrize("path, value, match", BAD_VALUES, ids=[f"{'.'.join(p) if isinstance(p, tuple) else p}={v!r}"[:60] for p, v, _ in BAD_VALUES])
def test_bad_config_value_is_named(copied, path, value, match):
    raw = read_config(copied)
    set_at(raw, path, value)
    write_config(copied, raw)
    assert_refused(copied, match)


def test_schema_sets_are_the_builders():
    """The schema's fixed sets are written out (serving imports neither the frontend nor the passes): they must
    be what the builder writes."""
    from llmc.backends import BACKENDS
    from llmc.frontend.export import DTYPES
    from llmc.passes.quant_algos import QUANT_ALGOS
    from llmc.passes.quantize import QUANT_MODES
    from llmc.passes.quantize_kv_cache import KV_CACHE_DTYPES

    assert set(engine_module.BACKEND_NAMES) == set(BACKENDS) and set(engine_module.MODEL_DTYPES) == set(DTYPES)
    assert set(engine_module.QUANT_MODES) == set(QUANT_MODES) and set(KV_CACHE_DTYPES) == {"fp8"}
    assert engine_module.QUANT_ALGOS == QUANT_ALGOS


def test_kv_cache_of_absurd_size_is_refused(copied):
    raw = read_config(copied)
    raw["limits"]["max_seq_len"] = 1 << 20
    for kv in (raw["kv_cache"], raw["ranks"][0]["kv_cache"]):
        kv.update(num_layers=1000, num_kv_heads=64, head_dim=256)
    raw["mapping"]["pp_layers"] = [1000]
    write_config(copied, raw)
    assert_refused(copied, r"ranks\[0\]: one max_seq_len sequence's KV cache would take 128000 GiB")


@pytest.mark.parametrize("name", [f.name for f in fields(EngineConfig)])
def test_missing_field_is_named(copied, name):
    raw = read_config(copied)
    del raw[name]
    write_config(copied, raw)
    assert_refused(copied, f"schema version None|{name}: Field required")


@pytest.mark.parametrize("path", ["", "kv_cache.", "limits.", "mapping.", "ranks.0.", "ranks.0.kv_cache."])
def test_unknown_field_is_an_error(copied, path):
    """An engine of a newer llmc has a newer schema_version; an unknown field in this version is an error, not ignored."""
    raw = read_config(copied)
    set_at(raw, path + "surprise", 1)
    write_config(copied, raw)
    assert_refused(copied, re.escape(f"{path.replace('.0.', '[0].')}surprise: Extra inputs are not permitted"))


def test_free_form_records_take_any_json(copied):
    """What the builder records for people (build, the passes' records) is not read by the runtime."""
    raw = read_config(copied)
    raw["build"]["note"] = {"any": ["json", 1, None]}
    raw["passes"][0]["extra"] = 1
    write_config(copied, raw)
    load(copied)


def leaves(value, path=()):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, (*path, i))
    yield path


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_config_mutations_raise_only_engine_error(engine, data):
    """Any value anywhere in config.json: the engine's config loads, or EngineError; never another exception."""
    raw = read_config(engine)
    paths = sorted(leaves(raw), key=str)
    path = data.draw(st.sampled_from(paths))
    mutated = copy.deepcopy(raw)
    if not path:
        mutated = data.draw(JSON)
    else:
        target = mutated
        for key in path[:-1]:
            target = target[key]
        if data.draw(st.booleans(), label="delete") and isinstance(target, dict):
            del target[path[-1]]
        else:
            target[path[-1]] = data.draw(JSON)
    with tempfile.TemporaryDirectory() as tmp:
        engine_dir = shutil.copytree(engine, Path(tmp) / "engine")
        write_config(engine_dir, mutated)
        try:
            config = EngineConfig.load(engine_dir)
            verify_files(engine_dir, config)
        except EngineError:
            return
        load(engine_dir)  # a config that passes the schema runs


# program.json

def edit_program(engine_dir: Path, edit) -> None:
    program = json.loads((engine_dir / PROGRAM).read_text())
    edit(program["nodes"])
    (engine_dir / PROGRAM).write_text(json.dumps(program))
    rehash(engine_dir)


def call(name: str, target: str, *args, **kwargs) -> dict:
    return {"op": "call_function", "name": name, "target": target, "args": list(args), "kwargs": kwargs}


def insert_before_output(*nodes):
    def edit(program):
        program[-1:-1] = nodes
    return edit


def test_program_cannot_write_files(copied, tmp_path):
    """The attack of issue 16: aten.from_file maps a file shared, aten.fill_ writes it."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    created = tmp_path / "created.bin"
    edit_program(copied, insert_before_output(
        call("mapped", "aten.from_file.default", str(victim), True, 8, dtype={"dtype": "uint8"}),
        call("filled", "aten.fill_.Scalar", {"node": "mapped"}, 0),
        call("made", "aten.from_file.default", str(created), True, 8, dtype={"dtype": "uint8"}),
    ))
    assert_refused(copied, r"node #\d+ 'mapped': call target 'aten.from_file.default' is not allowed")
    assert victim.read_text() == "precious" and not created.exists()


@pytest.mark.parametrize("target", ["aten.nonexistent.default", "builtins.exec", "aten.empty.memory_format",
                                    "aten.set_.source_Storage", "llmc.prepacked_linear.default"])
def test_program_target_outside_the_allow_list_is_refused(copied, target):
    edit_program(copied, insert_before_output(call("bad", target, {"node": "input_ids"})))
    assert_refused(copied, rf"{PROGRAM}.*'bad': call target '{target}' is not allowed")


def test_bad_node_reference_is_named(copied):
    edit_program(copied, insert_before_output(call("bad", "aten.add.Tensor", {"node": "input_ids"}, {"node": "later"})))
    assert_refused(copied, r"'bad': refers to unknown or later node 'later'")


def test_huge_allocation_constant_is_refused(copied):
    edit_program(copied, insert_before_output(call("bomb", "aten.repeat_interleave.self_int", {"node": "input_ids"}, 1 << 40)))
    assert_refused(copied, r"'bomb': repeats=1099511627776 is out of range")


SIZE = {"node": "n"}  # aten.sym_size.int of input_ids: a symbolic size, which the program already has
HOSTILE_SIZES = [
    ("aten.repeat.default", [{"node": "input_ids"}, [1 << 40]], {}, r"repeats=\[1099511627776\] is out of range"),
    ("aten.repeat.default", [{"node": "input_ids"}, [1024, 1024, 1024]], {}, r"repeats=\[1024, 1024, 1024\] asks for more than"),
    ("aten.repeat.default", [{"node": "input_ids"}, [SIZE, -5]], {}, r"repeats=.* is out of range"),
    ("aten.repeat.default", [{"node": "input_ids"}, [2.5e9]], {}, r"repeats=\[2500000000.0\] is out of range"),
    ("aten.repeat.default", [{"node": "input_ids"}, [{"node": "input_ids"}]], {}, r"repeats refers to 'input_ids', which is not a tensor's size"),
    ("aten.repeat_interleave.self_int", [{"node": "input_ids"}, 2], {"output_size": 1 << 40}, r"output_size=1099511627776 is out of range"),
    ("aten.new_empty.default", [{"node": "input_ids"}, [1 << 40]], {}, r"size=\[1099511627776\] is out of range"),
    ("aten.expand.default", [{"node": "input_ids"}, [1 << 20, 1 << 20]], {}, r"size=\[1048576, 1048576\] asks for more than"),
]


@pytest.mark.parametrize("target, args, kwargs, match", HOSTILE_SIZES, ids=[f"{t}-{i}" for i, (t, *_) in enumerate(HOSTILE_SIZES)])
def test_hostile_size_in_a_sizing_op_is_refused(copied, target, args, kwargs, match):
    edit_program(copied, insert_before_output(call("n", "aten.sym_size.int", {"node": "input_ids"}, 0),
                                              call("bomb", target, *args, **kwargs)))
    assert_refused(copied, rf"'bomb': {match}")


def test_bounded_sizing_ops_load(copied):
    """The same ops with sizes within their bounds, symbolic or constant, load (the bounds are not a blanket ban)."""
    edit_program(copied, insert_before_output(call("n", "aten.sym_size.int", {"node": "input_ids"}, 0),
                                              call("r", "aten.repeat.default", {"node": "input_ids"}, [SIZE, 3]),
                                              call("i", "aten.repeat_interleave.self_int", {"node": "input_ids"}, SIZE)))
    load(copied)


def first_weight(program) -> str:
    return next(n["name"] for n in program if n["op"] == "get_attr")


@pytest.mark.parametrize("view", [None, "aten.alias.default", "aten.slice.Tensor", "aten.type_as.default"])
@pytest.mark.parametrize("target", ["aten.add_.Tensor", "aten.div_.Tensor", "aten.copy_.default", "aten.scatter_.value"])
def test_in_place_op_on_a_weight_or_input_is_refused(copied, target, view):
    """In-place ops may write intermediates only: never a weight or an input, directly or through a view."""
    def edit(program):
        for source in (first_weight(program), "input_ids"):
            dest = source
            if view is not None:
                args = [{"node": source}] + ([{"node": source}] if view == "aten.type_as.default" else [])
                program[-1:-1] = [call(f"v_{source}", view, *args)]
                dest = f"v_{source}"
            args = (0, {"node": "input_ids"}, 1.0) if target == "aten.scatter_.value" else ({"node": dest},)
            program[-1:-1] = [call(f"w_{source}", target, {"node": dest}, *args)]
    edit_program(copied, edit)
    assert_refused(copied, rf"'w_\w+': {re.escape(target)} writes into '\w+', which is not an intermediate result")


def attention_nodes(program):
    return [n for n in program if n["target"] == "llmc.paged_attention.default"]


@pytest.mark.parametrize("layer", [2, -1, 1 << 40, True])
def test_attention_layer_out_of_range_is_refused(copied, layer):
    edit_program(copied, lambda program: attention_nodes(program)[0]["args"].__setitem__(4, layer))
    assert_refused(copied, rf"{PROGRAM}: node '\w+' reads layer {layer!r} of a KV cache of 2 layers")


def test_attention_over_another_tensor_is_refused(copied):
    edit_program(copied, lambda program: attention_nodes(program)[0]["args"].__setitem__(3, {"node": "input_ids"}))
    assert_refused(copied, r"attends over input_ids, not the kv_cache input")


# weights.safetensors

def edit_bytes(engine_dir: Path, edit) -> None:
    path = engine_dir / WEIGHTS
    path.write_bytes(edit(path.read_bytes()))
    rehash(engine_dir)


@pytest.mark.parametrize("edit", [
    lambda data: data[: len(data) // 2],  # truncated
    lambda data: struct.pack("<Q", 1 << 62) + data[8:],  # header length past the file
    lambda data: data[:8] + b"{garbage" + data[16:],  # header JSON garbage
], ids=["truncated", "header-length", "header-json"])
def test_corrupt_weights_are_named(copied, edit):
    edit_bytes(copied, edit)
    assert_refused(copied, rf"cannot load .*{WEIGHTS}: ")


def edit_weights(engine_dir: Path, edit) -> None:
    weights = load_file(engine_dir / WEIGHTS)
    edit(weights)
    save_file(weights, engine_dir / WEIGHTS)
    rehash(engine_dir)


@pytest.mark.parametrize("edit", [
    lambda w: w.update({"model.layers.0.self_attn.o_proj.weight": w["model.layers.0.self_attn.o_proj.weight"][:, :7].contiguous()}),
    lambda w: w.update({"model.layers.0.mlp.down_proj.weight": w["model.layers.0.mlp.down_proj.weight"].double()}),
    # Read by C++ kernels, which must check sizes themselves: a short weight would be read past its end.
    lambda w: w.update({"model.norm.weight": w["model.norm.weight"][:7].contiguous()}),
    lambda w: w.update({"model.layers.1.input_layernorm.weight": w["model.layers.1.input_layernorm.weight"][:7].contiguous()}),
    lambda w: w.update({"model.layers.0.mlp.gate_proj.weight_merged": w["model.layers.0.mlp.gate_proj.weight_merged"][:, :7].contiguous()}),
], ids=["shape", "dtype", "norm-shape", "add-norm-shape", "gated-linear-shape"])
def test_weight_of_wrong_shape_or_dtype_is_named(copied, edit):
    edit_weights(copied, edit)
    assert_refused(copied, r"rank0: the program fails on a one-token step")


def test_unread_and_missing_weights_are_named(copied):
    edit_weights(copied, lambda w: w.update(extra=torch.zeros(2)))
    assert_refused(copied, r"does not hold exactly the weights .* reads: it lacks \[\], and has unread \['extra'\]")
    edit_weights(copied, lambda w: w.pop("model.norm.weight"))
    assert_refused(copied, r"it lacks \['model.norm.weight'\]")


# Paths

@pytest.mark.parametrize("rel", ["/etc/passwd", "../outside", "rank0/../../outside", "rank0//program.json",
                                 "./rank0/program.json", "rank0\\program.json", ""])
def test_file_path_outside_the_engine_is_refused(copied, rel):
    raw = read_config(copied)
    raw["files"][rel] = file_digest(Path("/etc/passwd"))
    write_config(copied, raw)
    assert_refused(copied, re.escape(f"files: {rel!r} is not a relative path inside the engine directory"))


def test_symlink_out_of_the_engine_is_refused(copied, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copy(copied / "tokenizer/tokenizer_config.json", outside)  # same bytes: the digest matches
    (copied / "tokenizer/tokenizer_config.json").unlink()
    (copied / "tokenizer/tokenizer_config.json").symlink_to(outside)
    assert_refused(copied, r"tokenizer_config\.json leads outside the engine directory")


def test_missing_listed_file_is_named(copied):
    (copied / "tokenizer/tokenizer_config.json").unlink()
    assert_refused(copied, r"engine file .*tokenizer_config\.json is missing")


@pytest.mark.parametrize("rel", [PROGRAM, WEIGHTS])
def test_unlisted_rank_file_is_named(copied, rel):
    raw = read_config(copied)
    del raw["files"][rel]
    write_config(copied, raw)
    assert_refused(copied, rf"files must list exactly the engine's files; missing {rel}")


def test_empty_file_list_is_refused(copied):
    """issue 16: `files: {}` made a corrupted weights file load."""
    edit_bytes(copied, lambda data: data[:-1] + bytes([data[-1] ^ 0xFF]))
    raw = read_config(copied)
    raw["files"] = {}
    write_config(copied, raw)
    assert_refused(copied, r"missing rank0/program\.json; missing rank0/weights\.safetensors; missing tokenizer/")


@pytest.mark.parametrize("rel", ["rank0/extra.bin", "rank1/program.json", "tokenizer/tokenizer.py", "notes.txt"])
def test_listed_file_no_engine_has_is_refused(copied, rel):
    (copied / rel).parent.mkdir(exist_ok=True)
    (copied / rel).write_text("x")
    raw = read_config(copied)
    raw["files"][rel] = file_digest(copied / rel)
    write_config(copied, raw)
    assert_refused(copied, rf"unexpected {rel}")


def test_unlisted_tokenizer_file_is_refused(copied):
    """The tokenizer loader reads whatever tokenizer/ holds: only listed files may be there."""
    (copied / "tokenizer/special_tokens_map.json").write_text("{}")
    assert_refused(copied, r"special_tokens_map\.json is not in the engine's file list")


def test_tokenizer_remote_code_is_never_run(copied, monkeypatch):
    """A tokenizer config that names custom code (auto_map) neither runs it nor asks whether to."""

    def ask(*_):
        raise AssertionError("the tokenizer loader asked whether to run the engine's code")

    monkeypatch.setattr("builtins.input", ask)
    config = json.loads((copied / "tokenizer/tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (copied / "tokenizer/tokenizer_config.json").write_text(json.dumps(config))
    rehash(copied)
    load(copied)  # the tokenizer.json it has; trusting the code would look for tokenizer/evil.py and fail


# ONNX engines

@pytest.fixture(scope="module")
def onnx_engine(llama_onnx_engine) -> Path:
    return llama_onnx_engine


def test_onnx_rank_files_are_required(onnx_engine, tmp_path):
    copied = shutil.copytree(onnx_engine, tmp_path / "engine")
    raw = read_config(copied)
    assert {"rank0/model.onnx", "rank0/model.onnx.data"} <= raw["files"].keys()
    del raw["files"]["rank0/model.onnx"]
    write_config(copied, raw)
    assert_refused(copied, r"missing rank0/model\.onnx")


def test_onnx_external_data_outside_the_engine_is_refused(onnx_engine, tmp_path):
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    copied = shutil.copytree(onnx_engine, tmp_path / "engine")
    outside = shutil.copy(copied / "rank0/model.onnx.data", tmp_path / "outside.data")
    model = onnx.load(str(copied / "rank0/model.onnx"), load_external_data=False)
    for tensor in filter(uses_external_data, _get_all_tensors(model)):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = str(outside)
    onnx.save(model, str(copied / "rank0/model.onnx"))
    rehash(copied)
    assert_refused(copied, rf"model\.onnx: tensor '.*' reads its data from '{re.escape(str(outside))}', not model\.onnx\.data")


@pytest.mark.parametrize("edit, match", [
    (lambda raw: raw.update(backend="tensorrt") or raw["ranks"][0]["backend"].update(
        tensorrt=[{"engine": "model.engine", "package": "antigravity", "version": "1", "target": "sm_90"}]),
     r"tensorrt\[0\]\.package: Input should be 'tensorrt' or 'tensorrt_rtx'"),
    (lambda raw: raw["ranks"][0]["backend"]["program"].append(
        {"collective": "llmc::all_gather", "input": "logits", "output": "x", "args": {"size": 1}}),
     r"llmc::all_gather takes the arguments \['full_size'\], not \['size'\]"),
    (lambda raw: raw["ranks"][0]["backend"]["program"].append({"onnx": "../../model.onnx"}),
     r"program\[1\]"),
], ids=["tensorrt-package", "collective-args", "onnx-path"])
def test_onnx_backend_record_is_checked(onnx_engine, tmp_path, edit, match):
    """The runner imports the TensorRT package a record names, calls its collectives with the record's
    arguments, and opens its models: a record names only what llmc writes."""
    copied = shutil.copytree(onnx_engine, tmp_path / "engine")
    raw = read_config(copied)
    edit(raw)
    write_config(copied, raw)
    with pytest.raises(EngineError, match=match):
        EngineConfig.load(copied)
