"""A batching BusLogSink: the sender side of ``log.batch`` (reference implementation).

Lines emitted during one reactor turn (or up to ``max_batch`` of them) travel as
one ``log.batch`` message per logger instead of one ``log.line`` each: the
signature, msgpack framing and ZeroMQ send are paid once per batch.  Sequence
numbers, splitting and the every-logger fan-out are BusLogSink's own.  Proposed
for epio/pipeline.py (owner: bus); used here by the tests and the benchmark.
"""

from __future__ import annotations

from typing import Any

from epio.pipeline import BusLogSink, split_text


class BatchingBusLogSink(BusLogSink):
    def __init__(self, *args: Any, max_batch: int = 500, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.max_batch = max_batch
        self._batch: list[list[Any]] = []
        self._call: Any = None

    def emit(self, app: str, source: str, text: str, timestamp: float | None = None) -> None:
        ts = self.clock.seconds() if timestamp is None else float(timestamp)
        for part in split_text(text, self.max_line_bytes):
            self._batch.append([app, source, part, ts, self._next_seq(app, source)])
            self.counters.incr("lines")
        if len(self._batch) >= self.max_batch:
            self.flush()
        elif self._call is None:
            self._call = self.bus.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        batch, self._batch = self._batch, []
        if batch:
            self._send("log.batch", {"lines": batch, "node": self.bus.sender})

    def stopService(self) -> Any:
        self.flush()
        return super().stopService()
