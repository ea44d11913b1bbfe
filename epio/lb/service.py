"""The ``lb`` role: the router's service (listeners, route source, workers).

``make_service(node)`` builds an :class:`LBService` from ``node.settings.lb``.
Routes come from ``lb.routes_file`` (reloaded on SIGHUP) or, without one, from
the nexus feed (:mod:`epio.routefeed`).  With ``lb.workers = N > 1`` the
listening socket is opened with SO_REUSEPORT and N-1 worker processes
(``python -m epio.lb.worker``) open the same port with the same settings and
route source; the kernel spreads connections over them.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import select
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.runner.procmon import ProcessMonitor

from epio.config import Config, Settings
from epio.config.settings import LbSettings
from epio.lb.fastio import ReadMux
from epio.lb.feed import FEED_RESTART
from epio.lb.observe import FileLogSink, Observer
from epio.lb.proxy import LB, SWEEP_INTERVAL, LBFactory
from epio.lb.proxy import Settings as ProxySettings
from epio.listen import ConnectionLimit, log_backlog, stop_on_listen_failure, with_backlog
from epio.node import Node
from epio.routing import FileRouteSource, RouteTable

if TYPE_CHECKING:
    from epio.certs.ocsp import Stapler
    from epio.metrics import Family

FLUSH_INTERVAL = 0.5
GC_THRESHOLDS = (5000, 20, 100)  # CPython's default is (700, 10, 10)
TLS_RESCAN_INTERVAL = 5.0


def die_with_parent() -> None:
    """In a worker or the route feed process: SIGTERM when the router's parent goes,
    however it went (Linux ``PR_SET_PDEATHSIG``), so no orphan keeps the router's port
    or follows the nexuses for nobody.  Exits at once if the parent is already gone."""
    parent = int(os.environ.get("EPIO_LB_PARENT", "0"))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if parent and os.getppid() != parent:  # it went before the line above
        sys.exit(0)


class WorkerSpec(TypedDict):
    """What a worker process is told (JSON in ``EPIO_LB_WORKER_SPEC``)."""

    config: dict[str, Any]  # the node's validated config, as Config.as_dict() gives it
    data_dir: str
    spool_dir: str
    feed_socket: NotRequired[str]  # the route feed process's socket, when there is one
    reuseport: NotRequired[list[str | int]]  # [interface, port, family] to bind
    tls_reuseport: NotRequired[list[str | int]]  # the same for lb.tls_listen


class FeedSpec(TypedDict):
    """What the route feed process is told (JSON in ``EPIO_LB_FEED_SPEC``)."""

    config: dict[str, Any]
    socket: str  # the UNIX socket it serves the routers on


def start_child(variable: str, store_if: Callable[[Settings], bool] | None = None,
                ) -> tuple[Any, dict[str, Any], Node]:
    """The start of a router child process (a worker, the route feed process): die with
    the parent, log to stdout (the parent relays the lines), read the JSON spec from the
    environment ``variable``; returns the reactor, the spec and the prepared node, with a
    store service of its own when ``store_if(settings)`` says it needs one."""
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from epio.config import validate
    from epio.node import installed_reactor

    reactor = installed_reactor()
    die_with_parent()
    spec = json.loads(os.environ[variable])
    observer: Any = textFileLogObserver(sys.stdout)
    globalLogBeginner.beginLoggingTo([observer])
    config = validate(spec["config"])
    store = None
    if store_if is not None and store_if(config.settings):
        from epio.store import StoreService

        def store(c: Config, d: Path) -> StoreService:
            return StoreService.from_config(c, d, reactor=reactor)

    node = Node.prepare(reactor, config, frozenset({"lb"}), store)
    return reactor, spec, node


def run_child(reactor: Any, name: str, services: list[Service]) -> None:
    """Run a child process's service tree as ``twistd`` would: started once the reactor
    runs, stopped (its Deferreds awaited) before the reactor shuts down (SIGTERM)."""
    from twisted.application.app import startApplication
    from twisted.application.service import Application

    application = Application(name)
    for svc in services:
        svc.setServiceParent(application)
    startApplication(application, False)
    reactor.run()


def spool_dir(data_dir: Path) -> Path:
    """The router's private directory for spooled request bodies: ``DATA_DIR/run/tmp``
    (0700, like ``run``); the files in it are unlinked as soon as they are made."""
    run = data_dir / "run"
    path = run / "tmp"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for d in (run, path):
        if d.is_symlink():
            raise ValueError(f"{d} is a symbolic link; the router keeps request bodies there")
        os.chmod(d, 0o700)
    return path


def reuseport_address(reactor: Any, description: str) -> tuple[str, int, int]:
    """``tcp:8080[:interface=X]`` / ``tcp6:...`` -> (interface, port, family), parsed by
    Twisted's own :func:`serverFromString` (escapes and all); SO_REUSEPORT needs a socket
    made by hand, so only the address is taken from the endpoint."""
    ep = serverFromString(reactor, description)
    if not isinstance(ep, TCP4ServerEndpoint | TCP6ServerEndpoint):
        raise ValueError(f"lb.workers > 1 needs a tcp: or tcp6: endpoint, not {description!r}")
    # the endpoint keeps its address in private attributes; there is no public accessor
    iface: str = ep._interface
    port: int = ep._port
    family = (socket.AF_INET6 if isinstance(ep, TCP6ServerEndpoint) or ":" in iface
              else socket.AF_INET)
    return iface, port, family


def reuseport_socket(iface: str, port: int, family: int, backlog: int = 4096) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((iface or ("::" if family == socket.AF_INET6 else ""), port))
    s.listen(backlog)
    s.setblocking(False)
    return s


FEED = "route feed"


class _ChildLog(Logger):
    """ProcessMonitor's log, relaying a child's lines as ``NAME: LINE`` (as always)."""

    def info(self, format: str | None = None, **kwargs: object) -> None:
        if "tag" in kwargs and "line" in kwargs:  # procmon's LineLogger
            super().info("{name}: {line}", name=kwargs["tag"], line=kwargs["line"])
        else:
            super().info(format, **kwargs)


class ChildMonitor(ProcessMonitor):
    """The router's child processes (the route feed process, the workers), restarted by
    Twisted's :class:`ProcessMonitor`: at once after a long life, with a doubling delay
    (``minRestartDelay`` up to ``maxRestartDelay``) after a death within ``threshold``
    seconds of its start.  Each line a child prints is relayed to the node log.

    :meth:`stop` sends every child SIGTERM (SIGKILL ``killTime`` seconds later) and
    returns a Deferred that fires once every one has ended."""

    log = _ChildLog()
    threshold = 5
    minRestartDelay = FEED_RESTART
    maxRestartDelay = 60

    def __init__(self, reactor: Any, kill_time: int) -> None:
        super().__init__(reactor)
        self.killTime = kill_time
        self._ended: dict[str, list[defer.Deferred[None]]] = {}

    def add(self, name: str, module: str, variable: str, payload: str) -> None:
        """Run ``python -m module`` with ``payload`` in the environment ``variable``."""
        env = dict(os.environ)
        env[variable] = payload
        env["EPIO_LB_PARENT"] = str(os.getpid())
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).resolve().parents[2])] + ([env["PYTHONPATH"]]
                                                          if env.get("PYTHONPATH") else []))
        self.addProcess(name, [sys.executable, "-m", module], env=env)

    def signal_workers(self, signal_name: str) -> None:
        for name, proto in list(self.protocols.items()):
            if name != FEED and proto.transport is not None:
                try:
                    proto.transport.signalProcess(signal_name)
                except ProcessExitedAlready:
                    continue

    def stop(self) -> defer.Deferred[None]:
        """Stop every child; fires once all have ended."""
        ended: list[defer.Deferred[None]] = []
        for name in self.protocols:
            d: defer.Deferred[None] = defer.Deferred()
            self._ended.setdefault(name, []).append(d)
            ended.append(d)
        if self.running:
            self.stopService()
        return defer.gatherResults(ended).addCallback(lambda _: None)

    def _monitoredProcessExited(self, name: str, reason: Failure | None = None) -> None:
        super()._monitoredProcessExited(name, reason)
        for d in self._ended.pop(name, []):
            d.callback(None)
        call = self.restart.get(name)
        if not self.running or call is None or not call.active():
            return
        secs = max(0.0, call.getTime() - self._clock.seconds())
        if name == FEED:
            self.log.error("route feed process exited; restarting it in {secs:g}s "
                           "(the router serves its last route table meanwhile)", secs=secs)
        else:
            self.log.error("router {name} exited; restarting it in {secs:g}s",
                           name=name, secs=secs)


class LBService(MultiService):
    """One router process (and, with workers, the parent of the others).

    Lifecycle: ``startService`` starts the route source, the periodic tasks and the
    child processes (:class:`ChildMonitor`), then listens once the first route table
    came (or ``lb.routes_wait`` passed); ``whenReady()`` fires with the ports.
    ``stopService`` stops listening, stops the children, drains the in-flight requests
    (``lb.shutdown_timeout``), then stops the rest.  Process-wide concerns (SIGHUP, the
    garbage collector) are :class:`RouterProcess`'s, not this service's."""

    log = Logger()

    def __init__(self, reactor: Any, settings: LbSettings, domain: str,
                 route_source: Any, log_sink: Any = None,
                 stats_sink: Any = None, *, worker_spec: WorkerSpec | None = None,
                 reuseport: tuple[str, int, int] | None = None,
                 static_secret: bytes = b"", feed_spec: FeedSpec | None = None,
                 spool: Path | None = None, certs: Any = None,
                 tls_reuseport: tuple[str, int, int] | None = None,
                 stapler: Stapler | None = None, waker: Any = None,
                 cannot_listen: Callable[[Failure], None] | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        # a router of a node that cannot listen stops the node (epio.listen)
        self._cannot_listen = cannot_listen
        self.reactor = reactor
        self.lb_settings = settings
        self.settings = ProxySettings.from_settings(settings)
        self.table = RouteTable(domain, clock=reactor)
        self.route_source = route_source  # an IRouteSource, or None
        access = settings.access_log
        self._file_sink = None
        if access == "off":
            observer = Observer(None, stats_sink, enabled=False)
        elif access and access != "local":
            self._file_sink = FileLogSink(access)
            observer = Observer(self._file_sink, stats_sink)
        else:
            observer = Observer(log_sink, stats_sink)
        self.certs = certs  # epio.certs.router.RouterCerts (docs/https.md), or None
        self.stapler = stapler  # OCSP stapling for the TLS listener (docs/https.md), or None
        mux = (ReadMux(reactor) if hasattr(reactor, "_disconnectSelectable")
               and hasattr(select, "epoll") else None)
        self.lb = LB(reactor, self.table, self.settings, observer,
                     spool_dir=str(spool) if spool is not None else None, acme=certs,
                     static_secret=static_secret, mux=mux,  # static: docs/static.md
                     waker=waker.wake if waker is not None else None)  # asleep apps
        # per listener (and per router process): docs/router.md "Resources"
        self.limit = ConnectionLimit("router", settings.max_connections)
        self.tls_limit = ConnectionLimit("router (TLS)", settings.max_connections)
        self.worker_spec = worker_spec
        self.reuseport = reuseport
        self.tls_reuseport = tls_reuseport  # a worker's TLS address (SO_REUSEPORT)
        self.ports: list[Any] = []
        self.sni: Any = None
        self._loops: list[LoopingCall] = []
        # the route feed process and the workers: a worker may drain for
        # lb.shutdown_timeout after SIGTERM before it is killed
        self.children = ChildMonitor(reactor, int(settings.shutdown_timeout) + 10)
        if feed_spec is not None:  # run the route feed process (epio.lb.feed)
            self.children.add(FEED, "epio.lb.feed", "EPIO_LB_FEED_SPEC", json.dumps(feed_spec))
        self._stopping = False
        self._ready: defer.Deferred[None] = defer.Deferred()
        self._ready_result: Any = None
        self._waiters: list[defer.Deferred[Any]] = []
        self._waiting_routes: defer.Deferred[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def whenReady(self) -> defer.Deferred[Any]:
        """Fires with the list of listening ports once every listener is up."""
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiters.append(d)
        if self._ready.called:
            self._fire_waiters(self._ready_result)
        return d

    def _fire_waiters(self, failure: Any) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if failure is None:
                d.callback(self.ports)
            else:
                d.errback(failure)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._stopping = False
        lb = self.lb
        self.children.startService()
        if self.route_source is not None:
            try:
                self.route_source.start(self.table)
            except Exception:
                self.log.failure("route source {source} failed to start",
                                 source=getattr(self.route_source, "description", "?"))
        else:
            self.log.warn("router has no route source: every host answers 404")
        for interval, fn in ((SWEEP_INTERVAL, lb.sweep), (FLUSH_INTERVAL, lb.observer.flush),
                             (self.lb_settings.stats_interval, lb.observer.flush_stats)):
            loop = LoopingCall(self._guard, fn)
            loop.clock = self.reactor
            loop.start(interval, now=False)
            self._loops.append(loop)
        if self.certs is not None:
            self.certs.start()
        if self.stapler is not None:
            from epio.certs.ocsp import CHECK_INTERVAL

            loop = LoopingCall(self._guard, self.stapler.tick)
            loop.clock = self.reactor
            loop.start(CHECK_INTERVAL, now=False)
            self._loops.append(loop)
        if self.lb.mux is not None:
            self.lb.mux.start()
        d = defer.ensureDeferred(self._listen())
        d.addCallbacks(self._listening, self._listen_failed)

    async def _routes_ready(self) -> None:
        """Wait for the route source's first table, at most ``lb.routes_wait`` seconds.

        A router that listened before it had routes would answer 404 for every app
        until its first table came (docs/router.md, "Routes")."""
        when_ready = getattr(self.route_source, "when_ready", None)
        wait = self.lb_settings.routes_wait
        if when_ready is None or wait <= 0:
            return
        ready = self._waiting_routes = when_ready()
        if ready.called:
            return
        timer = self.reactor.callLater(wait, ready.cancel)
        try:
            await ready
        except defer.CancelledError:
            if not self._stopping:
                self.log.warn("no route table after {secs:g}s (lb.routes_wait): listening "
                              "without one; every host answers 404 until it comes", secs=wait)
        finally:
            self._waiting_routes = None
            if timer.active():
                timer.cancel()

    async def _listen(self) -> list[Any]:
        await self._routes_ready()
        if self._stopping:  # stopped while waiting for routes: never listen
            return self.ports
        section = self.lb_settings
        tls_sock: socket.socket | None = None  # the parent's, with lb.workers > 1
        factory = LBFactory(self.lb, b"http", self.limit)
        backlog = log_backlog("router", section.backlog)
        if self.reuseport is not None:
            iface, port, family = self.reuseport
            sock = reuseport_socket(iface, port, family, backlog)
            self.ports.append(self.reactor.adoptStreamPort(sock.fileno(), family, factory))
            sock.close()
        elif section.workers > 1:
            iface, port, family = reuseport_address(self.reactor, section.listen)
            sock = reuseport_socket(iface, port, family, backlog)
            port = sock.getsockname()[1]
            self.ports.append(self.reactor.adoptStreamPort(sock.fileno(), family, factory))
            sock.close()
            if section.tls_listen:  # every worker serves TLS too
                t_iface, t_port, t_family = reuseport_address(self.reactor, section.tls_listen)
                tls_sock = reuseport_socket(t_iface, t_port, t_family, backlog)
                self.tls_reuseport = (t_iface, tls_sock.getsockname()[1], t_family)
                if section.tls_affinity == "client":  # docs/https.md "Router processes"
                    from epio.lb.affinity import attach_client_affinity

                    try:
                        attach_client_affinity(tls_sock, section.workers)
                    except OSError as e:
                        self.log.error("lb.tls_affinity: the kernel refused the program "
                                       "({error}); TLS connections spread at random",
                                       error=str(e))
                    else:
                        self.log.info("TLS connections go to router processes by client "
                                      "address (lb.tls_affinity)")
            self._add_workers(section.workers - 1, (iface, port, family))
        else:
            ep = serverFromString(self.reactor, with_backlog(section.listen, backlog))
            self.ports.append(await ep.listen(factory))
        self.limit.watch(self.ports[-1])
        if section.tls_listen:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            from epio.lb.tls import SNIContexts

            cert_dir = section.tls_cert_dir
            self.sni = SNIContexts(Path(cert_dir) if cert_dir else None, self.stapler)
            self.sni.refresh(force=True)
            if self.certs is not None:
                self.certs.on_contexts(self.sni.set_stored)
            loop = LoopingCall(self._guard, self.sni.refresh)
            loop.clock = self.reactor
            loop.start(TLS_RESCAN_INTERVAL, now=False)
            self._loops.append(loop)
            inner: Any = LBFactory(self.lb, b"https", self.tls_limit)
            tls_factory = TLSMemoryBIOFactory(self.sni, False, inner)
            if self.tls_reuseport is not None:  # lb.workers > 1: parent and every worker
                t_iface, t_port, t_family = self.tls_reuseport
                tsock = tls_sock or reuseport_socket(t_iface, t_port, t_family, backlog)
                self.ports.append(self.reactor.adoptStreamPort(tsock.fileno(), t_family,
                                                               tls_factory))
                tsock.close()
            else:
                ep = serverFromString(self.reactor, with_backlog(section.tls_listen, backlog))
                self.ports.append(await ep.listen(tls_factory))
            self.tls_limit.watch(self.ports[-1])
        return self.ports

    def _listening(self, ports: list[Any]) -> None:
        for p in ports:
            self.log.info("router listening on {addr}", addr=str(p.getHost()))
        self._ready.callback(None)
        self._fire_waiters(None)

    def _listen_failed(self, f: Failure) -> None:
        stop = self._cannot_listen if not (self._stopping or f.check(defer.CancelledError)) \
            else None
        if stop is None:
            self.log.failure("router cannot listen", f)
        if not self._ready.called:
            self._ready_result = f
            self._ready.callback(None)
            self._fire_waiters(f)
        if stop is not None:
            stop(f)

    def _guard(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:
            self.log.failure("router periodic task failed")

    def reload(self) -> None:
        """SIGHUP: re-read the routes (and certificates); pass it on to workers."""
        if self.route_source is not None:
            self.route_source.reload()
        if self.sni is not None:
            self.sni.refresh()
        self.children.signal_workers("HUP")

    def stopService(self) -> defer.Deferred[None]:
        self._stopping = True
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        lb = self.lb
        if self._waiting_routes is not None:
            self._waiting_routes.cancel()
        for p in self.ports:
            await defer.maybeDeferred(p.stopListening)
        self.ports = []
        children_ended = self.children.stop()
        lb.begin_stop()
        drained: defer.Deferred[None] = defer.Deferred()
        lb.when_drained(drained)
        timer = self.reactor.callLater(self.settings.shutdown_timeout, lambda: (
            None if drained.called else drained.callback(None)))
        await drained
        if timer.active():
            timer.cancel()
        lb.abort_all()
        if lb.mux is not None:
            lb.mux.stop()
        await children_ended
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        lb.observer.flush()
        lb.observer.flush_stats()
        if self._file_sink is not None:
            self._file_sink.close()
        if self.route_source is not None:
            self.route_source.stop()
        if self.certs is not None:
            self.certs.stop()
        await defer.maybeDeferred(super().stopService)

    def _add_workers(self, n: int, addr: tuple[str, int, int]) -> None:
        spec: dict[str, object] = dict(self.worker_spec or {})
        spec["reuseport"] = list(addr)
        if self.tls_reuseport is not None:
            spec["tls_reuseport"] = list(self.tls_reuseport)
        payload = json.dumps(spec)
        for i in range(n):
            self.children.add(f"worker {i + 1}", "epio.lb.worker", "EPIO_LB_WORKER_SPEC",
                              payload)


class RouterProcess(Service):
    """What a router process does for the whole process, decided by whoever owns the
    process (the node's root, a worker's own tree), not by the lb role itself:

    - SIGHUP reloads the router's routes and certificates (:meth:`LBService.reload`);
      a handler installed before it still gets the signal;
    - once the router listens, everything allocated so far (modules, config, tables)
      lives for the whole process: keep it out of the cyclic GC's way so full
      collections stay short, and collect less often (route churn, 10k routes/s,
      otherwise triggers a full collection every second or so, a 15-40 ms pause;
      docs/router.md)."""

    name = "lb-process"  # beside the roles in the node's tree ("service lb-process started")

    def __init__(self, reactor: Any, router: LBService) -> None:
        self.reactor = reactor
        self.router = router
        self._old_sighup: Any = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if hasattr(signal, "SIGHUP"):
            try:
                self._old_sighup = signal.signal(signal.SIGHUP, self._on_sighup)
            except ValueError:  # not the main thread (tests)
                self._old_sighup = None
        self.router.whenReady().addCallbacks(lambda _: tune_gc(), lambda _: None)

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.router.reload)
        prev = self._old_sighup
        if callable(prev):  # another handler: it gets the signal too
            prev(signum, frame)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._old_sighup is not None:
            try:
                signal.signal(signal.SIGHUP, self._old_sighup)
            except ValueError:  # not the main thread (tests)
                self._old_sighup = None


def tune_gc() -> None:
    """Freeze what exists now; collect less often (see :class:`RouterProcess`)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def pipeline_sinks(node: Node, standalone: bool) -> tuple[Any, Any, Any]:
    """(log sink, stats sink, service to run) for the router's access log and stats.

    A router fed by the nexus pushes to every configured logger (``BusLogSink``);
    a standalone router (``--routes``) or one without loggers writes to the node log.
    """
    from epio.pipeline import LocalLogSink

    loggers = node.settings.cluster.loggers
    if ((loggers or node.cluster is not None) and not standalone
            and node.settings.lb.access_log == ""):
        from epio.pipeline import BusLogSink

        sink = BusLogSink(node.bus, list(loggers), clock=node.reactor)
        if node.cluster is not None:  # a logger joins or leaves (epio.cluster)
            from epio.cluster import follow_endpoints

            follow_endpoints(node.cluster, sink=sink)
        return sink, sink, sink
    local = LocalLogSink()
    return local, local, None


def route_source(node: Node, feed_socket: Path | None) -> Any:
    """The :class:`~epio.routing.IRouteSource` of a router process: ``lb.routes_file``,
    else the node's route feed process at ``feed_socket``, else the nexuses followed
    inline.  The same for the parent and every worker."""
    routes_file = node.settings.lb.routes_file
    if routes_file:
        return FileRouteSource(Path(routes_file))
    if feed_socket is not None:
        from epio.lb.feed import FeedProcessSource
        from epio.routefeed import links_from_config

        nexuses = links_from_config(node.settings.cluster.nexus)  # bad entries fail here
        return FeedProcessSource(node.reactor, feed_socket, len(nexuses))
    from epio.routefeed import make_route_source

    return make_route_source(node)


def make_waker(node: Node) -> tuple[Any, Any]:
    """The router process's :class:`epio.lb.wake.RunnerWaker` and its bus DEALER (a
    service), or ``(None, None)`` for a router with a routes file (no asleep routes)."""
    if node.settings.lb.routes_file:
        return None, None
    from epio.lb.wake import RunnerWaker

    dealer = node.bus.dealer([])
    return RunnerWaker(dealer), dealer


def ocsp_stapler(reactor: Any, lb: LbSettings) -> Stapler | None:
    """The OCSP stapler of one router process: with a TLS listener and
    ``lb.ocsp_stapling`` (docs/https.md), else None."""
    if not (lb.tls_listen and lb.ocsp_stapling):
        return None
    from epio.certs.ocsp import Stapler

    return Stapler(reactor)


def route_feed_mode(lb: LbSettings, roles: frozenset[str]) -> str:
    """``lb.route_feed`` decided: ``"process"`` or ``"inline"``.

    ``auto`` follows inline in a one-process router whose node also runs the nexus role
    (``--role=all``): that reactor already does the nexus's own route work, several
    times the feed's (docs/router.md, "Memory of an idle node"), and a route feed process
    is a second Python interpreter (about 39 MiB RSS).  A dedicated router, or one with
    workers, keeps its route work off the proxies' reactors in the feed process."""
    if lb.route_feed != "auto":
        return lb.route_feed
    return "inline" if lb.workers == 1 and "nexus" in roles else "process"


def make_service(node: Node) -> LBService:
    """The ``lb`` role of ``node``: its composition root (every object built here)."""
    cfg = node.config
    if node.cluster is not None:
        # a child process merges its own lists (this data dir's cache, then the store it
        # follows): it gets the hand-written ones, not this process's merge
        hand = node.cluster.configured
        cfg = cfg.replace("cluster", nexus=[dict(n) for n in hand.nexus],
                          loggers=list(hand.loggers))
    lb = node.settings.lb
    spool = spool_dir(node.data_dir)
    spec: WorkerSpec = {"config": cfg.as_dict(), "data_dir": str(node.data_dir),
                        "spool_dir": str(spool)}
    feed_spec: FeedSpec | None = None
    feed_socket = None
    if not lb.routes_file and route_feed_mode(lb, node.roles) == "process":
        from epio.lb.feed import feed_socket_path

        feed_socket = feed_socket_path(node.data_dir)
        spec["feed_socket"] = str(feed_socket)
        feed_spec = {"config": cfg.as_dict(), "socket": str(feed_socket)}
    source = route_source(node, feed_socket)
    log_sink, stats_sink, sink_service = pipeline_sinks(node, bool(lb.routes_file))
    from epio.certs.router import router_certs

    waker, wake_dealer = make_waker(node)
    stapler = ocsp_stapler(node.reactor, lb)
    svc = LBService(node.reactor, lb, node.settings.node.domain, source, log_sink,
                    stats_sink, worker_spec=spec, static_secret=node.secret,
                    feed_spec=feed_spec, spool=spool, certs=router_certs(node, stapler),
                    stapler=stapler, waker=waker,
                    cannot_listen=stop_on_listen_failure(node.settings, "lb", node.exit))
    if sink_service is not None:
        sink_service.setServiceParent(svc)
    if wake_dealer is not None:
        wake_dealer.setServiceParent(svc)
    from epio.lb.observe import metric_families
    from epio.metrics import registry_for

    registry = registry_for(node)
    registry.add_collector(lambda: metric_families(svc.lb.observer.cumulative))
    registry.add_collector(lambda: listener_families(svc))
    if hasattr(source, "status"):
        registry.add_collector(lambda: route_feed_families(source.status()))

    def router_status() -> dict[str, Any]:
        table = svc.lb.table
        out: dict[str, Any] = {
            "source": getattr(source, "description", None) if source is not None else None,
            "table": {"apps": len(table), "version": table.version, "pending": table.pending},
        }
        if hasattr(source, "status"):
            out["feed"] = source.status()
        return out

    registry.add_status("router", router_status)
    return svc


def listener_families(svc: LBService) -> list[Family]:
    """This router process's listeners and spooled bodies, for /metrics."""
    from epio.metrics import Family

    limits = (("http", svc.limit), ("https", svc.tls_limit))
    return [
        Family("epio_lb_connections_open", "gauge",
               "Client connections open, by listener (max_connections applies to each)",
               [("", {"listener": n}, float(lim.open)) for n, lim in limits]),
        Family("epio_lb_listener_paused_total", "counter",
               "Times a listener reached lb.max_connections and stopped accepting",
               [("", {"listener": n}, float(lim.pauses)) for n, lim in limits]),
        Family("epio_lb_request_bodies_spooled_total", "counter",
               "Request bodies larger than lb.body_buffer_size spooled to a file",
               [("", {}, float(svc.lb.spooled))]),
        Family("epio_lb_spool_bytes", "gauge",
               "Bytes of request bodies in this router process's spool files now "
               "(lb.spool_max_bytes applies)",
               [("", {}, float(svc.lb.spool_bytes))]),
        Family("epio_lb_spool_full_total", "counter",
               "Requests answered 503 spool_full: their body would pass lb.spool_max_bytes",
               [("", {}, float(svc.lb.spool_refused))]),
    ]


def route_feed_families(status: dict[str, Any]) -> list[Family]:
    """The router's view of the nexuses, for /metrics: is it serving a stale table?"""
    from epio.metrics import Family

    return [
        Family("epio_lb_routes_stale", "gauge",
               "1 while every nexus is silent and the router serves its last route table",
               [("", {}, 1.0 if status.get("stale") else 0.0)]),
        Family("epio_lb_nexus_alive", "gauge", "Nexuses this router currently hears from",
               [("", {}, float(status.get("alive", 0)))]),
        Family("epio_lb_route_apps", "gauge", "Apps in this router's route table",
               [("", {}, float(status.get("routes", 0)))]),
    ]
