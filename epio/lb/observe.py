"""Access log and per-app stats for the router, batched off the hot path.

A request's end appends one tuple (no formatting, no logger call); a periodic
flush formats the lines and hands them to the log sink, and every
``lb.stats_interval`` seconds per-app counters and a latency histogram go to the
stats sink.  Sinks follow ``epio.pipeline``'s ``ILogSink``/``IStatsSink``
(``emit(app, source, text, timestamp)`` / ``emit_stats(app, kind, values)``).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from twisted.logger import Logger

# latency histogram bucket upper bounds, milliseconds
BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
_BOUNDS_S = tuple(b / 1000.0 for b in BUCKETS_MS)

# 502/504 answers by whose fault they were (/metrics ``epio_lb_upstream_errors_total``):
# "connect" -- the app's instance could not be reached (refused, connect timeout);
# "app" -- it was reached and failed the request (closed without an answer, an invalid
# answer, no first byte within first_byte_timeout).
UPSTREAM_FAULT = {
    "backend_refused": "connect",
    "connect_timeout": "connect",
    "backend_closed": "app",
    "bad_response": "app",
    "timeout": "app",
}


class AppStats:
    __slots__ = ("requests", "errors", "status", "bytes_out", "hist", "service_total",
                 "upstream")

    def __init__(self) -> None:
        self.requests = 0
        self.errors: dict[str, int] = {}
        self.status = [0, 0, 0, 0, 0, 0]  # index = status // 100 (0 = client closed)
        self.bytes_out = 0
        self.hist = [0] * (len(BUCKETS_MS) + 1)
        self.service_total = 0.0
        self.upstream: dict[tuple[int, str], int] = {}  # (502|504, error code) -> count

    def values(self) -> dict[str, Any]:
        """A flat dict of numbers (the pipeline's stats shape)."""
        out: dict[str, Any] = {
            "requests": self.requests,
            "status_1xx": self.status[1], "status_2xx": self.status[2],
            "status_3xx": self.status[3], "status_4xx": self.status[4],
            "status_5xx": self.status[5],
            "bytes_out": self.bytes_out,
            "latency_ms_mean": (self.service_total * 1000 / self.requests) if self.requests else 0.0,
        }
        for bound, count in zip(BUCKETS_MS, self.hist, strict=False):
            out[f"latency_le_{bound}ms"] = count
        out["latency_gt_60000ms"] = self.hist[-1]
        for code, n in self.errors.items():
            out[f"error_{code}"] = n
        return out


class FileLogSink:
    """Access lines appended to a file (benchmarks, or a host's own log shipper)."""

    def __init__(self, path: str) -> None:
        self.f = open(path, "a", buffering=1 << 16)  # noqa: SIM115

    def emit(self, app: str, source: str, text: str, timestamp: float | None = None) -> None:
        self.f.write(text)
        self.f.write("\n")

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class Observer:
    """Collects one record per request; formats and ships them in batches."""

    log = Logger()

    def __init__(self, log_sink: Any | None, stats_sink: Any | None, enabled: bool = True) -> None:
        self.log_sink = log_sink
        self.stats_sink = stats_sink
        self.enabled = enabled
        self.pending: list[tuple[Any, ...]] = []
        self.apps: dict[str, AppStats] = {}
        self.totals: dict[str, int] = {}
        # since start, per app: what /metrics shows (merged at each stats flush, so the
        # hot path counts once)
        self.cumulative: dict[str, AppStats] = {}

    def record(
        self, t0: float, app: str, method: bytes, target: bytes, host: str, status: int,
        nbytes: int, connect_s: float, service_s: float, backend: str, request_id: bytes,
        code: str,
    ) -> None:
        st = self.apps.get(app)
        if st is None:
            st = self.apps[app] = AppStats()
        st.requests += 1
        st.status[status // 100 if status < 600 else 5] += 1
        st.bytes_out += nbytes
        st.service_total += service_s
        st.hist[bisect_left(_BOUNDS_S, service_s)] += 1
        if code:
            st.errors[code] = st.errors.get(code, 0) + 1
            self.totals[code] = self.totals.get(code, 0) + 1
            if status == 502 or status == 504:
                k = (status, code)
                st.upstream[k] = st.upstream.get(k, 0) + 1
        if self.enabled:
            self.pending.append((t0, app, method, target, host, status, nbytes, connect_s,
                                 service_s, backend, request_id, code))

    def flush(self) -> None:
        """Format and emit pending access lines (called every ~0.5 s)."""
        pending = self.pending
        if not pending:
            return
        self.pending = []
        sink = self.log_sink
        if sink is None:
            return
        for (t0, app, method, target, host, status, nbytes, connect_s, service_s, backend,
             rid, code) in pending:
            text = (
                f'{method.decode("latin-1")} {target.decode("latin-1")} host={host} '
                f"status={status} bytes={nbytes} connect_ms={connect_s * 1000:.1f} "
                f"service_ms={service_s * 1000:.1f} backend={backend or '-'} "
                f"request_id={rid.decode('latin-1')} error={code or '-'}"
            )
            try:
                sink.emit(app or "-", "router", text, t0)
            except Exception:
                self.log.failure("access log sink failed")
                return
        fl = getattr(sink, "flush", None)
        if fl is not None:
            fl()

    def flush_stats(self) -> None:
        apps = self.apps
        if not apps:
            return
        self.apps = {}
        for app, st in apps.items():
            total = self.cumulative.get(app)
            if total is None:
                total = self.cumulative[app] = AppStats()
            total.requests += st.requests
            total.bytes_out += st.bytes_out
            total.service_total += st.service_total
            total.status = [a + b for a, b in zip(total.status, st.status, strict=True)]
            total.hist = [a + b for a, b in zip(total.hist, st.hist, strict=True)]
            for code, n in st.errors.items():
                total.errors[code] = total.errors.get(code, 0) + n
            for k, n in st.upstream.items():
                total.upstream[k] = total.upstream.get(k, 0) + n
        if self.stats_sink is None:
            return
        for app, st in apps.items():
            try:
                self.stats_sink.emit_stats(app or "-", "router", st.values())
            except Exception:
                self.log.failure("stats sink failed")
                return


def metric_families(cumulative: dict[str, AppStats]) -> list[Any]:
    """Per-app request counters and latency histograms for /metrics (Prometheus)."""
    from epio.metrics import Family

    requests = Family("epio_lb_requests_total", "counter",
                      "Requests the router answered, by app and status class "
                      "(0xx: the client closed first)")
    errors = Family("epio_lb_errors_total", "counter",
                    "Requests the router answered itself, by app and error code")
    latency = Family("epio_lb_request_duration_seconds", "histogram",
                     "Time from the request to the last response byte, by app")
    sent = Family("epio_lb_response_bytes_total", "counter", "Response bytes sent, by app")
    upstream = Family("epio_lb_upstream_errors_total", "counter",
                      "502 and 504 answers by app, status, error code and fault: 'connect' "
                      "(the instance could not be reached) or 'app' (it was reached and "
                      "failed the request)")
    for app, st in sorted(cumulative.items()):
        for cls, n in enumerate(st.status):
            if n:
                requests.samples.append(("", {"app": app, "class": f"{cls}xx"}, float(n)))
        for code, n in sorted(st.errors.items()):
            errors.samples.append(("", {"app": app, "code": code}, float(n)))
        running = 0
        for bound, n in zip(_BOUNDS_S, st.hist, strict=False):
            running += n
            latency.samples.append(("_bucket", {"app": app, "le": repr(bound)}, float(running)))
        latency.samples.append(("_bucket", {"app": app, "le": "+Inf"}, float(st.requests)))
        latency.samples.append(("_sum", {"app": app}, st.service_total))
        latency.samples.append(("_count", {"app": app}, float(st.requests)))
        sent.samples.append(("", {"app": app}, float(st.bytes_out)))
        for (status, code), n in sorted(st.upstream.items()):
            upstream.samples.append(("", {"app": app, "status": str(status), "code": code,
                                          "fault": UPSTREAM_FAULT.get(code, "app")}, float(n)))
    return [requests, errors, latency, sent, upstream]
