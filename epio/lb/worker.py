"""A router worker process (``lb.workers > 1``): the same router on the same port.

Started by :class:`epio.lb.service.LBService` (its :class:`~epio.lb.service.ChildMonitor`)
with its settings in the environment variable ``EPIO_LB_WORKER_SPEC`` (JSON: the
validated config, the data dir and the addresses, HTTP and TLS, to open with
SO_REUSEPORT).  It logs to stdout (the parent relays the lines), reloads routes on
SIGHUP and stops on SIGTERM: its service tree (the router, its store, its log sink and
:class:`~epio.lb.service.RouterProcess`) is started and stopped the way ``twistd``
does.  With TLS or ACME configured it opens the store itself, to follow the
certificates and challenges (:mod:`epio.certs.router`).
"""

from __future__ import annotations

from pathlib import Path

from attrs import evolve
from twisted.application.service import Service


def main() -> None:
    from epio.certs.router import needs_store, router_certs
    from epio.lb.service import (
        LBService,
        RouterProcess,
        make_waker,
        ocsp_stapler,
        pipeline_sinks,
        route_source,
        run_child,
        start_child,
    )

    reactor, spec, node = start_child("EPIO_LB_WORKER_SPEC", needs_store)
    settings = evolve(node.settings.lb, workers=1)
    # the parent's route feed process, when it runs one, serves every worker
    feed_socket = spec.get("feed_socket")
    source = route_source(node, Path(feed_socket) if feed_socket else None)
    log_sink, stats_sink, sink_service = pipeline_sinks(node, bool(settings.routes_file))
    iface, port, family = spec["reuseport"]
    tls = spec.get("tls_reuseport")
    # certificates and ACME answers from the store, like the parent's (docs/https.md),
    # and the process's own OCSP responses
    stapler = ocsp_stapler(reactor, settings)
    waker, wake_dealer = make_waker(node)  # runner.wake for asleep apps
    svc = LBService(reactor, settings, node.settings.node.domain, source, log_sink,
                    stats_sink, reuseport=(iface, int(port), int(family)),
                    static_secret=node.secret, spool=Path(spec["spool_dir"]),
                    certs=router_certs(node, stapler), stapler=stapler,
                    tls_reuseport=(tls[0], int(tls[1]), int(tls[2])) if tls else None,
                    waker=waker)
    if node.store_service is not None:
        node.store_service.setServiceParent(svc)  # type: ignore[no-untyped-call]
    if sink_service is not None:
        sink_service.setServiceParent(svc)
    if wake_dealer is not None:
        wake_dealer.setServiceParent(svc)
    services: list[Service] = [svc, RouterProcess(reactor, svc)]
    run_child(reactor, "epio-lb-worker", services)


if __name__ == "__main__":
    main()
