"""The Triton Python-backend model that holds one llmc engine.

Every request joins the engine's in-flight batch: `AsyncLLM` runs the engine's step loop on its own
thread. The model is decoupled, so `execute` returns at once and the engine thread sends each
request's responses as its tokens come: one per token with `streaming`, else one when it finishes.
A bad request gets a Triton error of its own; the others go on.

Inputs follow TensorRT-LLM's `tensorrt_llm` model: `input_ids`, `input_lengths`, `request_output_len`,
`end_id`, `bad_words_list` ([2, W]: token ids, word end offsets), `temperature`, `runtime_top_k`,
`runtime_top_p`, penalties, `random_seed`, `streaming`; but `stop_words` are strings (llmc stops on
text, so a stop string is found across token boundaries and cut from the output exactly).
Outputs: `text_output` (llmc's incremental detokenization), `output_ids`, `finish_reason`.
"""

from __future__ import annotations

import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from llmc.runtime.async_llm import AsyncLLM
from llmc.runtime.llm_engine import LLMEngine
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.triton.tokenizer_models import model_path, parameter, strings, tensor

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class LLMCModel:
    def initialize(self, args):
        self.name = args["model_name"]
        engine = LLMEngine(model_path(args, "engine_dir"), max_num_seqs=int(parameter(args, "max_num_seqs")))
        self.llm = AsyncLLM(engine)
        labels = {"model": self.name}
        # Triton wants the families kept alive as long as their metrics.
        self.families = [
            pb_utils.MetricFamily("llmc_steps", "Engine steps taken", pb_utils.MetricFamily.COUNTER),
            pb_utils.MetricFamily("llmc_step_requests", "Requests advanced by a step, summed over steps (/ llmc_steps: the mean batch)",
                                  pb_utils.MetricFamily.COUNTER),
        ]
        self.steps, self.step_requests = (family.Metric(labels=labels) for family in self.families)
        self._counted = (0, 0)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                if self.llm.error is not None:
                    raise RuntimeError(f"the engine stopped after an error: {self.llm.error}")
                token_ids, params, stream = self._parse(request)
            except (ValueError, RuntimeError) as e:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))), flags=FINAL)
                continue
            request_id = uuid.uuid4().hex
            self.llm.add_request(request_id, token_ids, params, None, self._responder(request_id, sender, stream))
        return None

    def finalize(self):
        self.llm.shutdown()

    def _parse(self, request) -> tuple[list[int], SamplingParams, bool]:
        def scalar(name, kind):
            value = tensor(request, name)
            return None if value is None else kind(value.reshape(-1)[0])

        ids = tensor(request, "input_ids")
        if ids.shape[0] != 1:
            raise ValueError(
                f"the {self.name} model takes one prompt per request, got a batch of {ids.shape[0]}; "
                "send each prompt as its own request (requests are batched in flight)"
            )
        length = scalar("input_lengths", int)
        token_ids = self.llm.engine.tokenize([int(t) for t in ids[0][:length]])
        temperature, top_k, top_p = scalar("temperature", float), scalar("runtime_top_k", int), scalar("runtime_top_p", float)
        if temperature is None:  # as TensorRT-LLM: greedy unless asked to sample
            temperature = 1.0 if top_k is not None or top_p is not None else 0.0
        end_id = scalar("end_id", int)
        stop = tensor(request, "stop_words")
        params = SamplingParams(
            max_tokens=scalar("request_output_len", int),
            temperature=temperature,
            top_k=top_k or 0,
            top_p=1.0 if top_p is None else top_p,
            repetition_penalty=scalar("repetition_penalty", float) or 1.0,
            presence_penalty=scalar("presence_penalty", float) or 0.0,
            frequency_penalty=scalar("frequency_penalty", float) or 0.0,
            seed=scalar("random_seed", int),
            stop=[s for s in strings(stop) if s] if stop is not None else [],
            stop_token_ids=[end_id] if end_id is not None else [],
            ignore_eos=end_id is not None,  # end_id replaces the model's EOS
            bad_words_ids=_word_list(tensor(request, "bad_words_list")),
        )
        return token_ids, params, bool(scalar("streaming", bool))

    def _responder(self, request_id: str, sender, stream: bool):
        """The request's callback on the engine thread: RequestOutputs in, Triton responses out."""
        sent = 0

        def on_output(out):
            try:
                respond(out)
            except Exception as e:  # the request ends with an error; the engine and the others go on
                self.llm.abort(request_id)
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(e).__name__}: {e}")), flags=FINAL)

        def respond(out):
            nonlocal sent
            if isinstance(out, BaseException):
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(out))), flags=FINAL)
                return
            if sender.is_cancelled():  # the client went away: free the request's KV blocks
                self.llm.abort(request_id)
                sender.send(flags=FINAL)
                return
            if out.finished:  # before the last response, so that a client that has it sees the counts
                self._count_steps()
            if stream or out.finished:
                completion = out.outputs[0]
                text, ids = (completion.delta_text, completion.token_ids[sent:]) if stream else (completion.text, completion.token_ids)
                sent = len(completion.token_ids)
                response = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("text_output", np.array([[text.encode()]], dtype=np.object_)),
                    pb_utils.Tensor("output_ids", np.array([ids], dtype=np.int32).reshape(1, -1)),
                    pb_utils.Tensor("finish_reason", np.array([[(completion.finish_reason or "").encode()]], dtype=np.object_)),
                ])
                sender.send(response, flags=FINAL if out.finished else 0)

        return on_output

    def _count_steps(self) -> None:
        steps, requests = self.llm.num_steps, self.llm.num_step_requests
        self.steps.increment(steps - self._counted[0])
        self.step_requests.increment(requests - self._counted[1])
        self._counted = (steps, requests)


def _word_list(array: np.ndarray | None) -> list[list[int]]:
    """TensorRT-LLM's [1, 2, W] word list (token ids; offsets where words end, -1 after the last) -> words."""
    if array is None:
        return []
    ids, ends = array.reshape(2, -1).tolist()
    words, start = [], 0
    for end in ends:
        if end < 0:
            break
        words.append(ids[start:end])
        start = end
    return words
