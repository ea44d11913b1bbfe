"""One stored log line and its on-disk encoding.

A chunk file holds one record a line, tab-separated, so ``zcat | grep`` works
on it::

    TIMESTAMP \\t SOURCE \\t SENDER \\t SEQ \\t KIND \\t TEXT \\n

``KIND`` is ``-`` for a line of the app's output and ``lost:N`` for the marker
a logger writes when it finds N lines of a stream missing (a sequence gap).
``SENDER``/``SEQ`` name the stream position the line came from, so a logger
that restarts knows exactly which lines it already stored.  Backslash, tab,
CR and LF in the text are escaped (``\\\\``, ``\\t``, ``\\r``, ``\\n``).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from epio.domain import APP_NAME, LOG_SOURCE

LINE = "-"
LOST = "lost"

_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {v: k for k, v in _ESCAPES.items()}
_ESC_RE = re.compile(r"[\\\t\n\r]")
_UNESC_RE = re.compile(r"\\[\\tnr]")

# Names that go into paths and file fields: validated on receive.
APP_RE = APP_NAME
SOURCE_RE = LOG_SOURCE


def escape(text: str) -> str:
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        return _ESC_RE.sub(lambda m: _ESCAPES[m.group(0)], text)
    return text


def unescape(text: str) -> str:
    if "\\" in text:
        return _UNESC_RE.sub(lambda m: _UNESCAPES[m.group(0)], text)
    return text


class LogRecord(NamedTuple):
    """A stored line.  ``lineno`` is the app-local position assigned by the
    logger that stored it (consecutive within one logger's copy of the app's
    log); ``lost`` is the count of a ``lost`` marker, 0 for ordinary lines.
    (A NamedTuple: one is made per line received, so it must be cheap.)"""

    lineno: int
    timestamp: float
    source: str
    text: str
    lost: int = 0
    sender: str = ""
    seq: int = 0

    @property
    def kind(self) -> str:
        return LOST if self.lost else LINE

    def encode(self) -> str:
        kind = f"lost:{self.lost}" if self.lost else "-"
        return (
            f"{self.timestamp:.6f}\t{self.source}\t{self.sender}\t{self.seq}\t{kind}\t"
            f"{escape(self.text)}\n"
        )

    def to_wire(self) -> list[Any]:
        """The compact form used in bus messages: [lineno, ts, source, text, lost]."""
        return [self.lineno, self.timestamp, self.source, self.text, self.lost]

    @classmethod
    def from_wire(cls, item: list[Any]) -> LogRecord:
        lineno, ts, source, text, lost = item[:5]
        return cls(int(lineno), float(ts), str(source), str(text), int(lost))

    def to_json(self) -> dict[str, Any]:
        """The form the HTTP API and the websocket send to users."""
        d: dict[str, Any] = {
            "id": self.lineno,
            "timestamp": self.timestamp,
            "source": self.source,
            "text": self.text,
        }
        if self.lost:
            d["lost"] = self.lost
        return d


class CorruptRecord(ValueError):
    """A line of a chunk file that does not parse (torn write, disk damage)."""


def decode(line: str, lineno: int) -> LogRecord:
    """Parse one chunk-file line (without its trailing newline)."""
    parts = line.split("\t", 5)
    if len(parts) != 6:
        raise CorruptRecord(f"expected 6 fields, got {len(parts)}")
    ts, source, sender, seq, kind, text = parts
    try:
        lost = 0 if kind == "-" else int(kind[5:]) if kind.startswith("lost:") else -1
        if lost < 0:
            raise CorruptRecord(f"bad kind {kind!r}")
        return LogRecord(lineno, float(ts), source, unescape(text), lost, sender, int(seq))
    except ValueError as e:
        raise CorruptRecord(str(e)) from None


def split_text(text: str, max_bytes: int) -> list[str]:
    """Split ``text`` into parts of at most ``max_bytes`` UTF-8 bytes each,
    never inside a character.  Returns ``[text]`` when it fits."""
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) <= max_bytes:
        return [text]
    parts = []
    start = 0
    while start < len(raw):
        end = min(start + max_bytes, len(raw))
        # back off to a character boundary (continuation bytes are 10xxxxxx)
        while end < len(raw) and end > start and (raw[end] & 0xC0) == 0x80:
            end -= 1
        parts.append(raw[start:end].decode("utf-8", "surrogateescape"))
        start = end
    return parts
