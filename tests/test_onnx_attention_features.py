"""Attention features in ONNX engines: soft-capping in ONNX Runtime's GroupQueryAttention form, ALiBi, soft-capping
and K and V of different head dims in the standard form; logits against the torch
backend's, on ragged steps that prefill, decode and do both at once."""

from __future__ import annotations

import pytest
import torch
from test_onnx_backend import MAX_SEQ_LEN, _runner, _steps, quiet

import llmc
from llmc.backends import onnx_backend
from llmc.backends.onnx_export import OnnxExportError, export_rank


def _max_logit_error(checkpoint, tmp_path) -> float:
    onnx = llmc.build(checkpoint, tmp_path / "onnx", max_seq_len=MAX_SEQ_LEN, backend="onnx", **quiet)
    reference = llmc.build(checkpoint, tmp_path / "torch", max_seq_len=MAX_SEQ_LEN, block_size=MAX_SEQ_LEN, **quiet)
    onnx_runner, torch_runner = _runner(onnx), _runner(reference)
    errors = []
    for inputs in _steps():
        want, got = torch_runner.run(inputs)[0], onnx_runner.run(inputs)[0]
        assert got.shape == want.shape
        errors.append((got - want).abs().max().item())
    return max(errors)


def test_softcap_in_group_query_attention_matches_torch(checkpoints, tmp_path):
    assert _max_logit_error(checkpoints["gemma2"], tmp_path) <= 1e-4


@pytest.mark.parametrize("arch", ["falcon_alibi", "gemma2", "deepseek_v3_mla"])
def test_standard_form_features_match_torch(arch, checkpoints, tmp_path, monkeypatch):
    """The standard form (TensorRT's), run by ONNX Runtime: its attention is standard ops only."""
    monkeypatch.setattr(onnx_backend, "write_rank", lambda gm, rank_dir, ctx: export_rank(gm, rank_dir, ctx, form="standard"))
    assert _max_logit_error(checkpoints[arch], tmp_path) <= 1e-4


@pytest.mark.parametrize("arch, feature", [("falcon_alibi", "ALiBi"), ("deepseek_v3_mla", "K and V of different head dims")])
def test_features_group_query_attention_lacks_are_a_clear_error(arch, feature, checkpoints, tmp_path):
    with pytest.raises(OnnxExportError, match=f"{feature} has no onnxruntime GroupQueryAttention form"):
        llmc.build(checkpoints[arch], tmp_path / "onnx", max_seq_len=MAX_SEQ_LEN, backend="onnx", **quiet)
