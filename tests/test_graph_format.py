import json
import math
import operator

import pytest
import torch
import torch.fx

from llmc.backends.allowed_ops import PROGRAM_OPS
from llmc.backends.graph_format import MAX_REPEATS, GraphFormatError, graph_from_json, graph_to_json

torch.set_num_threads(1)

ARCHS = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512, bos_token_id=0, eos_token_id=0),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     rotary_pct=0.5),
}


def _decode(doc, **kwargs):
    """graph_from_json with every target `doc` calls allowed: these tests are of the format, not of llmc's allow-list."""
    allowed = {n.get("target") for n in doc.get("nodes", []) if isinstance(n, dict) and n.get("op") == "call_function"}
    return graph_from_json(doc, allowed=frozenset(allowed), **kwargs)


class Step(torch.nn.Module):
    def __init__(s, m):
        super().__init__()
        s.m = m

    def forward(s, input_ids, position_ids, logits_indices):
        return s.m(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                   logits_to_keep=logits_indices).logits


def _export_graph_module(arch):
    """HF model -> torch.export -> plain GraphModule whose weights are get_attr nodes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, vocab_size=128, **ARCHS[arch])
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    T = torch.export.Dim("T", min=2, max=512)
    S = torch.export.Dim("S", min=1, max=64)
    ids = torch.randint(0, 128, (1, 8))
    ep = torch.export.export(Step(model).eval(), (ids, torch.arange(8)[None], torch.tensor([3, 7])),
                             dynamic_shapes=({1: T}, {1: T}, {0: S}), strict=False)
    sig = ep.graph_signature
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}

    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(ep.graph, {}))
    root = torch.nn.Module()
    for ph in [n for n in graph.nodes if n.op == "placeholder" and n.name in lifted]:
        fqn = lifted[ph.name]
        tensor = ep.state_dict[fqn] if fqn in ep.state_dict else ep.constants[fqn]
        setattr(root, ph.name, torch.nn.Parameter(tensor.detach(), requires_grad=False)
                if isinstance(tensor, torch.nn.Parameter) else tensor)
        with graph.inserting_before(ph):
            ga = graph.get_attr(ph.name)
        ph.replace_all_uses_with(ga)
        graph.erase_node(ph)
    for n in list(graph.nodes):
        if n.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(n)
    gm = torch.fx.GraphModule(root, graph)
    gm.graph._codegen = torch.fx.graph.CodeGen()
    gm.recompile()
    return gm


def _roundtrip(graph, device="cpu"):
    text = json.dumps(graph_to_json(graph), allow_nan=False)
    return _decode(json.loads(text), device=device)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_hf_roundtrip_bitwise(arch):
    gm = _export_graph_module(arch)
    graph2 = _roundtrip(gm.graph)
    gm2 = torch.fx.GraphModule(gm, graph2)  # copies the get_attr attributes from gm
    assert [n.name for n in graph2.nodes] == [n.name for n in gm.graph.nodes]
    assert {n.target for n in graph2.nodes if n.op == "get_attr"} == \
        {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    # the format is a fixed point
    assert graph_to_json(graph2) == graph_to_json(gm.graph)
    with torch.no_grad():
        for t in (1, 5, 17):
            ids = torch.randint(0, 128, (1, t), generator=torch.Generator().manual_seed(t))
            args = (ids, torch.arange(t)[None], torch.tensor([t - 1]))
            ref, out = gm(*args), gm2(*args)
            ref = ref[0] if isinstance(ref, (tuple, list)) else ref
            out = out[0] if isinstance(out, (tuple, list)) else out
            assert ref.shape == (1, 1, 128)
            assert torch.equal(ref, out)


def _small_graph():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    w = g.get_attr("w")
    n = g.call_function(torch.ops.aten.sym_size.int, (x, 0))
    n2 = g.call_function(operator.mul, (n, 2))
    ar = g.call_function(torch.ops.aten.arange.default, (n2,),
                         dict(dtype=torch.float32, layout=torch.strided, device=torch.device("cpu"),
                              pin_memory=False))
    full = g.call_function(torch.ops.aten.full.default, ([2, 2], float("-inf")),
                           dict(dtype=torch.float32, device=torch.device("cpu")))
    nan = g.call_function(torch.ops.aten.full.default, ([1], float("nan")), dict(device=torch.device("cpu")))
    c = g.call_function(torch.ops.aten.clone.default, (x,), dict(memory_format=torch.contiguous_format))
    s = g.call_function(torch.ops.aten.split.Tensor, (c, 1))
    first = g.call_function(operator.getitem, (s, 0))
    add = g.call_function(torch.ops.aten.add.Tensor, (first, w), dict(alpha=0.5))
    g.output((add, ar, full, nan, [n, None, True, "s"]))
    return g


def test_small_graph_values_and_device_replacement():
    g = _small_graph()
    obj = graph_to_json(g)
    text = json.dumps(obj, allow_nan=False)
    assert '{"float": "-inf"}' in text and '{"float": "nan"}' in text
    assert '"aten.sym_size.int"' in text and '"operator.mul"' in text and '"operator.getitem"' in text
    g2 = _decode(json.loads(text), device="meta")
    nodes = {n.name: n for n in g2.nodes}
    assert nodes["arange_default"].kwargs == dict(dtype=torch.float32, layout=torch.strided,
                                          device=torch.device("meta"), pin_memory=False)
    assert nodes["full_default"].kwargs["device"] == torch.device("meta")
    assert nodes["full_default"].args[1] == -math.inf
    assert math.isnan(nodes["full_default_1"].args[1])
    assert nodes["clone_default"].kwargs["memory_format"] is torch.contiguous_format
    assert nodes["mul"].target is operator.mul
    assert nodes["getitem"].target is operator.getitem
    assert nodes["add_tensor"].kwargs == {"alpha": 0.5}
    out = nodes["output"].args[0]
    assert isinstance(out, tuple) and out[4] == [nodes["sym_size_int"], None, True, "s"]

    # runs, and decoding with device="cpu" keeps cpu
    root = torch.nn.Module()
    root.w = torch.ones(3, 3)
    gm = torch.fx.GraphModule(root, _decode(obj, device="cpu"))
    res = gm(torch.full((3, 3), 2.0))
    assert torch.equal(res[0], torch.full((3, 3), 2.5)) and res[1].shape == (6,)
    assert res[2].device.type == "cpu" and torch.isinf(res[2]).all()


def _one_call(target, args=(), kwargs=None):
    return {"format": "llmc.fx/1", "nodes": [
        {"op": "placeholder", "name": "x", "target": "x", "args": [], "kwargs": {}},
        {"op": "call_function", "name": "y", "target": target, "args": args, "kwargs": kwargs or {}},
        {"op": "output", "name": "output", "target": "output", "args": [{"node": "y"}], "kwargs": {}},
    ]}


def test_valid_minimal():
    g = _decode(_one_call("aten.relu.default", [{"node": "x"}]))
    assert [n.target for n in g.nodes][1] is torch.ops.aten.relu.default


@pytest.mark.parametrize("target", ["aten.definitely_not_an_op.default", "aten.add.NoSuchOverload",
                                    "llmc.definitely_not_an_op.default"])
def test_unknown_op(target):
    with pytest.raises(GraphFormatError, match=r"unknown op .*rebuild"):
        _decode(_one_call(target, [{"node": "x"}]))


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "builtins.eval.default",
                                    "torch.load", "operator.attrgetter", "aten.add", "aten.__class__.x"])
def test_disallowed_target(target):
    with pytest.raises(GraphFormatError, match="not allowed"):
        graph_from_json(_one_call(target, ["echo hi"]))


@pytest.mark.parametrize("value", [{"dtype": "bogus"}, {"dtype": "Tensor"}, {"dtype": "float"},
                                   {"layout": "float32"}, {"memory_format": "__dict__"},
                                   {"float": "1e9"}, {"node": "nope"}, {"node": ["x"]},
                                   {"tuple": [1], "dtype": "float32"}, {"module": "os"}])
def test_bad_values(value):
    with pytest.raises(GraphFormatError, match=r"node #1 'y': (bad value|unknown torch|refers to)"):
        _decode(_one_call("aten.zeros.default", [[2]], {"dtype": value}))


def test_bad_documents():
    with pytest.raises(GraphFormatError, match="not an llmc.fx/1 graph"):
        _decode({"format": "llmc.fx/2", "nodes": []})
    bad = _one_call("aten.relu.default", [{"node": "x"}])
    bad["nodes"][1]["op"] = "call_module"
    with pytest.raises(GraphFormatError, match="malformed"):
        _decode(bad)
    bad = _one_call("aten.relu.default", [{"node": "x"}])
    bad["nodes"][1]["name"] = "x"
    with pytest.raises(GraphFormatError, match="duplicate"):
        _decode(bad)


def test_encode_rejects_unsupported():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(torch.ops.aten.add.Tensor, (x, torch.ones(1))))
    with pytest.raises(GraphFormatError, match="node 'add_tensor': cannot encode value of type Tensor"):
        graph_to_json(g)
    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(torch.nn.functional.relu, (x,)))
    with pytest.raises(GraphFormatError, match="node 'relu'.*not an OpOverload"):
        graph_to_json(g)


def _doc(*nodes):
    return {"format": "llmc.fx/1", "nodes": list(nodes)}


def _node(op, name, target, args=(), kwargs=None):
    return {"op": op, "name": name, "target": target, "args": list(args), "kwargs": kwargs or {}}


OUT_X = _node("output", "output", "output", [{"node": "x"}])


@pytest.mark.parametrize("doc, match", [
    # fx pastes these strings into the Python source it generates and execs
    (_doc(_node("placeholder", "x", "x=print('pwned')"), OUT_X), "invalid placeholder target"),
    (_doc(_node("placeholder", "x", "x"), _node("get_attr", "w", 'a"),print("pwned"),("'),
          _node("output", "output", "output", [{"node": "w"}])), "invalid get_attr target"),
    (_doc(_node("placeholder", "x", "x"), _node("get_attr", "w", "__class__"),
          _node("output", "output", "output", [{"node": "w"}])), "invalid get_attr target"),
    (_doc(_node("placeholder", "x", "x"),
          _node("call_function", "y", "aten.relu.default", [{"node": "x"}], {"a=print('pwned'),b": 1}),
          _node("output", "output", "output", [{"node": "y"}])), "invalid keyword argument names"),
    (_doc(_node("placeholder", "x; print('pwned')", "x"), OUT_X), "not a valid fx node name"),
    (_doc(_node("placeholder", "x", "x"), _node("output", "output", "print")), "invalid output target"),
])
def test_code_injection_rejected(doc, match):
    with pytest.raises(GraphFormatError, match=match):
        _decode(doc)


def test_get_attr_paths_allowed():
    g = _decode(_doc(_node("get_attr", "w", "layers.0.weight"),
                             _node("output", "output", "output", [{"node": "w"}])))
    assert [n.target for n in g.nodes][0] == "layers.0.weight"


def test_bogus_dtype_message():
    with pytest.raises(GraphFormatError, match=r"unknown torch dtype 'float33'.*rebuild the engine"):
        _decode(_one_call("aten.zeros.default", [[2]], {"dtype": {"dtype": "float33"}}))


# Ops a hostile program could use to reach files, storage, raw memory or the allocator with sizes of its choosing
# (a sizing op is allowed only with its sizes bounded: aten.repeat, below).
DANGEROUS_OPS = [
    "aten.from_file.default", "aten.set_.source_Storage", "aten.set_.source_Storage_storage_offset",
    "aten.set_.source_Tensor", "aten.resize_.default", "aten.as_strided.default", "aten.as_strided_.default",
    "aten.fill_.Scalar", "aten.index_put_.default", "aten.empty.memory_format",
    "aten.empty_strided.default", "aten.full.default", "aten.zeros.default", "aten.arange.default",
    "aten._local_scalar_dense.default",
    "aten.item.default", "aten.lift_fresh_copy.default", "aten.set_.default", "aten._efficientzerotensor.default",
    "prims.view_of.default", "prims.empty_strided.default",
]


@pytest.mark.parametrize("target", DANGEROUS_OPS)
def test_engine_allow_list_refuses_dangerous_ops(target):
    namespace, name, overload = target.split(".")
    assert isinstance(getattr(getattr(getattr(torch.ops, namespace), name), overload), torch._ops.OpOverload)
    assert target not in PROGRAM_OPS
    with pytest.raises(GraphFormatError, match=f"{target!r} is not allowed"):
        graph_from_json(_one_call(target, [{"node": "x"}]))


def test_engine_allow_list_is_exact_overloads():
    assert all(op.count(".") == 2 or op.startswith("operator.") for op in PROGRAM_OPS)
    with pytest.raises(GraphFormatError, match="'aten.add.Scalar' is not allowed"):  # aten.add.Tensor is allowed
        graph_from_json(_one_call("aten.add.Scalar", [{"node": "x"}, 1]))


@pytest.mark.parametrize("args, kwargs", [([{"node": "x"}, MAX_REPEATS + 1], {}), ([{"node": "x"}, -1], {}),
                                          ([{"node": "x"}, 2], {"output_size": 1 << 40}),
                                          ([{"node": "x"}], {"repeats": 1 << 50})])
def test_allocation_sizes_are_bounded(args, kwargs):
    with pytest.raises(GraphFormatError, match=r"(repeats|output_size)=.* is out of range"):
        graph_from_json(_one_call("aten.repeat_interleave.self_int", args, kwargs))
    graph_from_json(_one_call("aten.repeat_interleave.self_int", [{"node": "x"}, 4]))


@pytest.mark.parametrize("repeats", [[MAX_REPEATS + 1], [-1], [MAX_REPEATS, MAX_REPEATS, MAX_REPEATS], [2.5], [True]])
def test_repeat_sizes_are_bounded(repeats):
    with pytest.raises(GraphFormatError, match=r"repeats=.* (is out of range|asks for more than)"):
        graph_from_json(_one_call("aten.repeat.default", [{"node": "x"}, repeats]))
    graph_from_json(_one_call("aten.repeat.default", [{"node": "x"}, [MAX_REPEATS, 4]]))
