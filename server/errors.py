"""Every error leaves the server in OpenAI's shape:

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

Routes raise `APIError`; the handlers installed by `install_error_handlers` also turn
FastAPI's validation errors, unknown routes and unexpected exceptions into that shape,
so a client never has to parse two error formats.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# Seconds a client told "queue full" should wait before retrying.
RETRY_AFTER_SECONDS = 1


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# The error statuses every API route may answer, documented in the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request: a bad value, an unknown field, a prompt longer than the context",
        401: "Missing or invalid API key",
        403: "The key may not do this (an admin-only route)",
        404: "No such model, file or job (or another owner's)",
        413: "A body, upload or stored-bytes limit exceeded",
        429: "Queue full, or an owner's concurrency limit reached; see Retry-After",
        503: "The engine is down, or the server is shutting down",
    }.items()
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


def context_length_exceeded(
    max_model_len: int, prompt_tokens: int, max_tokens: int | None, prompt_param: str
) -> APIError:
    if max_tokens is None:
        message = (
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{prompt_tokens} tokens, which leaves no room for a completion. Please reduce the length of the prompt."
        )
    else:
        message = (
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the completion). "
            "Please reduce the length of the prompt or completion."
        )
    # Blame the prompt when it alone does not fit, else the completion budget.
    param = prompt_param if max_tokens is None or prompt_tokens >= max_model_len else "max_tokens"
    return APIError(400, message, param=param, code="context_length_exceeded")


def queue_full() -> APIError:
    return APIError(
        429,
        "The server is at capacity (request queue full); retry later.",
        type="rate_limit_error",
        code="queue_full",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def shutting_down(drain_timeout_s: float) -> APIError:
    return APIError(
        503,
        f"The server is shutting down and this request did not finish within drain_timeout_s={drain_timeout_s:g}.",
        type="service_unavailable",
        code="server_shutting_down",
    )


def engine_unavailable(reason: str) -> APIError:
    return APIError(503, f"The engine is not available: {reason}", type="service_unavailable", code="engine_dead")


_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Names pydantic puts into `loc` for the branch of a union, which are not fields.
_UNION_BRANCH_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param_of(loc: tuple) -> str | None:
    """("body", "stop", "list[constrained-str]", 0) -> "stop.0"; the body itself -> None."""
    if loc and loc[0] == "body":
        loc = loc[1:]
    parts = [
        str(p) for p in loc if isinstance(p, int) or (_FIELD_NAME.fullmatch(p) and p not in _UNION_BRANCH_TAGS)
    ]
    return ".".join(parts) or None


def _most_telling(errors: list[dict]) -> dict:
    """A union reports one error per branch; a range error says more than a type error."""
    return next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors() or [{"loc": (), "msg": "invalid request", "type": ""}]
    first = _most_telling(errors)
    if first.get("type") == "json_invalid":
        return bad_request(f"Malformed JSON body: {first.get('msg')}").response()
    param = _param_of(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param).response()
    if param:
        message = f"{param}: {message}"
    return bad_request(message, param).response()


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return APIError(exc.status_code, message, type=kind, headers=getattr(exc, "headers", None)).response()


def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return APIError(500, f"Internal server error: {type(exc).__name__}", type="internal_server_error").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, lambda request, exc: exc.response())
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
