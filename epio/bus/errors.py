"""The bus's exceptions and rejection reasons (one place, so callers import them)."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from epio.bus.envelope import Envelope


class Reason(enum.StrEnum):
    """Why an incoming message was rejected; each is a counter name."""

    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    MALFORMED = "malformed"
    STALE = "stale"
    UNKNOWN_TYPE = "unknown_type"
    UNSUPPORTED_VERSION = "unsupported_version"
    WRONG_PATTERN = "wrong_pattern"
    INVALID_BODY = "invalid_body"
    REPLAYED = "replayed"


class Rejected(Exception):
    """An incoming frame was refused; ``reason`` is a :class:`Reason`."""

    def __init__(self, reason: Reason, detail: str = "", envelope: Envelope | None = None) -> None:
        self.reason = reason
        self.detail = detail
        #: The decoded envelope when the rejection came after the MAC verified.
        self.envelope = envelope
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)


class BusError(Exception):
    """Base class of the errors a bus caller sees."""


class NotRunning(BusError):
    """The service was used while not started (or after it stopped)."""


class RequestTimeout(BusError):
    """No reply to a request within its timeout."""

    def __init__(self, type: str, endpoint: str, timeout: float, detail: str = "") -> None:
        self.type = type
        self.endpoint = endpoint
        self.timeout = timeout
        msg = f"bus request {type} to {endpoint} got no reply within {timeout:g}s"
        super().__init__(f"{msg} ({detail})" if detail else msg)


class RemoteError(BusError):
    """The peer answered with ``bus.error``; or raise it in a router handler.

    ``code`` is a stable machine-readable word, ``message`` a human sentence
    (never a traceback).
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")
