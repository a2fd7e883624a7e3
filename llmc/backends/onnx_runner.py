"""The ONNX backend's runner: a rank's ONNX program in ONNX Runtime sessions, and its KV cache.

The program is the step contract with one cache block per sequence (see onnx_export): engines are
built with block_size = max_seq_len, so a sequence's block is its row of a contiguous cache. The
runner splits a scheduler step into calls the program takes: each prefill chunk alone (ORT's
GroupQueryAttention takes new tokens over an existing past only at batch 1), and the decodes
together, one call per run of consecutive cache rows. The cache lives in one ORT buffer; each call
binds its rows as past and present (the same memory), so a step copies no cache.

A rank built with --tp is several ONNX models, the segments between its collectives: a call runs
them in order and does each collective between two with llmc.plugins.collectives (torch.distributed,
the rank's group set by the worker). Tensor-parallel ranks get the same steps, so they make the same
calls, and so the same collectives, in the same order.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from llmc.backends.base import StepInputs
from llmc.backends.onnx_program import COLLECTIVES, DTYPES
from llmc.engine_error import EngineError

if TYPE_CHECKING:
    from llmc.engine import EngineConfig


def check_external_data(path: Path) -> None:
    """ORT reads a model's weights from whatever files its tensors name: each must be the model's own FILE.data
    (a file of the engine's list), never a path elsewhere."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and the like
        raise EngineError(f"cannot load {path}: {e}; rebuild the engine") from None
    for tensor in _get_all_tensors(model):
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location")
        if uses_external_data(tensor) and location != f"{path.name}.data":
            raise EngineError(f"{path}: tensor {tensor.name!r} reads its data from {location!r}, not {path.name}.data; "
                              "rebuild the engine")


class SegmentSession:
    """One ONNX model of a rank's program in an ORT session: the values it reads and returns, and the layers
    whose cache it updates."""

    def __init__(self, session):
        self.session = session
        inputs = [i.name for i in session.get_inputs()]
        self.inputs = [name for name in inputs if not name.startswith("past_")]
        self.outputs = [o.name for o in session.get_outputs() if not o.name.startswith("present_")]
        self.layers = sorted(int(name.removeprefix("past_key_")) for name in inputs if name.startswith("past_key_"))


class OnnxRunner:
    """One rank's ONNX program (its segments in ORT sessions), and its cache:
    [layers, 2, rows, kv_heads, max_seq_len, head_dim]."""

    def __init__(self, rank_dir: Path, config: EngineConfig, rank: int, num_blocks: int, device: torch.device):
        try:
            import onnxruntime as ort
        except ImportError:
            raise EngineError("this engine runs on ONNX Runtime, which is not installed: pip install 'llmc[onnx]'") from None
        if config.kv_cache["block_size"] != config.limits["max_seq_len"]:
            raise EngineError(f"{rank_dir}: an ONNX engine needs block_size == max_seq_len (one row per sequence); rebuild it")
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EngineError("device cuda needs onnxruntime-gpu (CUDAExecutionProvider); pip install onnxruntime-gpu")
            providers, self.ort_device = ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"
        elif device.type == "cpu":
            providers, self.ort_device = ["CPUExecutionProvider"], "cpu"
        else:
            raise EngineError(f"the ONNX backend runs on cpu or cuda, not {device}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        record = config.ranks[rank]["backend"]  # its program and outputs checked by the engine's schema
        self.program = []  # the segments' sessions, and the records of the collectives between them
        for part in record["program"]:
            if "onnx" in part:
                path = rank_dir / part["onnx"]
                check_external_data(path)
                try:
                    self.program.append(SegmentSession(ort.InferenceSession(str(path), options, providers=providers)))
                except Exception as e:  # ORT raises its own exception types for bad models
                    raise EngineError(f"cannot load {path}: {e}") from None
            elif part.get("collective") in COLLECTIVES:
                self.program.append(part)
            else:
                raise EngineError(f"{rank_dir}: unknown step in the engine's ONNX program: {part}; rebuild the engine")
        self.output_names = record["outputs"]
        kv = config.ranks[rank]["kv_cache"]
        self.dtype = DTYPES[config.dtype]
        self.num_layers, self.num_rows = kv["num_layers"], num_blocks
        self.row_shape = [kv["num_kv_heads"], config.limits["max_seq_len"], kv["head_dim"]]
        # Zeroed: the standard form reads whole rows (masking what is not yet written).
        self.cache = ort.OrtValue.ortvalue_from_numpy(
            np.zeros([self.num_layers, 2, num_blocks, *self.row_shape], dtype=self.dtype), self.ort_device, 0
        )
        self.row_bytes = int(np.prod(self.row_shape)) * np.dtype(self.dtype).itemsize
        # Stage tensors ([1, T, ...]) are split between calls by token; logits by logits_indices.
        self.token_inputs = [s["name"] for s in config.ranks[rank]["pp_inputs"]]

    def _calls(self, lens: np.ndarray, rows: np.ndarray) -> list[list[int]]:
        """The step's sequences grouped into calls: decodes by runs of consecutive rows, prefills alone."""
        decodes = sorted((i for i in range(len(lens)) if lens[i] == 1), key=lambda i: rows[i])
        calls: list[list[int]] = []
        for i in decodes:
            if calls and rows[calls[-1][-1]] + 1 == rows[i]:
                calls[-1].append(i)
            else:
                calls.append([i])
        return calls + [[i] for i in range(len(lens)) if lens[i] > 1]

    def run(self, step_inputs: StepInputs) -> tuple[torch.Tensor, ...]:
        inputs = {k: np.asarray(v) for k, v in step_inputs.items()}
        starts = inputs["query_start_loc"].astype(np.int64)
        lens = np.diff(starts)
        context = inputs["seq_lens"].astype(np.int64)
        rows = inputs["block_tables"][:, 0].astype(np.int64)
        logits_at = inputs["logits_indices"]
        num_tokens = inputs["input_ids"].shape[1]
        owner = np.repeat(np.arange(len(lens)), lens)  # token -> its sequence
        results: list[np.ndarray | None] = [None] * len(self.output_names)
        for seqs in self._calls(lens, rows):
            tokens = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in seqs])
            local = np.full(num_tokens, -1)
            local[tokens] = np.arange(len(tokens))
            picked = np.nonzero(np.isin(owner[logits_at], seqs))[0]  # which of the step's logits rows are here
            outs = self._call(inputs, seqs, tokens, local[logits_at[picked]] if len(picked) else np.array([0]), context, rows)
            for j, (name, out) in enumerate(zip(self.output_names, outs)):
                if results[j] is None:
                    shape = list(out.shape)
                    shape[1] = len(logits_at) if name == "logits" else num_tokens
                    results[j] = np.zeros(shape, dtype=out.dtype)
                if name == "logits":
                    results[j][:, picked] = out[:, : len(picked)]
                else:
                    results[j][:, tokens] = out
        return tuple(torch.from_numpy(r) for r in results)

    def _call(self, inputs, seqs, tokens, logits_indices, context, rows) -> list[np.ndarray]:
        values = {
            "input_ids": inputs["input_ids"][:, tokens],
            "position_ids": inputs["position_ids"][:, tokens],
            "rope_seq_lens": inputs["rope_seq_lens"][:, tokens],  # read by length-dependent RoPE only
            "logits_indices": logits_indices.astype(np.int64),
            "seqlens_k": (context[seqs] - 1).astype(np.int32),
            "total_sequence_length": np.array(context[seqs].max(), dtype=np.int32),
            **{name: inputs[name][:, tokens] for name in self.token_inputs},
        }
        for part in self.program:
            if isinstance(part, SegmentSession):
                values.update(self._run_segment(part, values, len(seqs), int(rows[seqs[0]])))
            else:
                reduced = COLLECTIVES[part["collective"]](torch.from_numpy(values[part["input"]]), **part["args"])
                values[part["output"]] = reduced.numpy()
        return [values[name] for name in self.output_names]

    def _run_segment(self, segment: SegmentSession, values: dict, num_rows: int, first_row: int) -> dict[str, np.ndarray]:
        """One segment on the call's values, with its layers' past and present bound to the call's cache rows."""
        binding = segment.session.io_binding()
        for name in segment.inputs:
            binding.bind_cpu_input(name, np.ascontiguousarray(values[name]))
        for name in segment.outputs:
            binding.bind_output(name, "cpu")
        shape = [num_rows, *self.row_shape]
        base = self.cache.data_ptr()
        for layer in segment.layers:
            for kind, part in (("key", 0), ("value", 1)):
                ptr = base + ((layer * 2 + part) * self.num_rows + first_row) * self.row_bytes
                binding.bind_input(f"past_{kind}_{layer}", self.ort_device, 0, self.dtype, shape, ptr)
                binding.bind_output(f"present_{kind}_{layer}", self.ort_device, 0, self.dtype, shape, ptr)
        segment.session.run_with_iobinding(binding)
        return dict(zip(segment.outputs, (o.numpy() for o in binding.get_outputs()[: len(segment.outputs)])))
