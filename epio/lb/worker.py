"""A router worker process (``lb.workers > 1``): the same router on the same port.

Started by :class:`epio.lb.service.LBService` with its settings in the
environment variable ``EPIO_LB_WORKER_SPEC`` (JSON: the validated config, the
data dir and the address to open with SO_REUSEPORT).  It logs to stdout (the
parent relays the lines), reloads routes on SIGHUP and stops on SIGTERM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def main() -> None:
    from epio.lb.service import LBService, pipeline_sinks, start_child
    from epio.routing import FileRouteSource

    reactor, spec, node = start_child("EPIO_LB_WORKER_SPEC")
    config = node.config
    section = dict(config["lb"])
    section["workers"] = 1
    source: Any
    if section.get("routes_file"):
        source = FileRouteSource(Path(section["routes_file"]))
    elif spec.get("feed_socket"):  # the parent's route feed process serves every worker
        from epio.lb.feed import FeedProcessSource

        source = FeedProcessSource(reactor, Path(spec["feed_socket"]),
                                   len(config["cluster"]["nexus"]))
    else:
        from epio.routefeed import make_route_source

        source = make_route_source(node)
    log_sink, stats_sink, sink_service = pipeline_sinks(node, bool(section.get("routes_file")))
    iface, port, family = spec["reuseport"]
    svc = LBService(reactor, section, config["node"]["domain"], source, log_sink, stats_sink,
                    reuseport=(iface, int(port), int(family)), static_secret=node.secret)
    if sink_service is not None:
        sink_service.setServiceParent(svc)
    svc.startService()
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
