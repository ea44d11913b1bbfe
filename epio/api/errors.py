"""Typed API errors and the one mapping from exceptions to HTTP answers (STYLE 13).

Every error the API answers with has a stable ``code`` (a word scripts can rely
on), an HTTP ``status`` and a one-sentence ``message``.  Store errors are mapped
here too, so handlers just let them propagate.  Anything else is a bug: a
generic 500 and ``log.failure`` by the caller, never a traceback in a response.
"""

from __future__ import annotations

import math
from typing import Any

from epio.store import errors as store_errors


class ApiError(Exception):
    """Base of every error answered on purpose."""

    code = "error"
    status = 400

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(ApiError):
    code = "bad_request"
    status = 400


class InvalidJson(BadRequest):
    code = "invalid_json"


class ValidationFailed(BadRequest):
    code = "validation_failed"


class Unauthorized(ApiError):
    code = "unauthorized"
    status = 401

    def __init__(self, message: str = "a valid API token is required "
                 "(Authorization: Bearer TOKEN)") -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="epio"'})


class Forbidden(ApiError):
    code = "forbidden"
    status = 403


class NotFound(ApiError):
    code = "not_found"
    status = 404


class MethodNotAllowed(ApiError):
    """405; ``headers`` carries ``Allow`` (RFC 9110: a 405 lists the allowed methods)."""

    code = "method_not_allowed"
    status = 405


class Conflict(ApiError):
    code = "conflict"
    status = 409


class PayloadTooLarge(ApiError):
    code = "payload_too_large"
    status = 413


def _binary_size(n: int) -> str:
    """``n`` bytes in KiB (below 1 MiB), MiB or GiB, for people."""
    if n < 1 << 20:
        return f"{n / 1024:.0f} KiB"
    if n < 1 << 30:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / (1 << 30):.1f} GiB"


def too_large_message(size: int | None, limit: int, upload: bool) -> str:
    """The sentence for a body over ``limit`` bytes (``size`` None: not known yet); an
    upload's says how to make it smaller."""
    if not upload:
        how_big = f"is {size} bytes" if size is not None else "is larger than that"
        return f"the request body {how_big}; the limit is {limit} bytes"
    how_big = f"is {_binary_size(size)}" if size is not None else "is larger"
    return (f"the upload {how_big}; the limit is {_binary_size(limit)}. Leave out what the "
            "app does not need to run (a virtualenv, .git, media or data files) with a "
            ".epioignore file in the app directory (gitignore syntax)")


class UnsupportedMediaType(ApiError):
    code = "unsupported_media_type"
    status = 415


class TooManyRequests(ApiError):
    """A per-user limit; ``Retry-After`` says in how many seconds to try again."""

    code = "too_many_requests"
    status = 429

    def __init__(self, message: str, retry_after: float, *, code: str | None = None) -> None:
        super().__init__(message, code=code,
                         headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


class Unavailable(ApiError):
    code = "unavailable"
    status = 503


class BuildFailed(ApiError):
    code = "build_failed"
    status = 422


STORE_ERRORS: list[tuple[type[Exception], type[ApiError], str | None]] = [
    (store_errors.NotFound, NotFound, None),
    (store_errors.LastAdminToken, Conflict, "last_admin_token"),
    (store_errors.Conflict, Conflict, None),
    (store_errors.IntegrityError, Conflict, "conflict"),
    (store_errors.InvalidName, ValidationFailed, "invalid_name"),
    (store_errors.InvalidValue, ValidationFailed, "invalid_value"),
    (store_errors.StoreUnavailable, Unavailable, "store_unavailable"),
    (store_errors.UidsExhausted, Unavailable, "app_uids_exhausted"),
]


def to_api_error(exc: BaseException) -> ApiError | None:
    """The answer for ``exc`` if it is an error on purpose; None for a bug."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, store_errors.Throttled):
        return TooManyRequests(str(exc), exc.retry_after, code=exc.code)
    for kind, api_kind, code in STORE_ERRORS:
        if isinstance(exc, kind):
            message = str(exc) or api_kind.code.replace("_", " ")
            return api_kind(message, code=code)
    return None


INTERNAL = ApiError("internal error; it has been logged", code="internal_error", status=500)
