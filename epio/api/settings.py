"""The api role's settings, read once from the ``api`` config section."""

from __future__ import annotations

from typing import Any

from attrs import frozen

from epio.config.schema import DEFAULT_UIDS
from epio.store import AppLimits


@frozen
class ApiSettings:
    """Limits and timings of the api, its deployer and scheduler (seconds, bytes)."""

    domain: str = "localhost"
    app_url: str = "http://{app}.{domain}:8080/"
    max_json_bytes: int = 1 << 20
    max_upload_bytes: int = 200 << 20
    reconcile_interval: float = 2.0
    runner_dead_after: float = 15.0
    status_timeout: float = 5.0
    start_grace: float = 10.0
    drain_seconds: float = 3.0
    stop_grace: float = 10.0
    build_timeout: float = 900.0
    rollout_timeout: float = 180.0
    leader_retry: float = 2.0
    # where the scheduler asks whether routers see a new release before draining the old
    nexus_endpoints: tuple[str, ...] = ()
    route_settle: float = 2.0
    # app UIDs are allocated from runner.uid_min..uid_max (the range runners accept)
    uids: tuple[int, int] = DEFAULT_UIDS
    app_limits: AppLimits = AppLimits(max_apps=100, changes=60, window=3600.0)
    destroyed_grace: float = 7 * 86400.0
    purge_interval: float = 300.0
    purge_timeout: float = 120.0
    # process types routers send requests to (``nexus.web_process_types``): only these
    # are drained through the routers on a rollover; the others are stopped directly
    web_process_types: frozenset[str] = frozenset({"web"})

    @classmethod
    def from_config(cls, config: Any) -> ApiSettings:
        api = config["api"]
        domain = config["node"]["domain"]
        app_url = api.get("app_url") or default_app_url(config["lb"]["listen"])
        return cls(
            domain=domain,
            app_url=app_url,
            max_json_bytes=int(api.get("max_body_kb", 1024)) * 1024,
            max_upload_bytes=int(api.get("max_upload_mb", 200)) * 1024 * 1024,
            reconcile_interval=float(api.get("reconcile_interval", 2.0)),
            runner_dead_after=float(api.get("runner_dead_after", 15.0)),
            status_timeout=float(api.get("status_timeout", 5.0)),
            start_grace=float(api.get("start_grace", 10.0)),
            drain_seconds=float(api.get("drain_seconds", 3.0)),
            stop_grace=float(api.get("stop_grace", 10.0)),
            build_timeout=float(api.get("build_timeout", 900.0)),
            rollout_timeout=float(api.get("rollout_timeout", 180.0)),
            nexus_endpoints=tuple(n["router"] for n in config["cluster"]["nexus"]
                                  if isinstance(n, dict) and n.get("router")),
            route_settle=float(api.get("route_settle", 2.0)),
            uids=(int(config["runner"]["uid_min"]), int(config["runner"]["uid_max"])),
            app_limits=AppLimits(max_apps=int(api["max_apps_per_user"]),
                                 changes=int(api["app_changes_per_window"]),
                                 window=float(api["app_changes_window"])),
            destroyed_grace=float(api["destroyed_grace"]),
            purge_interval=float(api["purge_interval"]),
            purge_timeout=float(api["purge_timeout"]),
            web_process_types=frozenset(config["nexus"]["web_process_types"]),
        )

    def url_of(self, app: str) -> str:
        return self.app_url.format(app=app, domain=self.domain)


def default_app_url(lb_listen: str) -> str:
    """``http://{app}.{domain}[:PORT]/`` from the router's listen endpoint."""
    parts = lb_listen.split(":")
    port = None
    if parts and parts[0] in ("tcp", "tcp6") and len(parts) > 1 and parts[1].isdigit():
        port = int(parts[1])
    elif parts and parts[0].isdigit():
        port = int(parts[0])
    if port in (None, 80):
        return "http://{app}.{domain}/"
    return "http://{app}.{domain}:" + str(port) + "/"


def derive_app_secret(cluster_secret: bytes, app: str) -> str:
    """A stable secret for one app (HMAC of ``"<name>:<uid>"`` under the cluster secret).

    Given to the app as EPIO_SECRET_KEY (Django's SECRET_KEY unless the app sets
    its own); it reveals nothing of the cluster secret and needs no storage.
    """
    import hashlib
    import hmac

    return hmac.new(cluster_secret, b"epio-app-secret:" + app.encode(), hashlib.sha256).hexdigest()
