"""The configuration schema: every section, key, type, default and meaning.

This is the one source of truth: ``docs/configuration.md`` is generated from it
(``python -m epio.config.docs > docs/configuration.md``) and a test checks that
the committed page is current.  Add keys to your own section; never rename.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from attrs import frozen


@frozen
class Key:
    """One configuration key: ``kind`` is str, int, float, bool, list or dict."""

    kind: type
    default: Any
    doc: str
    # extra validation: returns a message or None
    validator: Callable[[Any], str | None] | None = None
    item_kind: type | None = None  # for lists: the type of each item

    def default_value(self) -> Any:
        if isinstance(self.default, list | dict):
            return type(self.default)(self.default)
        return self.default

    def check(self, value: Any) -> str | None:
        kind = self.kind
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            pass
        elif kind is int and isinstance(value, bool):
            return f"must be an integer, not {value!r}"
        elif not isinstance(value, kind):
            return f"must be of type {kind.__name__}, not {type(value).__name__} ({value!r})"
        if self.item_kind is not None and isinstance(value, list):
            for i, item in enumerate(value):
                if not isinstance(item, self.item_kind):
                    return f"item {i} must be of type {self.item_kind.__name__}, not {item!r}"
        if self.validator is not None:
            return self.validator(value)
        return None


def positive(value: Any) -> str | None:
    return None if value > 0 else f"must be > 0, not {value!r}"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else f"must be >= 0, not {value!r}"


UID_FLOOR = 1000  # below: system accounts
UID_CEILING = 2**31 - 2  # (uid_t)-1 means "no change" to the kernel; stay below it


def at_least(low: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value >= low else f"must be >= {low}, not {value!r}"

    return check


def one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}, not {value!r}"

    return check


def _ip_addresses(value: Any) -> str | None:
    import ipaddress

    for item in value:
        try:
            ipaddress.ip_address(item)
        except ValueError:
            return f"{item!r} is not an IP address"
    return None


def _host_port(value: Any) -> str | None:
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"must be HOST:PORT, not {value!r}"
    return None


def _dns_name(value: Any) -> str | None:
    if not value:
        return None
    labels = str(value).rstrip(".").lower().split(".")
    if len(labels) < 2 or len(str(value)) > 200 or not all(
            re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", label) for label in labels):
        return f"must be a DNS name of at least two labels (like acme.example.net), not {value!r}"
    return None


def fence_mode(value: Any) -> str | None:
    if value == "auto":
        return ("'auto' is no longer accepted: the fence is always on unless set to \"off\" "
                "(a runner that cannot install it refuses to start; docs/security.md)")
    return one_of("on", "off")(value)


def host_port(value: Any) -> str | None:
    """Empty, or ``HOST:PORT`` (``[V6]:PORT``) with a port 1-65535."""
    if value == "":
        return None
    host, _, port = value.rpartition(":")
    if host.strip("[]") and port.isdigit() and 0 < int(port) < 65536:
        return None
    return f"must be HOST:PORT, not {value!r}"


def hostname_or_off(value: Any) -> str | None:
    """Empty, ``off``, or a hostname (no scheme, port or path)."""
    if value in ("", "off") or re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\.?",
                                            value):
        return None
    return f"must be a hostname (no scheme, port or path), empty or off, not {value!r}"


def s3_endpoint(value: Any) -> str | None:
    # no user:password@: a credential there would be in every S3 error text (shown in
    # backup listings); the keys are archive_s3_access_key_id and its secret file
    if value == "" or re.match(r"^https?://[^/?#\s@]+/?$", value):
        return None
    return "must be empty or http(s)://HOST[:PORT] (no path, no query, no user:password@)"


def s3_prefix(value: Any) -> str | None:
    if re.match(r"^[A-Za-z0-9/_.-]*$", value) and not value.startswith("/"):
        return None
    return "letters, digits, / _ . - only, and not starting with /"


def store_url(value: Any) -> str | None:
    if value == "" or value.startswith(("sqlite:///", "postgresql://", "postgres://")):
        return None
    return f"must start with sqlite:/// or postgresql://, not {value!r}"


# Section -> key -> Key.  Each role's package owns its section.
SCHEMA: dict[str, dict[str, Key]] = {
    "node": {
        "id": Key(str, "", "This node's id in the cluster; empty means the host name."),
        "data_dir": Key(
            str, "", "Where the node keeps its state; `--data-dir` overrides; empty means ./epio-data."
        ),
        "domain": Key(
            str, "localhost", "The platform domain: app NAME answers at NAME.DOMAIN through the router."
        ),
        "log_format": Key(
            str, "text", "Node log output: text (human) or json (one JSON object a line).",
            one_of("text", "json"),
        ),
    },
    "store": {
        "url": Key(
            str, "",
            "The state store: sqlite:///PATH (embedded, single box) or postgresql://... "
            "(production, multi-node; a primary and its standbys as "
            "postgresql://USER@HOST1:5432,HOST2:5432/DB?target_session_attrs=read-write). "
            "Empty means sqlite in the data dir.",
            store_url,
        ),
        "pool_size": Key(
            int, 4, "PostgreSQL: connections the store opens at most per node process "
            "(each held lock uses one more of its own).", positive,
        ),
        "connect_timeout": Key(
            float, 10.0, "PostgreSQL: seconds to wait for a new connection before the call "
            "fails with store_unavailable.", positive,
        ),
        "busy_timeout": Key(
            float, 10.0, "SQLite: seconds a write waits for another process's write lock "
            "before failing.", positive,
        ),
    },
    "cluster": {
        "secret_file": Key(
            str, "",
            "File holding the cluster secret that signs every bus message (hex, mode 0600). "
            "Empty means DATA_DIR/cluster-secret, created on first start; every node of a "
            "cluster must share it.",
        ),
        "nexus": Key(
            list, [{"heartbeat": "tcp://127.0.0.1:7711", "router": "tcp://127.0.0.1:7712",
                    "publish": "tcp://127.0.0.1:7713"}],
            "Every nexus of the cluster: a list of tables with its heartbeat (SUB), router "
            "(snapshots and queries) and publish (route deltas) ZeroMQ endpoints.",
            item_kind=dict,
        ),
        "loggers": Key(
            list, ["tcp://127.0.0.1:7721"],
            "Every logger's PULL endpoint; log lines and stats are pushed to each.",
            item_kind=str,
        ),
        "follow_interval": Key(
            float, 2.0, "Seconds between two reads of the nexus, logger and router endpoint "
            "lists in the store (PostgreSQL store only; docs/cluster.md); a nexus, logger or "
            "lb node refreshes its own entry as often. Every node merges the store's lists "
            "with cluster.nexus and cluster.loggers; each runner's network fence lets the "
            "routers' addresses reach its instance ports (docs/security.md).", positive,
        ),
        "endpoint_ttl": Key(
            float, 30.0, "Seconds after its last refresh that a nexus, logger or router entry in the "
            "store is left out of the lists (a host that died without unregistering). Must "
            "exceed cluster.follow_interval.", positive,
        ),
    },
    "bus": {
        "request_timeout": Key(
            float, 30.0, "Seconds a bus request waits for its reply before failing.", positive
        ),
        "max_skew": Key(
            float, 30.0, "Seconds of clock skew after which a bus message is stale and dropped.",
            positive,
        ),
        "high_water_mark": Key(
            int, 10000, "Messages a bus socket queues per peer before new ones are dropped "
            "(and counted).", positive,
        ),
        "max_message_size": Key(
            int, 256 * 1024 * 1024, "Largest bus message (bytes) a socket accepts; a peer "
            "sending a bigger one is disconnected. Must exceed api.max_upload_mb (a deploy's "
            "tarball travels to the runner in one message).", positive,
        ),
        "encrypt": Key(
            bool, True, "Encrypt bus traffic with CurveZMQ, keys derived from the cluster "
            "secret (every node of a cluster must agree).",
        ),
        "log_line_max_bytes": Key(
            int, 10000, "Log lines longer than this (UTF-8 bytes) are sent to the loggers "
            "in parts.", positive,
        ),
        "peer_heartbeat": Key(
            float, 2.0, "Seconds between ZeroMQ heartbeats on every bus connection; a peer "
            "silent for 3 of them (frozen host, dead link) is disconnected and skipped.",
            positive,
        ),
    },
    "api": {
        "listen": Key(str, "tcp:8000:interface=127.0.0.1", "Endpoint the API and dashboard "
                      "listen on directly: for bootstrapping and operators (it may be "
                      "firewalled); users reach the API through the routers at api.hostname."),
        "hostname": Key(
            str, "", "Hostname the routers serve the API and dashboard at, balanced across "
            "every live api node (the platform's own route, app 'epio'); empty means "
            "epio.<node.domain>, off disables the route.", hostname_or_off),
        "advertise": Key(
            str, "", "host:port the routers use to reach this node's api listener; empty "
            "means the listener's own port on its interface, or on runner.advertise_host "
            "when it listens on every address.", host_port),
        "heartbeat_interval": Key(
            float, 1.0, "Seconds between two api.heartbeat messages to every nexus (the "
            "platform's route lists the api nodes heard from).", positive),
        "backlog": Key(int, 4096, "Listen backlog of the api's listener (capped by "
                       "net.core.somaxconn, logged at start).", positive),
        "max_connections": Key(int, 1000, "Open connections of the api's listener before it "
                               "stops accepting until some close (they wait in the "
                               "backlog); 0 = no limit.", non_negative),
        "app_url": Key(
            str, "",
            "URL template of an app printed by the CLI and API ({app}, {domain}); empty means "
            "http://{app}.{domain}[:PORT]/ with the port of lb.listen.",
        ),
        "max_body_kb": Key(int, 1024, "Largest JSON request body the API accepts (KiB).", positive),
        "header_timeout": Key(float, 10.0, "Seconds a client has to send a whole request head "
                              "once it began (408 and close).", positive),
        "body_timeout": Key(float, 10.0, "Seconds a request body may go without a byte, and "
                            "the grace before body_min_rate applies (408 and close).", positive),
        "body_min_rate": Key(int, 1024, "Least average bytes a second of a request body after "
                             "body_timeout (408 and close when it falls behind).", positive),
        "max_upload_mb": Key(int, 200, "Largest deploy tarball the API accepts (MiB).", positive),
        "reconcile_interval": Key(
            float, 2.0, "Seconds between two scheduler passes (the leader asks every runner "
            "for runner.status and converges instances on the formation).", positive,
        ),
        "runner_dead_after": Key(
            float, 15.0, "Seconds without an answer after which a runner is dead and its "
            "instances are placed on other runners.", positive,
        ),
        "status_timeout": Key(
            float, 5.0, "Seconds the scheduler waits for a runner's reply to a control "
            "request (runner.status, runner.start, runner.drain).", positive,
        ),
        "start_grace": Key(
            float, 10.0, "Seconds a just-placed instance may be missing from its runner's "
            "report before it is forgotten and placed again.", positive,
        ),
        "drain_seconds": Key(
            float, 3.0, "Seconds between draining an old instance (routes drop it) and "
            "stopping it; also the longest a deploy waits, once its instances are healthy, "
            "for the nexuses to route them.", non_negative,
        ),
        "stop_grace": Key(
            float, 10.0, "Seconds between SIGTERM and SIGKILL when an instance is stopped.",
            non_negative,
        ),
        "build_timeout": Key(float, 900.0, "Seconds a build may take before the deploy fails.",
                             positive),
        "rollout_timeout": Key(
            float, 180.0, "Seconds the new release's instances have to become healthy before "
            "the deploy fails (the previous release keeps serving).", positive,
        ),
        "route_settle": Key(
            float, 2.0,
            "Seconds a new instance must have been healthy before old ones are drained, "
            "when no nexus answers whether routers already send it traffic.", positive),
        "max_apps_per_user": Key(
            int, 100, "Most apps one user may own (admins too); creating one more answers "
            "429 app_quota_exceeded. 0 = no limit.", non_negative),
        "app_changes_per_window": Key(
            int, 60, "Most app creations plus deletions one user may make in "
            "api.app_changes_window seconds; a creation beyond answers 429 rate_limited with "
            "Retry-After (a deletion is never refused, but counts). 0 = no limit.",
            non_negative),
        "app_changes_window": Key(
            float, 3600.0, "The sliding window of api.app_changes_per_window, seconds.", positive),
        "destroyed_grace": Key(
            float, 7 * 86400.0, "Seconds a destroyed app (its add-ons, data dir, config, "
            "releases, UID) is kept, listed by `epio apps destroyed` and restorable, before it "
            "is purged.", non_negative),
        "purge_interval": Key(
            float, 300.0, "Seconds between two looks, by the api holding the purge lock, for "
            "destroyed apps whose grace period is over.", positive),
        "purge_timeout": Key(
            float, 120.0, "Seconds a runner has to delete a purged app's data dir.", positive),
    },
    "lb": {
        "listen": Key(str, "tcp:8080", "Endpoint the HTTP router listens on."),
        "routes_file": Key(
            str, "",
            "Standalone routes file (TOML, reloaded on SIGHUP) instead of the nexus; "
            "`--routes` sets it.",
        ),
        "workers": Key(int, 1, "Router processes sharing the listening port (SO_REUSEPORT); "
                       "1 = this process only.", positive),
        "backlog": Key(int, 4096, "Listen backlog of the router's listeners (capped by "
                       "net.core.somaxconn, logged at start).", positive),
        "max_connections": Key(int, 10000, "Open client connections per listener (and per "
                               "router process) before the router stops accepting until "
                               "some close (they wait in the backlog); 0 = no limit.",
                               non_negative),
        "route_feed": Key(
            str, "auto",
            "Where a router fed by the nexus follows the nexuses: 'process' (a route feed "
            "process beside the router merges them and streams only merged changes to every "
            "router process; docs/router.md), 'inline' (in each router process) or 'auto': "
            "inline when lb.workers = 1 and the node runs the nexus role too (its reactor "
            "already does the nexus's route work; no second Python process), else process.",
            one_of("auto", "process", "inline")),
        "routes_wait": Key(
            float, 5.0,
            "Seconds a router fed by the nexus waits for its first route table before it "
            "listens anyway (every host 404 until the table comes); 0 = listen at once.",
            non_negative),
        "feed_interval": Key(
            float, 0.02,
            "Least seconds between two frames of route changes from the route feed process "
            "to a router process: the first change after a quiet interval goes at once, "
            "changes during churn leave together, one frame per interval (0 = every merged "
            "change at once).", non_negative),
        "tls_listen": Key(str, "", "Endpoint of the optional TLS listener (e.g. tcp:8443); "
                          "empty = no TLS."),
        "https_port": Key(int, 443, "The public HTTPS port, for the Location of an app's "
                          "https_redirect (308) when it is not 443 (docs/https.md).",
                          positive),
        "tls_cert_dir": Key(str, "", "Directory of HOSTNAME.pem files (key + certificate chain; "
                            "_wildcard.example.com.pem for *.example.com) chosen by SNI; "
                            "re-read when it changes."),
        "tls_affinity": Key(str, "none", "With workers > 1: \"client\" sends each client "
                            "address's TLS connections to the same router process, so its "
                            "sessions resume (each process has its own ticket keys); "
                            "\"none\" = the kernel's spread (docs/https.md).",
                            one_of("none", "client")),
        "ocsp_stapling": Key(bool, True, "Staple OCSP responses to TLS handshakes for "
                             "certificates that name an OCSP responder, fetched by each "
                             "router process from the CA over HTTP (docs/https.md)."),
        "header_timeout": Key(float, 10.0, "Seconds a client has to send a request head (408).",
                              positive),
        "body_timeout": Key(float, 10.0, "Seconds a request body may go without a byte "
                            "while the router reads it, and the grace before body_min_rate "
                            "applies (408 and close).", positive),
        "body_min_rate": Key(int, 1024, "Least average bytes a second of a request body "
                             "after body_timeout: each byte received buys 1/body_min_rate "
                             "seconds more (408 and close when it runs out).", positive),
        "body_buffer_size": Key(int, 65536, "Bytes of a request body the router keeps in "
                                "memory; a larger body is spooled to a file (0600, unlinked) "
                                "in DATA_DIR/run/tmp until sent.", non_negative),
        "spool_max_bytes": Key(int, 1073741824, "Bytes all spooled request bodies of one "
                               "router process may hold in DATA_DIR/run/tmp together; a body "
                               "that would pass it is answered 503 spool_full (Retry-After) "
                               "and its connection closed. Put run/tmp on its own filesystem "
                               "(docs/router.md).", positive),
        "keepalive_timeout": Key(float, 75.0, "Seconds an idle kept-alive client connection "
                                 "stays open.", positive),
        "connect_timeout": Key(float, 5.0, "Seconds to connect to a backend before trying the "
                               "next one.", positive),
        "first_byte_timeout": Key(float, 30.0, "Seconds from a sent request to the first "
                                  "response byte (504).", positive),
        "idle_timeout": Key(float, 55.0, "Rolling seconds without a byte either way once a "
                            "response has started.", positive),
        "websocket_idle_timeout": Key(float, 3600.0, "Rolling idle seconds of an upgraded "
                                      "(WebSocket) tunnel.", positive),
        "queue_timeout": Key(float, 10.0, "Seconds a request waits in a full backend's queue "
                             "before 503.", positive),
        "pool_idle_timeout": Key(float, 15.0, "Seconds an idle pooled backend connection is "
                                 "kept; keep it below the app server's keep-alive.", positive),
        "pool_max_idle": Key(int, 256, "Idle pooled connections kept per backend (more busy "
                             "clients than this make the router reconnect).", non_negative),
        "backend_max_conns": Key(int, 256, "Concurrent requests per backend before queueing.",
                                 positive),
        "backend_queue_size": Key(int, 256, "Requests queued per backend before 503.",
                                  non_negative),
        "wake_timeout": Key(float, 10.0, "Seconds a request for an asleep app waits for it "
                            "to wake (runner.wake) before 503 with Retry-After "
                            "(docs/apps.md \"Sleeping apps\").", positive),
        "wake_queue_size": Key(int, 256, "Requests of one asleep app held by one router "
                               "process while it wakes; more get 503 with Retry-After.",
                               non_negative),
        "connect_attempts": Key(int, 3, "Backends tried for one request when connecting fails.",
                                positive),
        "eject_after": Key(int, 5, "Consecutive failures that eject a backend.", positive),
        "eject_seconds": Key(float, 10.0, "Seconds an ejected backend gets no requests.",
                             positive),
        "max_body_size": Key(int, 104857600, "Largest request body in bytes (413); routes may "
                             "override.", non_negative),
        "trusted_proxies": Key(list, [], "Peer addresses whose X-Forwarded-* headers are "
                               "trusted and extended.", item_kind=str),
        "access_log": Key(str, "", "Access log: empty = the log pipeline (pushed to "
                          "cluster.loggers; the node log for a standalone --routes router), "
                          "'local' (node log), 'off', or a file path."),
        "stats_interval": Key(float, 10.0, "Seconds between per-app stats reports.", positive),
        "shutdown_timeout": Key(float, 30.0, "Seconds in-flight requests get to finish on stop.",
                                positive),
    },
    "nexus": {
        "heartbeat_bind": Key(str, "tcp://127.0.0.1:7711", "Where this nexus receives heartbeats (SUB)."),
        "router_bind": Key(str, "tcp://127.0.0.1:7712", "Where this nexus serves snapshots and queries (ROUTER)."),
        "publish_bind": Key(str, "tcp://127.0.0.1:7713", "Where this nexus publishes route deltas (PUB)."),
        "node_timeout": Key(
            float, 3.0, "Seconds without a heartbeat after which a node is gone and its backends "
            "leave the route table (at least 3 of the node's own heartbeat intervals).", positive,
        ),
        "store_refresh": Key(
            float, 2.0, "Seconds between two reads of apps, domains and live releases from the store.",
            positive,
        ),
        "store_refresh_min": Key(
            float, 0.25, "Least seconds between two store reads triggered early (a heartbeat "
            "names an app or release the nexus has not read yet).", positive,
        ),
        "warmup": Key(
            float, 1.5, "Seconds a started nexus collects heartbeats before it serves snapshots and "
            "publishes, so a restarted nexus never announces a half-empty table.", non_negative,
        ),
        "keepalive_interval": Key(
            float, 0.5, "Seconds between two nexus.keepalive messages to the routers.", positive,
        ),
        "delta_interval": Key(
            float, 0.02, "Least seconds between two route deltas: the first change after a "
            "quiet interval is published at once, changes during churn are batched into one "
            "delta per interval (0 = one delta per reactor turn).", non_negative,
        ),
        "web_process_types": Key(
            list, ["web"], "Process types whose healthy instances take HTTP requests.",
            item_kind=str,
        ),
        "feed_timeout": Key(
            float, 2.0, "Router side: seconds of silence (no delta, no keepalive) after which a "
            "nexus leaves the route merge; with every nexus silent the router keeps its last "
            "table and reports it stale.", positive,
        ),
        "snapshot_timeout": Key(
            float, 2.0, "Router side: seconds a snapshot request to a nexus waits for its reply.",
            positive,
        ),
        "snapshot_retry": Key(
            float, 0.5, "Router side: seconds before a failed snapshot request is tried again.",
            positive,
        ),
    },
    "runner": {
        "control_bind": Key(str, "tcp://127.0.0.1:7731", "Where this runner takes control requests (ROUTER)."),
        "control_advertise": Key(
            str, "", "The control endpoint other nodes use; empty means control_bind with a "
            "wildcard address replaced by advertise_host."),
        "advertise_host": Key(
            str, "127.0.0.1", "Address routers use to reach this runner's app ports (also "
            "where health checks connect); apps bind $PORT on the host network."),
        "heartbeat_interval": Key(float, 1.0, "Seconds between heartbeats to every nexus.",
                                  positive),
        "register_interval": Key(
            float, 10.0, "Seconds between refreshes of this node's row in the store.", positive),
        "port_min": Key(int, 20000, "Lowest port given to web instances ($PORT).", positive),
        "shm_mb": Key(
            int, 64, "Size (MiB) of each sandboxed instance's private, writable /dev/shm "
            "(POSIX shared memory and semaphores: multiprocessing, Celery prefork); its pages "
            "count against the instance's memory limit. Needs bubblewrap 0.7.0 (--size); with an "
            "older one /dev/shm has no size of its own (said at start; docs/runner.md).", positive,
        ),
        "port_max": Key(int, 29999, "Highest port given to web instances ($PORT).", positive),
        "uid_min": Key(
            int, 20000, "Lowest app UID: the api allocates app UIDs from uid_min-uid_max "
            "(lowest free first, reused once an app is purged) and the runner refuses any "
            "other. At least 1000 (no system account); every node of a cluster needs the "
            "same range.", at_least(UID_FLOOR)),
        "uid_max": Key(int, 59999, "Highest app UID (at most 2^31 - 2, the kernel's limit).",
                       at_least(UID_FLOOR)),
        "sandbox": Key(
            str, "auto", "auto: bubblewrap when root and bwrap works; bwrap: require it "
            "(refuse to start otherwise); none: no sandbox (protections off, reported).",
            one_of("auto", "bwrap", "none")),
        "cgroup_parent": Key(
            str, "epio", "Name of the cgroup (under the runner's own cgroup of each v1 "
            "controller) that holds one cgroup per instance."),
        "grace": Key(float, 30.0, "Default seconds between SIGTERM and SIGKILL when stopping "
                     "an instance (runner.start/stop may give their own).", non_negative),
        "boot_timeout": Key(float, 60.0, "Default seconds a web instance has to pass its "
                            "first health check.", positive),
        "backoff_initial": Key(float, 1.0, "Seconds before the first restart of a crashed "
                               "process; doubles on each crash.", positive),
        "backoff_max": Key(float, 300.0, "Cap of the restart backoff, seconds.", positive),
        "backoff_reset": Key(float, 600.0, "Seconds of healthy running after which the "
                             "backoff starts again at backoff_initial.", positive),
        "health_interval": Key(float, 5.0, "Seconds between health checks of a healthy web "
                               "instance.", positive),
        "health_boot_interval": Key(float, 0.5, "Most seconds between health checks while "
                                    "a web instance boots.", positive),
        "health_boot_first": Key(float, 0.05, "Seconds from a web instance's launch to its "
                                 "first health check; each next check while it boots waits "
                                 "1.5 times longer, up to health_boot_interval (a fast boot "
                                 "is seen at once, a slow one is not probed more often).",
                                 positive),
        "health_timeout": Key(float, 2.0, "Seconds one health check may take.", positive),
        "idle_sleep": Key(float, 0.0, "Default of an app's [http] idle_sleep: seconds a web "
                          "instance may go without a connection before it is stopped and "
                          "its route marked asleep (the next request wakes it); 0: apps "
                          "sleep only when their epio.ini asks. docs/apps.md.", non_negative),
        "wake_probe_interval": Key(float, 0.02, "Seconds between health checks of a web "
                                   "instance that is waking up (instead of "
                                   "health_boot_interval): the wake is that much faster.",
                                   positive),
        "health_failures": Key(int, 3, "Failed health checks in a row after which a healthy "
                               "instance leaves the routes and is restarted.", positive),
        "drain_delay": Key(float, 3.0, "Seconds a draining instance keeps running (routers "
                           "switch away, in-flight requests finish) before SIGTERM.",
                           non_negative),
        "worker_settle": Key(float, 1.0, "Seconds a non-web process must stay up to count "
                             "as healthy.", non_negative),
        "stopped_retention": Key(float, 60.0, "Seconds a stopped instance stays in "
                                 "heartbeats before it is forgotten.", non_negative),
        "shutdown_grace": Key(float, 10.0, "Seconds the runner gives its processes to exit "
                              "when the node stops (then SIGKILL).", non_negative),
        "max_log_line": Key(int, 16384, "Bytes after which a line of app output without a "
                            "newline is cut into parts.", positive),
        "memory_mb": Key(int, 512, "Default memory limit of an instance, MiB (cgroup).",
                         positive),
        "cpu_shares": Key(int, 1024, "Default cpu.shares of an instance (cgroup).", positive),
        "pids_max": Key(int, 512, "Default limit on processes/threads of an instance "
                        "(cgroup pids.max).", positive),
        "nofile": Key(int, 4096, "Default RLIMIT_NOFILE (open files) of an instance.",
                      positive),
        "fetch_chunk_kb": Key(int, 4096, "Size of the chunks in which a runner sends an "
                              "image to a peer that lacks it (KiB).", positive),
        "fetch_timeout": Key(float, 30.0, "Seconds one image chunk request to a peer may "
                             "take before the next peer is tried.", positive),
        "stats_interval": Key(float, 10.0, "Seconds between process stats samples (memory, CPU, "
                              "restarts) of each instance; 0 disables them.", non_negative),
        "fence": Key(
            str, "on", "Network fence (nftables) that resets app UIDs' connections to every "
            "port of this host but the router, their own instances and add-ons and "
            "fence_allow_ports: on (the runner refuses to start when it cannot install it: "
            "needs root and nft) or off (apps reach the control plane; said at every start). "
            "docs/security.md.", fence_mode),
        "fence_table": Key(str, "", "Name of the fence's nftables table (inet family); "
                           "empty means epio_fence_<hash of the data dir>, so runners "
                           "sharing a host never touch each other's table."),
        "fence_extra_ports": Key(
            list, [], "More TCP ports app processes may not connect to on fence_hosts (on "
            "this host every port not allowed is refused anyway).", item_kind=int,
            validator=lambda v: None if all(0 < p < 65536 for p in v)
            else "ports must be 1-65535"),
        "fence_allow_ports": Key(
            list, [], "TCP ports of this host that every app process may connect to besides "
            "the router's, its own instances' and its own shared add-on database's (e.g. 53 "
            "for a local DNS resolver over TCP, 25 for a local mail relay).", item_kind=int,
            validator=lambda v: None if all(0 < p < 65536 for p in v)
            else "ports must be 1-65535"),
        "fence_hosts": Key(
            list, [], "Addresses or networks of the other cluster nodes (IPv4/IPv6) whose "
            "control-plane ports app processes may not connect to (endpoint addresses in "
            "this config are added on their own).", item_kind=str),
        "fence_keep_on_stop": Key(bool, False, "Keep the fence table when the runner stops "
                                  "cleanly (a crashed runner always leaves it in place)."),
        "fence_check_interval": Key(float, 30.0, "Seconds between checks that the fence "
                                    "table is still installed (put back if flushed); 0 "
                                    "disables them.", non_negative),
        "static_listen": Key(
            str, "", "Endpoint of this runner's static file server (docs/static.md), e.g. "
            "tcp:7735; empty means an ephemeral port on advertise_host; off disables it (the "
            "apps then serve their own static files)."),
        "static_max_age": Key(int, 3600, "Cache-Control max-age (seconds) of static files "
                              "whose app sets no [http] expires-/path.", non_negative),
        "static_gzip": Key(bool, True, "Gzip text-like static files for clients that accept "
                           "it."),
        "static_gzip_max_kb": Key(int, 2048, "Largest static file (KiB) gzipped on the fly "
                                  "and given a content-hash ETag.", positive),
        "static_cache_mb": Key(int, 64, "Memory (MiB) kept for gzipped static files.",
                               positive),
        "static_idle_timeout": Key(float, 120.0, "Seconds an idle connection to the static "
                                   "file server is kept (above lb.pool_idle_timeout).",
                                   positive),
    },
    "logger": {
        "pull_bind": Key(str, "tcp://127.0.0.1:7721", "Where this logger receives log lines and stats (PULL)."),
        "router_bind": Key(str, "tcp://127.0.0.1:7722",
                           "Where this logger answers logs.query and stats.query (ROUTER)."),
        "publish_bind": Key(str, "tcp://127.0.0.1:7723",
                            "Where this logger publishes live lines (log.live, PUB) for tails."),
        "peers": Key(
            list, [{"router": "tcp://127.0.0.1:7722", "publish": "tcp://127.0.0.1:7723"}],
            "Every logger's router (queries) and publish (live lines) endpoints, as the api "
            "uses them: a list of tables; the first that answers is used, the next on failure.",
            item_kind=dict,
        ),
        "max_line_bytes": Key(int, 10_000, "Lines longer than this (UTF-8 bytes) are stored in parts.",
                              positive),
        "chunk_max_bytes": Key(int, 8 * 1024 * 1024,
                               "A log chunk file is closed (and compressed) at this size.", positive),
        "chunk_max_age": Key(float, 3600.0,
                             "Seconds after which an open log chunk is closed even if small.", positive),
        "retention_age": Key(float, 7 * 86400.0,
                             "Seconds a closed log chunk is kept after its last line.", positive),
        "retention_bytes": Key(int, 256 * 1024 * 1024,
                               "Disk bytes of log kept per app; the oldest chunks go first.", positive),
        "flush_interval": Key(float, 0.2,
                              "Seconds between flushes of received lines to the chunk files.", positive),
        "maintenance_interval": Key(float, 10.0,
                                    "Seconds between chunk rolling/retention checks and stats writes.",
                                    positive),
        "query_max_lines": Key(int, 10_000, "Most lines one logs.query (or GET logs ?n=) returns.",
                               positive),
        "tail_default_lines": Key(int, 100, "Lines of history a tail or GET logs returns without ?n=.",
                                  non_negative),
        "tail_buffer_lines": Key(int, 5_000,
                                 "Lines queued for one slow websocket tail client before lines are "
                                 "dropped and the client is told how many it missed.", positive),
        "client_timeout": Key(float, 10.0, "Seconds the api waits for a logger to answer a query.",
                              positive),
        "client_ping_interval": Key(float, 5.0,
                                    "Seconds between the api's checks that its logger is alive while "
                                    "tails are open (it moves to the next peer if not).", positive),
        "stats_flush_delay": Key(float, 5.0,
                                 "Seconds after a stats bucket ends before it is written; later "
                                 "samples for it are dropped and counted.", non_negative),
        "stats_retention_10s": Key(float, 86400.0, "Seconds 10-second stats points are kept.", positive),
        "stats_retention_1m": Key(float, 30 * 86400.0, "Seconds 1-minute stats points are kept.",
                                  positive),
        "drains": Key(
            list, [],
            "Static log drains: tables {id, app, url} with url syslog://HOST:PORT, "
            "syslog+tls://HOST:PORT or https://...", item_kind=dict,
        ),
        "drain_buffer_lines": Key(int, 10_000,
                                  "Lines queued per drain; past it lines are counted undelivered.",
                                  positive),
        "drain_max_attempts": Key(int, 5, "Attempts to POST one batch to an HTTPS drain.", positive),
        "drain_backoff_max": Key(float, 60.0, "Longest wait between drain reconnects/retries (s).",
                                 positive),
        "drain_tls_ca": Key(str, "",
                            "PEM file of the CA that signs syslog+tls drain servers' certificates; "
                            "empty means the system's trusted CAs."),
        "metrics_per_app": Key(bool, False,
                               "Export the logger's line and stats counters and its store size "
                               "per app and source (labels app, source: a series per app and "
                               "process, thousands on a dense node); false exports them summed "
                               "over apps and sources (docs/logs.md)."),
    },
    "metrics": {
        "listen": Key(str, "",
                      "Endpoint serving /metrics (Prometheus text format) and /status (JSON), "
                      "both unauthenticated: use a local address, e.g. "
                      "tcp:9100:interface=127.0.0.1; empty disables."),
    },
    "backup": {
        "dir": Key(str, "", "Where backups are kept (mode 0700); empty means DATA_DIR/backups."),
        "interval": Key(float, 3600.0, "Seconds between scheduled backups of every app database.",
                        positive),
        "control_bind": Key(str, "tcp://127.0.0.1:7741",
                            "Where this backup node takes list/create/restore requests (ROUTER)."),
        "hourly": Key(int, 24, "Hourly backups kept.", non_negative),
        "daily": Key(int, 7, "Daily backups kept (the newest of each day).", non_negative),
        "weekly": Key(int, 4, "Weekly backups kept (the newest of each ISO week).", non_negative),
        "monthly": Key(int, 6, "Monthly backups kept (the newest of each month).", non_negative),
        "failed_ttl": Key(float, 7 * 86400.0,
                          "Seconds a failed backup's record is kept for inspection.", positive),
        "step_timeout": Key(float, 3600.0,
                            "Seconds one dump, verification or restore may take before it fails.",
                            positive),
        "endpoints": Key(
            list, ["tcp://127.0.0.1:7741"],
            "Every backup node's control endpoint (its control_bind as the api reaches it); "
            "the api forwards backup list/create/restore/download there.", item_kind=str,
        ),
        "api_timeout": Key(float, 1800.0,
                           "Seconds the api waits for a backup node to create (and verify) or "
                           "restore a backup.", positive),
        "reach_timeout": Key(float, 5.0,
                             "Seconds the api waits for a backup node to answer at all (a "
                             "listing) before it counts as unreachable.", positive),
        "chunk_kb": Key(int, 1024, "Size of one chunk of a backup download over the bus (KiB).",
                        positive),
        "archive_command": Key(
            str, "", "Shell command run on the backup node after each verified backup to copy "
            "its encrypted archive offsite; {path} is the local file, {name} the object name "
            "(<app>/<id>.epioarc), {app} and {id} as named (each shell-quoted). Empty: no "
            "offsite archive. See docs/databases.md."),
        "fetch_command": Key(
            str, "", "Shell command that copies archive {name} back to local file {path} (a "
            "restore of a backup whose local copy is gone)."),
        "archive_delete_command": Key(
            str, "", "Shell command that deletes archive {name} once the archive retention "
            "drops it; empty: archives are never deleted by epio (the offsite store's own "
            "lifecycle rules decide)."),
        "archive_key_file": Key(
            str, "", "File (mode 0600) holding the archive master key (at least 32 bytes, "
            "hex or raw); "
            "archives are encrypted with AES-256-GCM under keys derived from it. Required "
            "with archive_command; keep a copy outside the cluster."),
        "archive_retries": Key(int, 3, "Further tries of a failed archive_command before the "
                               "backup's archive is recorded as failed.", non_negative),
        "archive_retry_initial": Key(float, 5.0, "Seconds before the first retry of "
                                     "archive_command; doubled for each next one.", positive),
        "archive_retry_max": Key(float, 300.0, "Longest wait between two tries of "
                                 "archive_command (seconds).", positive),
        "archive_hourly": Key(int, 24, "Hourly archives kept offsite.", non_negative),
        "archive_daily": Key(int, 30, "Daily archives kept offsite.", non_negative),
        "archive_weekly": Key(int, 12, "Weekly archives kept offsite.", non_negative),
        "archive_monthly": Key(int, 24, "Monthly archives kept offsite.", non_negative),
        "archive_s3_endpoint": Key(
            str, "", "URL of an S3-compatible object store (http://HOST:PORT or "
            "https://HOST) that every verified backup's encrypted archive is also uploaded "
            "to (path-style: ENDPOINT/BUCKET/KEY), signed with AWS SigV4; empty: no S3 "
            "target. Works beside archive_command (each copy is recorded). See "
            "docs/databases.md.", s3_endpoint),
        "archive_s3_bucket": Key(str, "", "Bucket of the S3 archive target (it must exist)."),
        "archive_s3_region": Key(str, "us-east-1", "Region the S3 requests are signed for.",
                                 lambda v: None if v else "must not be empty"),
        "archive_s3_access_key_id": Key(str, "", "Access key id of the S3 archive target."),
        "archive_s3_secret_key_file": Key(
            str, "", "File (mode 0600) holding the S3 secret access key; the secret is never "
            "written in the config nor logged."),
        "archive_s3_prefix": Key(
            str, "", "Prefix of the archive objects' keys (KEY = PREFIX<app>/<id>.epioarc), "
            "e.g. epio/ ; letters, digits, / _ . - only.", s3_prefix),
        "archive_s3_part_mb": Key(
            int, 16, "Part size of S3 uploads and ranged downloads (MiB, 5 to 5120): a larger "
            "archive is uploaded in parts of this size (multipart upload) and read back in "
            "ranges of it; the backup node holds one part in memory at a time.",
            lambda v: None if 5 <= v <= 5120 else f"must be 5 to 5120, not {v!r}"),
        "archive_s3_timeout": Key(
            float, 300.0, "Seconds one S3 request (one object or part up, one range down, a "
            "listing page, a deletion) may take before it fails (and is tried again, as "
            "archive_retries says).", positive),
    },
    "addons": {
        "postgres_admin_url": Key(
            str, "",
            "Superuser URL of the shared PostgreSQL server for app databases "
            "(postgresql://USER[:PASS]@HOST:PORT/postgres); empty disables the postgres add-on.",
            lambda v: None if v == "" or v.startswith(("postgresql://", "postgres://"))
            else "must be empty or start with postgresql://",
        ),
        "postgres_host": Key(str, "", "Host apps use to reach the shared PostgreSQL server; "
                             "empty means the admin URL's host."),
        "postgres_port": Key(int, 0, "Port apps use to reach it; 0 means the admin URL's port.",
                             non_negative),
        "postgres_bin": Key(str, "", "Directory of initdb/postgres for dedicated PostgreSQL "
                            "servers; empty means the newest /usr/lib/postgresql/*/bin."),
        "service_boot_timeout": Key(float, 60.0, "Seconds a dedicated Redis or PostgreSQL server "
                                    "may take to accept connections after it starts.", positive),
        "redis_snapshot_interval": Key(float, 900.0, "Seconds between persistence-guarded "
                                       "snapshots of each dedicated Redis.", positive),
        "service_stop_timeout": Key(float, 30.0, "Seconds a dedicated Redis (SHUTDOWN SAVE) or "
                                    "PostgreSQL (fast shutdown) server gets to stop cleanly, "
                                    "node stops included, before SIGKILL (at most 3600).",
                                    lambda v: None if 0 < v <= 3600 else "must be in (0, 3600]"),
        "keeper_interval": Key(float, 10.0, "Seconds between checks (by the scheduler's "
                               "leader) that every dedicated server runs; a lost one is "
                               "started again on its own runner.", positive),
        "failover_after": Key(float, 60.0, "Seconds the runner of a dedicated server with a "
                              "standby may go without refreshing its node row before the "
                              "scheduler's leader fences it and promotes the standby "
                              "(docs/databases.md, Standby and failover).",
                              lambda v: None if 5 <= v <= 86400 else "must be in [5, 86400]"),
        "standby_same_runner": Key(bool, False, "Testing only: let a dedicated server's "
                                   "standby run on the primary's own runner (no protection "
                                   "against that runner's loss); off, a standby needs a "
                                   "second live runner."),
        "postgres_memory_mb": Key(int, 512, "Memory limit (cgroup) of a dedicated PostgreSQL "
                                  "server, MB.", positive),
        "snapshot_interval": Key(float, 3600.0, "Seconds between the runner's read-only btrfs "
                                 "snapshots of every dedicated data dir that is a subvolume "
                                 "(kept with the backup history policy); 0 disables.",
                                 non_negative),
    },
    "build": {
        "python": Key(
            str, "",
            "Interpreter for app virtualenvs; empty means the node's own base Python, or a "
            "system python3.X of the same version when the build user cannot run that one.",
        ),
        "pythons": Key(
            list, [],
            "More interpreters apps may choose (paths); with build.python and every "
            "python3.X in /usr/local/bin and /usr/bin the build user can run, they are what "
            "[python] version, runtime.txt and .python-version pick from.", item_kind=str,
            validator=lambda v: None if all(p.startswith("/") for p in v)
            else "interpreters must be absolute paths"),
        "image_format": Key(
            str, "auto",
            "squashfs (loop-mounted read-only), dir (read-only directory, reduced isolation) "
            "or auto (squashfs when root with mksquashfs, else dir).",
            one_of("auto", "squashfs", "dir"),
        ),
        "squashfs_compression": Key(
            str, "lz4", "mksquashfs compressor: lz4 (fastest), gzip, zstd, xz, lzo.",
            one_of("lz4", "gzip", "zstd", "xz", "lzo"),
        ),
        "user": Key(
            str, "epio-build",
            "Unprivileged system user builds run as (created when missing and the node is root).",
        ),
        "timeout": Key(float, 900.0, "Seconds a whole build may take before it is killed.", positive),
        "memory_mb": Key(
            int, 2048,
            "Memory limit of a build's processes (cgroup v1 memory, else RLIMIT_AS).", positive,
        ),
        "max_upload_mb": Key(int, 200, "Largest accepted upload (compressed tarball), in MB.", positive),
        "max_unpacked_mb": Key(int, 1000, "Largest unpacked upload, in MB.", positive),
        "max_disk_mb": Key(
            int, 4096,
            "Disk a build may use (its tree, checked after each step; also the largest file "
            "it may write), in MB.", positive,
        ),
        "max_concurrent": Key(int, 2, "Builds run at the same time on this node.", positive),
        "max_processes": Key(
            int, 512,
            "Processes the build user may have at once (RLIMIT_NPROC; stops fork bombs).",
            positive,
        ),
        "index_url": Key(
            str, "",
            "Package index for cold builds (pip --index-url); empty means pip's own "
            "configuration (PyPI or the machine's pip.conf).",
        ),
        "gunicorn": Key(
            str, "gunicorn==23.0.0",
            "Requirement added to an app that runs gunicorn (a [wsgi] or [django] web "
            "process, or a process command naming gunicorn) and does not list it itself; "
            "empty adds none.",
        ),
        "postgres_driver": Key(
            str, "psycopg2-binary==2.9.13",
            "Requirement added to an app with [services] postgres whose requirements name "
            "no PostgreSQL driver (psycopg, psycopg2, pg8000, asyncpg, ...); empty adds none.",
        ),
        "keep_releases": Key(
            int, 5, "Images of each app's newest N releases are kept; older ones are "
            "garbage-collected.", positive,
        ),
        "gc_grace": Key(
            float, 3600.0,
            "Seconds a new image is safe from garbage collection before a release refers to it.",
            non_negative,
        ),
    },
    "acme": {
        "directory": Key(
            str, "", "ACME directory URL of the CA that issues certificates for apps' custom "
            "domains (e.g. https://acme-v02.api.letsencrypt.org/directory, or Let's Encrypt's "
            "staging URL to try things out); empty = no automatic certificates "
            "(docs/https.md)."),
        "contact": Key(str, "", "E-mail address given to the CA with the cluster's account "
                       "(expiry warnings); empty = none."),
        "ca_bundle": Key(str, "", "CA file to verify the ACME server's HTTPS with; empty = the "
                         "system's trust store."),
        "check_interval": Key(float, 60.0, "Seconds between the issuer's looks for domains "
                              "needing a certificate (a new domain is looked at at once).",
                              positive),
        "renew_before_days": Key(float, 30.0, "Renew a certificate this many days before it "
                                 "expires.", positive),
        "retry_min": Key(float, 300.0, "Seconds before the first retry of a failed order; "
                         "doubled after every further failure.", positive),
        "retry_max": Key(float, 86400.0, "Longest wait between retries of a failing domain.",
                         positive),
        "challenge_wait": Key(float, 3.0, "Seconds between publishing an HTTP-01 answer and "
                              "asking the CA to check it (every router must have loaded it: "
                              "keep it above acme.sync_interval).", positive),
        "order_timeout": Key(float, 90.0, "Seconds an order may take from the answered "
                             "challenge to the certificate before it counts as failed.",
                             positive),
        "sync_interval": Key(float, 2.0, "Seconds between a router's reloads of challenges "
                             "and certificates from the store (it also reloads on every "
                             "change the store announces).", positive),
        "name_check": Key(bool, True, "Before ordering a certificate, check that the custom "
                          "domain resolves to the routers (else record why, and do not order); "
                          "false = let the CA's challenge decide (e.g. domains behind a CDN "
                          "that forwards /.well-known/ to the routers)."),
        "router_addresses": Key(list, [], "Public IP addresses of the cluster's routers: a "
                                "custom domain must resolve to these before a certificate is "
                                "ordered; empty = the addresses node.domain (or its wildcard) "
                                "resolves to (docs/https.md).", _ip_addresses, item_kind=str),
        "dns_server": Key(str, "", "DNS server (HOST:PORT) for that check; empty = the "
                          "system's resolver (/etc/resolv.conf, /etc/hosts).", _host_port),
        "platform_certificate": Key(bool, True, "Also issue and renew the certificate of the "
                                    "platform's own hostname (api.hostname) by HTTP-01; "
                                    "false = it comes from lb.tls_cert_dir only. Never for "
                                    "a name under localhost."),
        "dns01_zone": Key(str, "", "DNS zone this cluster's api nodes serve for the DNS-01 "
                          "challenge (e.g. acme.example.net, delegated to them with NS "
                          "records): owners point _acme-challenge.THEIR-DOMAIN at a name "
                          "under it with a CNAME, and get wildcard certificates; empty = no "
                          "DNS-01 (docs/https.md).", _dns_name),
        "dns01_listen": Key(str, "", "HOST:PORT where each api node answers DNS (UDP and TCP) "
                            "for acme.dns01_zone, e.g. 0.0.0.0:53; needed with it.",
                            _host_port),
        "platform_wildcard": Key(bool, False, "Also issue and renew the platform wildcard "
                                 "*.<node.domain> (every app's default hostname) by DNS-01: "
                                 "needs acme.dns01_zone and the operator's CNAME "
                                 "_acme-challenge.<node.domain> (the issuer's log names it; "
                                 "docs/https.md); not for a node.domain under localhost."),
    },
    "run": {
        "max_sessions_per_app": Key(
            int, 5, "Sessions (`epio run`, interactive or detached) an app may have running at "
            "once.", positive,
        ),
        "max_lifetime": Key(
            float, 86400.0, "Seconds a session may run at all; then SIGTERM, SIGKILL after "
            "run.kill_grace.", positive,
        ),
        "detached_idle_timeout": Key(
            float, 3600.0, "Seconds an interactive session keeps running with no client attached "
            "(`epio run --attach ID` within this time); then it is stopped and audited.",
            positive,
        ),
        "lease": Key(
            float, 30.0, "Seconds a runner keeps a session attached without hearing from the "
            "api (the api renews every third of it); then the session counts as detached.",
            positive,
        ),
        "poll_wait": Key(
            float, 15.0, "Seconds a runner holds an output poll open when there is nothing to "
            "send.", positive,
        ),
        "window_kb": Key(
            int, 1024, "Flow-control window: output (KiB) a runner buffers for a session that "
            "the api has not acknowledged; a full window pauses reading the command's output.",
            positive,
        ),
        "chunk_kb": Key(int, 256, "Most output (KiB) one poll reply carries.", positive),
        "input_buffer_kb": Key(
            int, 256, "Client input (KiB) the api queues for a session before it stops reading "
            "the websocket.", positive,
        ),
        "kill_grace": Key(
            float, 10.0, "Seconds between SIGTERM and SIGKILL when a session is stopped.",
            non_negative,
        ),
        "release_timeout": Key(
            float, 600.0, "Seconds the release-phase command (`[release] command`) may run "
            "before the deploy fails.", positive,
        ),
        "runner_timeout": Key(
            float, 10.0, "Seconds the api waits for a runner to answer a session request "
            "(start, input, attach) before it gives up on that runner.", positive,
        ),
    },
    "cron": {
        "tick": Key(
            float, 5.0, "Seconds between the cron leader's checks for a new minute: an app's "
            "`[cron]` run starts at most this long after its slot (docs/apps.md).", positive,
        ),
        "start_deadline": Key(
            float, 120.0, "Seconds after its slot a `[cron]` run may still start; a slot no "
            "api started by then (no leader, a node restarting) is recorded missed and never "
            "replayed.", positive,
        ),
    },
}


# the app UID range's defaults, for code built without a config (tests, tools)
DEFAULT_UIDS: tuple[int, int] = (SCHEMA["runner"]["uid_min"].default,
                                 SCHEMA["runner"]["uid_max"].default)


def _upload_fits_bus(values: dict[str, dict[str, Any]]) -> list[str]:
    upload = values["api"]["max_upload_mb"] * 1024 * 1024
    if upload + (1 << 20) > values["bus"]["max_message_size"]:
        return [f"api.max_upload_mb ({values['api']['max_upload_mb']} MiB) must be at least "
                f"1 MiB under bus.max_message_size ({values['bus']['max_message_size']} bytes): "
                "a deploy's upload travels to the runner in one bus message"]
    return []


def _uid_range(values: dict[str, dict[str, Any]]) -> list[str]:
    runner = values["runner"]
    if runner["uid_min"] > runner["uid_max"]:
        return [f"runner.uid_min ({runner['uid_min']}) must not be above runner.uid_max "
                f"({runner['uid_max']})"]
    if runner["uid_max"] > UID_CEILING:
        return [f"runner.uid_max ({runner['uid_max']}) must be at most {UID_CEILING}"]
    return []


# Checks across keys, run when every key is valid on its own.
def _acme_timing(values: dict[str, dict[str, Any]]) -> list[str]:
    acme = values["acme"]
    out = []
    if acme["challenge_wait"] <= acme["sync_interval"]:
        out.append(f"acme.challenge_wait ({acme['challenge_wait']:g}) must be above "
                   f"acme.sync_interval ({acme['sync_interval']:g}): the CA would check a "
                   "challenge before the routers have loaded its answer")
    if acme["retry_min"] > acme["retry_max"]:
        out.append(f"acme.retry_min ({acme['retry_min']:g}) must not be above "
                   f"acme.retry_max ({acme['retry_max']:g})")
    if bool(acme["dns01_zone"]) != bool(acme["dns01_listen"]):
        out.append("acme.dns01_zone and acme.dns01_listen go together: the zone's api nodes "
                   "answer its DNS queries themselves")
    elif acme["dns01_zone"] and not acme["directory"]:
        out.append("acme.dns01_zone needs acme.directory (DNS-01 is an ACME challenge)")
    if acme["platform_wildcard"]:
        domain = str(values["node"]["domain"]).lower().rstrip(".")
        if not acme["dns01_zone"]:
            out.append("acme.platform_wildcard needs acme.dns01_zone (a wildcard certificate "
                       "is issued by DNS-01 only)")
        if domain == "localhost" or domain.endswith(".localhost"):
            out.append(f"acme.platform_wildcard: no CA issues *.{domain} (node.domain is "
                       "under localhost)")
    return out


_S3_NEEDS = ("archive_s3_bucket", "archive_s3_access_key_id", "archive_s3_secret_key_file")


def _archive_keys(values: dict[str, dict[str, Any]]) -> list[str]:
    backup = values["backup"]
    out = []
    if backup["archive_command"] and not backup["archive_key_file"]:
        out.append("backup.archive_command needs backup.archive_key_file: archives are "
                   "encrypted before they leave the backup node")
    if backup["archive_s3_endpoint"]:
        if not backup["archive_key_file"]:
            out.append("backup.archive_s3_endpoint needs backup.archive_key_file: archives "
                       "are encrypted before they leave the backup node")
        out.extend(f"backup.archive_s3_endpoint needs backup.{k}" for k in _S3_NEEDS
                   if not backup[k])
    else:
        out.extend(f"backup.{k} is set but backup.archive_s3_endpoint is not"
                   for k in (*_S3_NEEDS, "archive_s3_prefix") if backup[k])
    if backup["archive_retry_initial"] > backup["archive_retry_max"]:
        out.append(f"backup.archive_retry_initial ({backup['archive_retry_initial']:g}) must not "
                   f"be above backup.archive_retry_max ({backup['archive_retry_max']:g})")
    return out


def _endpoint_ttl(values: dict[str, dict[str, Any]]) -> list[str]:
    cluster = values["cluster"]
    if cluster["endpoint_ttl"] <= cluster["follow_interval"]:
        return [f"cluster.endpoint_ttl ({cluster['endpoint_ttl']:g}) must exceed "
                f"cluster.follow_interval ({cluster['follow_interval']:g}): a live nexus or "
                "logger would age out of the lists between two refreshes"]
    return []


CHECKS: list[Callable[[dict[str, dict[str, Any]]], list[str]]] = [_upload_fits_bus, _uid_range,
                                                                   _acme_timing, _archive_keys,
                                                                   _endpoint_ttl]
