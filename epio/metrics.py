"""Prometheus metrics: counters, gauges and histograms, and a ``/metrics`` resource.

Any role records into the node's :class:`MetricsRegistry` (``registry_for(node)``)
and the node serves the text exposition format 0.0.4 at ``/metrics`` on the
``metrics.listen`` endpoint -- a *local* address, since it is unauthenticated::

    reg = registry_for(node)
    lines = reg.counter("epio_log_lines_received_total", "Log lines received.", ["app", "source"])
    lines.labels("hello", "web.1").inc()
    ensure_metrics_service(node, parent)      # once per node; no-op if metrics.listen is empty

Other counters that already exist elsewhere (the bus's) are exported with a
collector: ``reg.add_collector(fn)`` where ``fn()`` returns :class:`Family`
objects built at scrape time.  No dependency: the format is small and is tested
against ``prometheus_client``'s parser.

The same listener answers ``GET /status`` with a JSON document for people and
scripts: one section per ``reg.add_status(name, fn)`` (the router's view of the
nexuses, a nexus's table), each ``fn()`` called at request time.  A section
that fails says ``{"error": "unavailable"}`` and is logged; nothing else of the
failure reaches the response.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

from attrs import define, field
from twisted.application.service import IService, IServiceCollection
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

if TYPE_CHECKING:
    from epio.node import Node

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _esc_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _esc_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


@define
class Family:
    """One metric family at scrape time: name, type, help and its samples
    ``(suffix, labels, value)``."""

    name: str
    type: str
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(factory=list)

    def render(self) -> str:
        out = [f"# HELP {self.name} {_esc_help(self.help)}", f"# TYPE {self.name} {self.type}"]
        for suffix, labels, value in self.samples:
            if labels:
                lab = ",".join(f'{k}="{_esc_label(str(v))}"' for k, v in labels.items())
                out.append(f"{self.name}{suffix}{{{lab}}} {_fmt(value)}")
            else:
                out.append(f"{self.name}{suffix} {_fmt(value)}")
        return "\n".join(out) + "\n"


class _Metric:
    type = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for n in labelnames:
            if not _LABEL_RE.match(n) or n.startswith("__"):
                raise ValueError(f"invalid label name {n!r}")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        # the labels its samples keep (None: every one); the others are summed away at
        # scrape time, so a family's series stay as many as the kept values, not one
        # per app (see :meth:`export_by`)
        self._kept: tuple[int, ...] | None = None

    def _new_child(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: str) -> Any:
        """The child for these label values (created on first use)."""
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            child = self._children[values] = self._new_child()
        return child

    def _only(self) -> Any:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use .labels()")
        return self.labels()

    def remove(self, *values: str) -> None:
        self._children.pop(values, None)

    def export_by(self, labelnames: Sequence[str] | None) -> None:
        """Export the samples summed over every label but ``labelnames`` (None: every
        label, the default): ``export_by(["reason"])`` of a counter labelled
        ``app, source, reason`` renders one series per reason.  Children are still
        recorded (and read with ``.value``) per full label set."""
        if labelnames is None:
            self._kept = None
            return
        unknown = [n for n in labelnames if n not in self.labelnames]
        if unknown:
            raise ValueError(f"{self.name} has no labels {unknown}")
        self._kept = tuple(i for i, n in enumerate(self.labelnames) if n in labelnames)

    def _samples(self, value: Callable[[Any], float]) -> list[tuple[str, dict[str, str], float]]:
        """``("", labels, value)`` of each child, or of each kept-label group summed."""
        if self._kept is None:
            return [("", dict(zip(self.labelnames, vals, strict=True)), value(child))
                    for vals, child in sorted(self._children.items())]
        sums: dict[tuple[str, ...], float] = {}
        for vals, child in self._children.items():
            key = tuple(vals[i] for i in self._kept)
            sums[key] = sums.get(key, 0.0) + value(child)
        names = [self.labelnames[i] for i in self._kept]
        return [("", dict(zip(names, key, strict=True)), total)
                for key, total in sorted(sums.items())]

    def family(self) -> Family:
        raise NotImplementedError


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, n: float = 1) -> None:
        if n < 0:
            raise ValueError("a counter only goes up")
        self.value += n


class Counter(_Metric):
    type = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r} must end in _total")
        super().__init__(name, help, labelnames)

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def inc(self, n: float = 1) -> None:
        self._only().inc(n)

    def value(self, *values: str) -> float:
        child = self._children.get(values)
        return 0.0 if child is None else child.value

    def family(self) -> Family:
        # format 0.0.4: the TYPE line and the sample share the full _total name
        fam = Family(self.name, "counter", self.help)
        fam.samples.extend(self._samples(lambda child: float(child.value)))
        return fam


class _GaugeChild:
    __slots__ = ("value", "fn")

    def __init__(self) -> None:
        self.value = 0.0
        self.fn: Callable[[], float] | None = None

    def set(self, v: float) -> None:
        self.value = float(v)

    def inc(self, n: float = 1) -> None:
        self.value += n

    def dec(self, n: float = 1) -> None:
        self.value -= n

    def set_function(self, fn: Callable[[], float]) -> None:
        self.fn = fn

    def get(self) -> float:
        return float(self.fn()) if self.fn is not None else self.value


class Gauge(_Metric):
    type = "gauge"

    def _new_child(self) -> _GaugeChild:
        return _GaugeChild()

    def set(self, v: float) -> None:
        self._only().set(v)

    def inc(self, n: float = 1) -> None:
        self._only().inc(n)

    def dec(self, n: float = 1) -> None:
        self._only().dec(n)

    def set_function(self, fn: Callable[[], float]) -> None:
        self._only().set_function(fn)

    def family(self) -> Family:
        fam = Family(self.name, "gauge", self.help)
        fam.samples.extend(self._samples(lambda child: float(child.get())))
        return fam


class _HistogramChild:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.bounds):
            if v <= b:
                self.counts[i] += 1
                break


class Histogram(_Metric):
    type = "histogram"

    def export_by(self, labelnames: Sequence[str] | None) -> None:
        if labelnames is not None:
            raise ValueError(f"{self.name}: a histogram exports every label")

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        super().__init__(name, help, labelnames)
        if "le" in self.labelnames:
            raise ValueError("a histogram cannot have a label named le")
        bs = tuple(sorted(float(b) for b in buckets))
        if not bs or bs != tuple(sorted(set(bs))):
            raise ValueError("histogram buckets must be distinct")
        self.buckets = bs

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self.buckets)

    def observe(self, v: float) -> None:
        self._only().observe(v)

    def family(self) -> Family:
        fam = Family(self.name, "histogram", self.help)
        for vals, child in sorted(self._children.items()):
            base = dict(zip(self.labelnames, vals, strict=True))
            acc = 0
            for b, c in zip(self.buckets, child.counts, strict=True):
                acc += c
                fam.samples.append(("_bucket", {**base, "le": repr(b)}, acc))
            fam.samples.append(("_bucket", {**base, "le": "+Inf"}, child.count))
            fam.samples.append(("_sum", base, child.sum))
            fam.samples.append(("_count", base, child.count))
        return fam


class MetricsRegistry:
    """The metrics of one node.  Registering the same name twice returns the
    existing metric (so two roles in one process can share one), as long as the
    type and labels agree."""

    log = Logger()

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Callable[[], Iterable[Family]]] = []
        self._status: dict[str, Callable[[], Any]] = {}
        self._listener: IService | None = None  # the /metrics listener, made once

    @property
    def listener(self) -> IService | None:
        """The service serving this registry on ``metrics.listen``, once made."""
        return self._listener

    def serve(self, service: IService) -> IService:
        """Remember ``service`` as this registry's one listener (a second is refused:
        two roles of one process share one ``/metrics``)."""
        if self._listener is not None:
            raise RuntimeError("this registry is already served")
        self._listener = service
        return service

    def _get(self, cls: type, name: str, help: str, labelnames: Sequence[str], **kw: Any) -> Any:
        m = self._metrics.get(name)
        if m is not None:
            if type(m) is not cls or m.labelnames != tuple(labelnames):
                raise ValueError(f"metric {name} already registered differently")
            return m
        m = self._metrics[name] = cls(name, help, labelnames, **kw)
        return m

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        c: Counter = self._get(Counter, name, help, labelnames)
        return c

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        g: Gauge = self._get(Gauge, name, help, labelnames)
        return g

    def histogram(self, name: str, help: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = DEFAULT_BUCKETS) -> Histogram:
        h: Histogram = self._get(Histogram, name, help, labelnames, buckets=buckets)
        return h

    def add_collector(self, fn: Callable[[], Iterable[Family]]) -> None:
        """``fn()`` returns families computed at scrape time."""
        self._collectors.append(fn)

    def families(self) -> list[Family]:
        fams = [m.family() for _, m in sorted(self._metrics.items())]
        for fn in self._collectors:
            try:
                fams.extend(fn())
            except Exception:
                self.log.failure("a metrics collector failed")
        return fams

    def add_status(self, name: str, fn: Callable[[], Any]) -> None:
        """``fn()`` returns the JSON-able section ``name`` of ``GET /status``."""
        if name in self._status:
            raise ValueError(f"status section {name} already registered")
        self._status[name] = fn

    def status(self) -> dict[str, Any]:
        """Every status section, computed now."""
        out: dict[str, Any] = {}
        for name, fn in sorted(self._status.items()):
            try:
                section = fn()
                json.dumps(section)  # a section that cannot be sent is a failed one
            except Exception:
                self.log.failure("status section {name} failed", name=name)
                section = {"error": "unavailable"}
            out[name] = section
        return out

    def render(self) -> bytes:
        """The text exposition format 0.0.4."""
        return "".join(f.render() for f in self.families()).encode("utf-8")


class _RegistryResource(Resource):
    """A leaf resource over the node's registry."""

    isLeaf = True

    def __init__(self, registry: MetricsRegistry) -> None:
        Resource.__init__(self)
        self.registry = registry


class MetricsResource(_RegistryResource):
    """``GET /metrics`` (the resource answers at any path it is mounted on)."""

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE)
        return self.registry.render()

    def render_HEAD(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE)
        return b""


class StatusResource(_RegistryResource):
    """``GET /status``: the registry's status sections as one JSON object."""

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.registry.status(), indent=1, sort_keys=True).encode() + b"\n"


def metrics_site(registry: MetricsRegistry) -> Site:
    root = Resource()
    root.putChild(b"metrics", cast(IResource, MetricsResource(registry)))
    root.putChild(b"status", cast(IResource, StatusResource(registry)))
    site = Site(root)
    site.displayTracebacks = False
    return site


def metrics_service(reactor: IReactorTime, listen: str, registry: MetricsRegistry) -> IService:
    """A service listening on ``listen`` (endpoint string) serving ``/metrics``."""
    from twisted.internet.endpoints import serverFromString

    from epio.listen import required_listener

    # cannot listen: the node stops (epio.tap.NodeService)
    svc = required_listener(serverFromString(reactor, listen), metrics_site(registry))
    svc.setName("metrics")
    return cast(IService, svc)


def registry_for(node: Node) -> MetricsRegistry:
    """The one registry of ``node`` (``node.metrics``, made with the node)."""
    return node.metrics


def bus_families(snapshot: dict[str, int]) -> list[Family]:
    """The bus's counters (``bus.counters.snapshot()``) as one counter family:
    ``epio_bus_events_total{event="sent"|"received"|"dropped.hwm"|"rejected.stale"|...}``."""
    fam = Family("epio_bus_events_total", "counter",
                 "Bus messages sent, received, dropped and rejected on this node, by event.")
    for name, value in sorted(snapshot.items()):
        fam.samples.append(("", {"event": name}, float(value)))
    return [fam]


def node_listener(node: Node) -> IService | None:
    """The node's ``/metrics`` listener on ``metrics.listen`` (None when empty), made
    once: the registry keeps it, so two roles of one process share it."""
    listen = node.settings.metrics.listen
    if not listen:
        return None
    reg = node.metrics
    if reg.listener is not None:
        return reg.listener
    bus = node.bus
    reg.add_collector(lambda: bus_families(bus.counters.snapshot()))
    return reg.serve(metrics_service(node.reactor, listen, reg))


def ensure_metrics_service(node: Node, parent: IServiceCollection) -> IService | None:
    """Start the node's ``/metrics`` listener under ``parent`` unless some role (or
    tap) already did, or ``metrics.listen`` is empty.  Returns the service."""
    made = node.metrics.listener is None
    svc = node_listener(node)
    if made and svc is not None:
        svc.setServiceParent(parent)
    return svc
