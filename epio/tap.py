"""``twistd epio``: options and the one service tree of a node (STYLE 2).

This is the one module that knows every role.  Each role package exposes
``make_service(node) -> IService`` in ``epio/<package>/service.py``, its
composition root.  :func:`makeService` builds the :class:`~epio.node.Node` (with
its store and metrics registry), then one :class:`NodeService` whose children
are, in start order: the store, the roles in :data:`ROLES` order, the
``/metrics`` listener.  :meth:`NodeService.stopService` stops the roles (and the
listener) first, all at once, and the store only after every one of them
finished.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.python import usage

from epio import __version__
from epio.config import ConfigError, load_config
from epio.metrics import node_listener
from epio.services import named

if TYPE_CHECKING:
    from epio.node import INodeReactor, Node

# role -> module providing make_service(node); the order is the start order.
ROLES: dict[str, str] = {
    "nexus": "epio.nexus.service",
    "logger": "epio.logs.service",
    "runner": "epio.runner.service",
    "lb": "epio.lb.service",
    "api": "epio.api.service",
    "backup": "epio.backup.service",
}
ALL = "all"
VALID_ROLES = (*ROLES, ALL)


def parse_roles(text: str) -> frozenset[str]:
    """Parse ``--role``: a comma list from the closed set (``all`` = every role)."""
    names = [r.strip() for r in text.split(",") if r.strip()]
    if not names:
        raise usage.UsageError(f"--role needs at least one of: {', '.join(VALID_ROLES)}")
    bad = [r for r in names if r not in VALID_ROLES]
    if bad:
        raise usage.UsageError(
            f"unknown role{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}; "
            f"valid roles are: {', '.join(VALID_ROLES)}"
        )
    if ALL in names:
        return frozenset(ROLES)
    return frozenset(names)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Run an epio node: any of the roles " + ", ".join(VALID_ROLES) + "."
    optParameters = [
        ["role", "r", ALL, "Comma-separated roles: " + ", ".join(VALID_ROLES)],
        ["config", "c", None, "Configuration file (TOML); see docs/configuration.md"],
        ["data-dir", "d", None, "Data directory (overrides node.data_dir)"],
        ["domain", None, None, "Platform domain (overrides node.domain)"],
        ["api-listen", None, None, "API endpoint, e.g. tcp:8000 (overrides api.listen)"],
        ["lb-listen", None, None, "Router endpoint, e.g. tcp:8080 (overrides lb.listen)"],
        ["store", None, None, "Store URL (overrides store.url)"],
        ["routes", None, None, "Standalone routes file for the router (overrides lb.routes_file)"],
    ]

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"epio {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        self["roles"] = parse_roles(self["role"])
        overrides: dict[str, dict[str, Any]] = {}
        for opt, section, key in [
            ("data-dir", "node", "data_dir"),
            ("domain", "node", "domain"),
            ("api-listen", "api", "listen"),
            ("lb-listen", "lb", "listen"),
            ("store", "store", "url"),
            ("routes", "lb", "routes_file"),
        ]:
            if self[opt] is not None:
                overrides.setdefault(section, {})[key] = self[opt]
        try:
            self["config_obj"] = load_config(self["config"], overrides)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


class NodeService(MultiService):
    """The root of a node's tree; logs each role as it starts and stops."""

    log = Logger()

    def __init__(self, node: Node, children: Iterable[IService],
                 preflight: Callable[[], None] | None = None) -> None:
        MultiService.__init__(self)
        self.node = node
        # run before any child starts; raises SystemExit to refuse to start (the
        # ports the node needs are taken: epio.listen.refuse_port_conflicts)
        self.preflight = preflight
        self._preflown = False
        # the line the node stops with when a child could not bind a port it needs
        self.failed: str | None = None
        self._begun: list[IService] = []  # children whose (privileged) start was called
        for child in children:
            child.setServiceParent(self)

    def _preflight(self) -> None:
        if self.preflight is not None and not self._preflown:
            self._preflown = True
            self.preflight()

    def privilegedStartService(self) -> None:
        # twistd calls this first: the api's endpoint service listens here already
        self._preflight()
        Service.privilegedStartService(self)
        for svc in self:
            if not self._start_one(svc, svc.privilegedStartService):
                return

    def _start_one(self, svc: IService, start: Callable[[], None]) -> bool:
        """``start()`` one child; False (and the node stopping, :meth:`_cannot_listen`)
        when a port it needs cannot be bound."""
        from epio.listen import listen_error

        if self.failed is not None:
            return False
        if svc not in self._begun:
            self._begun.append(svc)
        try:
            start()
        except BaseException as e:
            what = listen_error(e)
            if what is None:
                raise
            self._cannot_listen(svc.name or "node", *what)
            return False
        return True

    def _cannot_listen(self, role: str, endpoint: str, port: int | None, reason: str,
                       in_use: bool) -> None:
        """A port ``role`` needs cannot be bound: the rest of the node does not start and
        the node stops, exit status 1, after one line naming the port, role and key."""
        from epio.listen import stop_message

        why = stop_message(self.node.settings, role, endpoint, port, reason, in_use)
        self.failed = why
        self.node.exit(why)  # on stderr: one line

    def startService(self) -> None:
        self.log.info(
            "epio {version} node {node_id} starting roles {roles} in {data_dir}",
            version=__version__,
            node_id=self.node.node_id,
            roles=",".join(r for r in ROLES if r in self.node.roles),
            data_dir=str(self.node.data_dir),
        )
        from epio.listen import raise_nofile_limit

        before, after, hard = raise_nofile_limit()
        if after > before:
            self.log.info("open files limit (RLIMIT_NOFILE) raised from {before} to {after} "
                          "(the hard limit)", before=before, after=after)
        else:
            self.log.info("open files limit (RLIMIT_NOFILE) {after} (hard limit {hard})",
                          after=after, hard=hard)
        self._preflight()
        Service.startService(self)
        # each child in turn; a port one cannot bind ends the node (the others never
        # start): nothing serves half a node while the cluster takes it for gone
        for svc in self:
            if not self._start_one(svc, svc.startService):
                return
            self.log.info("service {name} started", name=svc.name)

    def stopService(self) -> Deferred[None]:
        """Stop every role first, then the store they use.

        MultiService would stop all children at once, closing the store under a
        role's last in-flight work; roles finish (or give up) first here.
        """
        self.log.info("node {node_id} stopping", node_id=self.node.node_id)
        Service.stopService(self)
        # every role; when one could not bind, only those begun (the api listens in
        # privilegedStartService already), not those after it that never started
        roles = [svc for svc in reversed(list(self)) if svc.name != "store"
                 and (self.failed is None or svc in self._begun)]
        stores = [svc for svc in self if svc.name == "store"]

        async def stop() -> None:
            results = await DeferredList(
                [maybeDeferred(svc.stopService) for svc in roles], consumeErrors=True
            )
            for (ok, failure), svc in zip(results, roles, strict=True):
                if not ok:
                    self.log.failure("stopping {name} failed", failure, name=svc.name)
            for svc in stores:
                try:
                    await maybeDeferred(svc.stopService)
                except Exception:
                    self.log.failure("stopping the store failed")

        return Deferred.fromCoroutine(stop())


def role_service(role: str, node: Node) -> IService:
    """Build one role's service by its package's composition root, named ``role``."""
    module = importlib.import_module(ROLES[role])
    svc: IService = module.make_service(node)
    svc.setName(role)
    return svc


def makeService(options: Options, reactor: INodeReactor | None = None) -> NodeService:
    """Build the node's one service tree from the configured roles."""
    from epio.node import Node, NodeSetupError, installed_reactor
    from epio.store import StoreService

    if reactor is None:
        reactor = installed_reactor()
    config = options["config_obj"]
    try:
        node = Node.prepare(reactor, config, options["roles"],
                            lambda c, d: StoreService.from_config(c, d, reactor=reactor))
    except NodeSetupError as e:
        raise SystemExit(f"epio: {e}") from None
    store = node.store_service
    assert store is not None
    children: list[IService] = [named("store", store)]
    if node.cluster is not None:  # the nexus/logger endpoint lists (epio.cluster)
        children.append(named("cluster", node.cluster))
    roles = {role: role_service(role, node) for role in ROLES if role in node.roles}
    children.extend(roles.values())
    if "lb" in roles:  # the node's decision: SIGHUP reloads routes, GC tuned
        from epio.lb.service import LBService, RouterProcess

        lb = roles["lb"]
        assert isinstance(lb, LBService)
        children.append(RouterProcess(reactor, lb))
    metrics = node_listener(node)  # every node serves /metrics on metrics.listen
    if metrics is not None:
        children.append(metrics)
    from epio.listen import refuse_port_conflicts

    settings, node_roles = node.settings, node.roles
    return NodeService(node, children,
                       preflight=lambda: refuse_port_conflicts(settings, node_roles))
