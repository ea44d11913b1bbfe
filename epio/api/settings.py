"""The api role's settings, read once from the ``api`` config section."""

from __future__ import annotations

from attrs import frozen

from epio.config import Config
from epio.config.schema import DEFAULT_UIDS
from epio.domain import PLATFORM_APP, platform_hostname
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
    # where the routers serve the platform itself (api.hostname; "" = no such route):
    # no app and no custom domain may take it (epio.domain.PLATFORM_APP)
    platform_hostname: str = ""

    @classmethod
    def from_config(cls, config: Config) -> ApiSettings:
        s = config.settings
        api = s.api
        return cls(
            domain=s.node.domain,
            app_url=api.app_url or default_app_url(s.lb.listen),
            max_json_bytes=api.max_body_kb * 1024,
            max_upload_bytes=api.max_upload_mb * 1024 * 1024,
            reconcile_interval=api.reconcile_interval,
            runner_dead_after=api.runner_dead_after,
            status_timeout=api.status_timeout,
            start_grace=api.start_grace,
            drain_seconds=api.drain_seconds,
            stop_grace=api.stop_grace,
            build_timeout=api.build_timeout,
            rollout_timeout=api.rollout_timeout,
            nexus_endpoints=tuple(str(n["router"]) for n in s.cluster.nexus if n.get("router")),
            route_settle=api.route_settle,
            uids=(s.runner.uid_min, s.runner.uid_max),
            app_limits=AppLimits(max_apps=api.max_apps_per_user,
                                 changes=api.app_changes_per_window,
                                 window=api.app_changes_window),
            destroyed_grace=api.destroyed_grace,
            purge_interval=api.purge_interval,
            purge_timeout=api.purge_timeout,
            web_process_types=frozenset(s.nexus.web_process_types),
            platform_hostname=platform_hostname(api.hostname, s.node.domain),
        )

    def url_of(self, app: str) -> str:
        return self.app_url.format(app=app, domain=self.domain)

    def platform_url(self) -> str | None:
        """The API's URL through the routers (the app URL template with the platform
        hostname for ``{app}.{domain}``), or None without a platform route."""
        if not self.platform_hostname:
            return None
        return self.app_url.replace("{app}.{domain}", self.platform_hostname).format(
            app=PLATFORM_APP, domain=self.domain).rstrip("/")


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
