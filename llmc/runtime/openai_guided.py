"""Structured output's request fields, on both endpoints: OpenAI's `response_format` and vLLM's `guided_*`.

At most one of them asks for a grammar; a bad one raises InvalidParam naming the field it came in
(the endpoint's 400).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmc.runtime.guided_decoding_params import GuidedDecodingParams
from llmc.runtime.sampling_params import InvalidParam

# vLLM's guided_decoding_backend values that this server can honour (xgrammar is its only backend).
BACKENDS = {None: False, "auto": False, "xgrammar": False, "xgrammar:disable-any-whitespace": True}


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")  # `schema` would shadow BaseModel's
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class GuidedRequestFields(BaseModel):
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(max_length=1024)] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None

    @property
    def guided_field(self) -> str | None:
        """The one field that asks for structured output (None if none does); two of them are an error."""
        given = [name for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar") if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.insert(0, "response_format")
        if len(given) > 1:
            raise InvalidParam(given[1], f"{' and '.join(given)} each ask for structured output; send one")
        return given[0] if given else None

    def guided_decoding(self) -> GuidedDecodingParams | None:
        field = self.guided_field
        if self.guided_decoding_backend not in BACKENDS:
            raise InvalidParam("guided_decoding_backend", f"guided_decoding_backend {self.guided_decoding_backend[:60]!r} is not one of "
                               + ", ".join(b for b in BACKENDS if b))
        if field is None:
            return None
        compact = BACKENDS[self.guided_decoding_backend]
        try:
            if field == "response_format":
                if self.response_format.type == "json_object":
                    return GuidedDecodingParams(json_object=True, disable_any_whitespace=compact)
                if self.response_format.json_schema is None or self.response_format.json_schema.json_schema is None:
                    raise InvalidParam("response_format", "response_format of type json_schema needs json_schema.schema")
                return GuidedDecodingParams(json=self.response_format.json_schema.json_schema, disable_any_whitespace=compact)
            kind = field.removeprefix("guided_")
            return GuidedDecodingParams(**{kind: getattr(self, field)}, disable_any_whitespace=compact)
        except InvalidParam as e:
            raise InvalidParam(field, f"{field}: {e}") from None
