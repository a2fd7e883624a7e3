"""Structured output's request: the grammar a generation must follow, named as in vLLM.

Exactly one of: `json` (a JSON schema, as a dict or its JSON text), `regex`, `choice` (a list of
strings), `grammar` (EBNF, xgrammar's dialect of GBNF), `json_object=True` (any JSON object).
Whether a schema, regex or grammar compiles is for `StructuredOutput.compile` to say.

JSON (a schema, or json_object) allows any whitespace between tokens, as JSON does; a small model may
then emit newlines until max_tokens. `disable_any_whitespace=True` asks for compact JSON instead
(vLLM's option of the same name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from llmc.runtime.invalid_param import InvalidParam

KINDS = ("json", "regex", "choice", "grammar", "json_object")


def _utf8(text: str) -> bool:
    """Whether the grammar compiler (which reads UTF-8) can take `text`: JSON's "\\ud800" escapes make lone surrogates."""
    try:
        text.encode()
        return True
    except UnicodeEncodeError:
        return False


@dataclass
class GuidedDecodingParams:
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidParam("guided_decoding", f"guided decoding takes exactly one of {', '.join(KINDS)}; got {', '.join(given) or 'none'}")
        kind = given[0]
        if not isinstance(self.disable_any_whitespace, bool):
            raise InvalidParam("guided_decoding.disable_any_whitespace", "disable_any_whitespace must be true or false")
        if kind == "json":
            if isinstance(self.json, str):
                try:
                    json.loads(self.json)
                except ValueError as e:
                    raise InvalidParam("guided_decoding.json", f"the JSON schema is not valid JSON: {e}") from None
            elif not isinstance(self.json, dict):
                raise InvalidParam("guided_decoding.json", f"the JSON schema must be a dict or its JSON text, got {type(self.json).__name__}")
            else:
                try:
                    json.dumps(self.json)
                except (TypeError, ValueError) as e:
                    raise InvalidParam("guided_decoding.json", f"the JSON schema is not JSON: {e}") from None
        elif kind in ("regex", "grammar") and not (isinstance(getattr(self, kind), str) and getattr(self, kind)):
            raise InvalidParam(f"guided_decoding.{kind}", f"{kind} must be a non-empty string")
        elif kind == "choice":
            if not (isinstance(self.choice, (list, tuple)) and self.choice and all(isinstance(c, str) and c for c in self.choice)):
                raise InvalidParam("guided_decoding.choice", "choice must be a non-empty list of non-empty strings")
        elif kind == "json_object" and self.json_object is not True:
            raise InvalidParam("guided_decoding.json_object", "json_object must be true")
        value = getattr(self, kind)
        if not all(_utf8(text) for text in (value if kind == "choice" else [value]) if isinstance(text, str)):
            raise InvalidParam(f"guided_decoding.{kind}", f"{kind} is not valid Unicode (a lone surrogate); send UTF-8 text")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def schema_text(self) -> str:
        """The JSON schema as text (a dict's key order kept: it is the order properties are generated in)."""
        return self.json if isinstance(self.json, str) else json.dumps(self.json)
