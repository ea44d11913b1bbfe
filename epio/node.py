"""The node: what every role of one ``twistd epio`` process shares.

A :class:`Node` is built once by :func:`epio.tap.makeService` (which is allowed to
do I/O before the reactor runs): the data directory exists, the cluster secret is
read or created, the configuration is validated.  Roles receive the node and build
their services from it; they reach the store through ``node.store_service`` and
the bus through ``node.bus``.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import uuid
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, cast

from attrs import Factory, field, frozen
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFDSet,
    IReactorPluggableNameResolver,
    IReactorProcess,
    IReactorSocket,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUNIX,
)

from epio.config import Config, Settings

if TYPE_CHECKING:
    from epio.bus import Bus
    from epio.cluster import ClusterDirectory
    from epio.metrics import MetricsRegistry
    from epio.store import StoreService

SECRET_BYTES = 32


class NodeSetupError(Exception):
    """The node cannot start: a message for the operator, no traceback."""


def reach_problem(data_dir: Path, roles: frozenset[str], euid: int) -> str | None:
    """Why the build and app users of a root runner cannot reach ``data_dir`` (a clone
    in root's 0700 home), as the sentence the node refuses to start with; None when
    they can (or when there are no such users: not root, no runner role).

    The node never opens a directory it did not make (no chmod of a user's home): it
    says which one is closed and the two ways out.
    """
    if "runner" not in roles or euid != 0:
        return None
    closed = closed_ancestor(data_dir)
    if closed is None:
        return None
    mode = closed.stat().st_mode & 0o777
    return (f"the build and app users cannot reach the data dir {data_dir}: {closed} is "
            f"mode {mode:o}, not searchable by others, so no build or app could run. Start "
            f"the node with a data dir they can reach (--data-dir /var/lib/epio), or let "
            f"them through (chmod o+x {closed})")


def closed_ancestor(path: Path) -> Path | None:
    """The nearest existing parent of ``path`` that other users cannot search (no
    ``o+x``), from the top down; None when every one can be traversed."""
    for d in reversed(path.parents):
        try:
            mode = d.stat().st_mode
        except OSError:
            return None  # not there yet: mkdir makes it (0755 parents, 0711 data dir)
        if not mode & 0o001:
            return d
    return None


def read_or_create_secret(path: Path) -> bytes:
    """Return the cluster secret at ``path``, creating it (0600) when missing."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(SECRET_BYTES) + "\n")
    try:
        st = path.stat()
        text = path.read_text("ascii").strip()
    except OSError as e:
        raise NodeSetupError(f"cannot read cluster secret {path}: {e.strerror}") from None
    if st.st_mode & 0o077:
        raise NodeSetupError(
            f"cluster secret {path} is readable by others (mode {st.st_mode & 0o777:o}); "
            f"run: chmod 600 {path}"
        )
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise NodeSetupError(f"cluster secret {path} is not hex") from None
    if len(secret) < 16:
        raise NodeSetupError(f"cluster secret {path} is shorter than 16 bytes")
    return secret


class INodeReactor(IReactorCore, IReactorTime, IReactorProcess, IReactorTCP, IReactorUNIX,
                   IReactorThreads, IReactorFDSet, IReactorSocket, IReactorPluggableNameResolver):
    """What a node needs of its reactor: Twisted's default reactor provides every one.

    Objects that need less ask for less (a timer takes ``IReactorTime``); only the
    composition roots hold the whole reactor.
    """


def installed_reactor() -> INodeReactor:
    """The process's reactor (installed by twistd, or the default one), typed as what a
    node needs of it.  Twisted types the global as a narrower interface; every reactor
    twistd installs on Linux (epoll, the default) provides all of INodeReactor."""
    from twisted.internet import reactor

    return cast(INodeReactor, reactor)


class NodeExit:
    """Ends the node, once, with exit status 1 after a one-line reason on stderr (and in
    the log): its services stop cleanly first (the reactor's shutdown: the runner's
    fence table is removed, apps get their grace), then the process exits -- twistd
    itself would exit 0 after the reactor stopped.  Called before the reactor runs (a
    port a role needs cannot be bound as the node starts), the stop happens as soon as
    it runs, before any request is served."""

    def __init__(self, reactor: INodeReactor) -> None:
        self.reactor = reactor
        self.why: str | None = None

    def __call__(self, why: str) -> None:
        if self.why is not None:
            return  # already stopping for a first reason
        self.why = why
        print(why, file=sys.stderr, flush=True)

        def failed() -> None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

        self.reactor.addSystemEventTrigger("after", "shutdown", failed)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)


def _metrics_registry() -> MetricsRegistry:
    from epio.metrics import MetricsRegistry  # twisted.web: not at import time

    return MetricsRegistry()


@frozen
class Node:
    """Shared facts and services of one node process: built once, never changed.

    ``metrics`` is the node's one metrics registry (every role adds its collectors;
    tap serves it on ``metrics.listen``).  ``store_service`` is None only in a
    process with no store (an lb worker routing from a file).  ``bus`` is made on first use and cached (importing txzmq installs
    a reactor, so not at import time).
    """

    reactor: INodeReactor
    config: Config
    data_dir: Path
    roles: frozenset[str]
    node_id: str
    secret: bytes
    store_service: StoreService | None = None
    #: follows the store's nexus/logger endpoint lists (PostgreSQL store only; None otherwise)
    cluster: ClusterDirectory | None = None
    boot_id: str = field(factory=lambda: uuid.uuid4().hex)
    metrics: MetricsRegistry = field(factory=lambda: _metrics_registry())
    #: Call with a one-line reason to end the node with exit status 1 (:class:`NodeExit`).
    exit: NodeExit = field(default=Factory(lambda self: NodeExit(self.reactor), takes_self=True))

    @classmethod
    def prepare(cls, reactor: INodeReactor, config: Config, roles: frozenset[str],
                store: Callable[[Config, Path], StoreService] | None = None,
                euid: int | None = None) -> Node:
        """Create the data dir and cluster secret if needed; return the node.

        ``store`` builds the node's store service from the config and data dir (the
        node's only store: every role reaches it through ``node.store_service``).
        A root runner whose build and app users cannot reach the data dir refuses
        (:func:`reach_problem`), before it creates anything there; ``euid`` is the
        process's unless given.
        """
        data_dir = Path(config.settings.node.data_dir or "epio-data").absolute()
        euid = os.geteuid() if euid is None else euid
        problem = reach_problem(data_dir, roles, euid)
        if problem is None:
            try:
                data_dir.mkdir(parents=True, exist_ok=True)
                os.chmod(data_dir, 0o711)
            except OSError as e:
                raise NodeSetupError(f"cannot create data dir {data_dir}: {e.strerror}") from None
            # parents mkdir just made under a strict umask (077) are closed too
            problem = reach_problem(data_dir, roles, euid)
        if problem is not None:
            raise NodeSetupError(problem)
        secret_path = Path(config.settings.cluster.secret_file or data_dir / "cluster-secret")
        secret = read_or_create_secret(secret_path)
        node_id = config.settings.node.id or socket.gethostname()
        store_service = store(config, data_dir) if store is not None else None
        from epio.cluster import ClusterDirectory, follows_store, read_cache

        directory = None
        if store_service is not None and follows_store(config.settings.store.url):
            directory = ClusterDirectory(reactor, store_service.whenReady, node_id,
                                         config.settings, roles, data_dir, read_cache(data_dir))
            # every role starts with the merged lists (TOML + the last read from the store)
            # and follows their changes through node.cluster
            merged = directory.current
            config = config.replace("cluster", nexus=[dict(n) for n in merged.nexus],
                                    loggers=list(merged.loggers))
        return cls(reactor, config, data_dir, roles, node_id, secret, store_service, directory)

    @property
    def settings(self) -> Settings:
        """The node's typed, frozen configuration."""
        return self.config.settings

    @cached_property
    def bus(self) -> Bus:
        """The bus factory (signing with the cluster secret), made on first use."""
        from epio.bus import Bus

        return Bus(reactor=self.reactor, secret=self.secret, sender=self.node_id,
                   settings=self.settings.bus)
