"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP status to send.

Every refusal of the API is an `ApiError`; the handlers turn it into a JSON response (or, once a stream has
started, into an SSE `error` event), so no request can take the server down with it. The words are for the person
reading the client's exception: they say what was wrong and, where it helps, the numbers.
"""
from __future__ import annotations

from fastapi.responses import JSONResponse

from engine.chat.types import Plan
from engine.sampling_params import InvalidParameter

INVALID = "invalid_request_error"


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = INVALID, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def invalid(exc: InvalidParameter, names: dict[str, str] | None = None) -> ApiError:
    """A parameter out of range: 400 naming it (with the API's name for it where ours differs)."""
    param = (names or {}).get(exc.param, exc.param)
    message = str(exc).replace(exc.param, param, 1) if param != exc.param else str(exc)
    return ApiError(400, message, param=param, code="invalid_parameter")


def context_exceeded(prompt_tokens: int, max_tokens: int | None, context_len: int, what: str) -> ApiError:
    """The prompt (`what`: "messages" or "prompt") and the reply do not fit: 400 with the numbers, in the words
    OpenAI and vLLM use, so clients that look for them find them."""
    if max_tokens is None or prompt_tokens >= context_len:
        detail = (f"However, your {what} resulted in {prompt_tokens} tokens. Please reduce the length of the "
                  f"{what}.")
    else:
        detail = (f"However, you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {what}, "
                  f"{max_tokens} in the completion). Please reduce the length of the {what} or completion.")
    return ApiError(400, f"This model's maximum context length is {context_len} tokens. {detail}", param=what,
                    code="context_length_exceeded")


def from_plan(plan: Plan, max_tokens: int | None, what: str) -> ApiError:
    """A plan the chat layer refused (strict mode): the image's or document's problem, the numbers, or the
    malformed input."""
    if plan.error_code == "context_exceeded":
        return context_exceeded(plan.prompt_tokens, max_tokens, plan.context_len, what)
    if plan.error_code in ("bad_image", "bad_document"):
        return ApiError(400, plan.error or "An image or document could not be read.", param=what,
                        code=plan.error_code)
    return ApiError(400, plan.error or "This request cannot be answered.", param=what)


def from_finish(code: str | None, message: str | None, plan: Plan, max_tokens: int | None, what: str) -> ApiError:
    """A request the engine ended with an error (`TurnStats.error_code`)."""
    if code == "context_exceeded":
        return context_exceeded(plan.prompt_tokens, max_tokens, plan.context_len, what)
    if code == "bad_image":
        return ApiError(400, message or "An image could not be read by the model.", param=what, code="bad_image")
    if code == "invalid_parameter":
        return ApiError(400, message or "A parameter is out of range.", code="invalid_parameter")
    return ApiError(500, message or "The model failed while answering.", type="server_error", code="engine_error")
