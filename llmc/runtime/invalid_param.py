"""InvalidParam: a request parameter out of range, for sampling_params and guided_decoding_params alike."""


class InvalidParam(ValueError):
    """A sampling parameter out of range; `param` names it (the OpenAI error object's field)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
