"""Declared endpoints: :func:`operation` marks a handler method with its
:class:`~epio.api.spec.Operation`; nothing is registered at import time.

The route classes (:class:`epio.api.web.Api` and the mixins it is made of:
``AddonRoutes``, ``CronRoutes``, ``RunRoutes``) hold their handlers as methods;
each ``Api`` instance builds its own Klein app from :func:`operations_of` its
class, and the OpenAPI document is made from the same list.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.web.iweb import IRequest

from epio.api import errors
from epio.api.spec import Operation

JSON = "application/json"
OPERATION_ATTR = "epio_operation"

Handler = Callable[..., Awaitable[Any]]


def operation(method: str, path: str, operation_id: str, summary: str, *,
              response: dict[str, Any] | None, status: int = 200,
              request: dict[str, Any] | None = None, request_type: str = JSON,
              auth: bool = True, query: dict[str, dict[str, Any]] | None = None,
              tag: str = "platform", raw: bool = False,
              response_type: str = JSON) -> Callable[[Handler], Handler]:
    """Declare one endpoint on a handler method ``(self, request, user, **args)``:
    the Api routes it through ``_dispatch`` and lists it in its OpenAPI document."""
    op = Operation(method, path, operation_id, summary, response, status, request,
                   request_type, auth, query or {}, tag, raw, response_type)

    def deco(f: Handler) -> Handler:
        setattr(f, OPERATION_ATTR, op)
        return f

    return deco


def operations_of(cls: type) -> tuple[tuple[str, Operation], ...]:
    """(method name, operation) of every declared endpoint of ``cls``: its own in
    definition order, then each base's (``Api`` first, then its mixins)."""
    seen: set[str] = set()
    out: list[tuple[str, Operation]] = []
    for klass in cls.__mro__:
        for name, value in vars(klass).items():
            op = getattr(value, OPERATION_ATTR, None)
            if isinstance(op, Operation) and name not in seen:
                seen.add(name)
                out.append((name, op))
    return tuple(out)


def query_arg(request: IRequest, name: str) -> str | None:  # twisted.web Request (untyped args)
    values = request.args.get(name.encode())
    return values[0].decode("utf-8", "replace") if values else None


def query_int(request: IRequest, name: str, default: int, minimum: int = 0,
              maximum: int = 1 << 31) -> int:
    text = query_arg(request, name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise errors.BadRequest(f"query parameter {name} must be an integer") from None
    if not minimum <= value <= maximum:
        raise errors.BadRequest(f"query parameter {name} must be between {minimum} and {maximum}")
    return value
