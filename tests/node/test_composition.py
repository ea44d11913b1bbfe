"""Issue 19: every role's graph is wired at construction, and the node stops in order.

``epio.tap.makeService`` builds the whole ``--role=all`` tree on a temporary data dir
(sqlite store, fence and sandbox off, loopback listeners on port 0).  The test walks
the service tree and the epio objects reachable from each service (bounded depth),
snapshots every attribute whose value is another epio object or a service, starts the
parts that are cheap to start (the store and the api role, whose second phase builds
its store-dependent graph), stops them, and walks again: no epio object may have had
such a collaborator attribute assigned or replaced after ``makeService`` returned.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from twisted.application.service import IService, IServiceCollection
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from epio.tap import ROLES, Options, makeService

MAX_DEPTH = 4

# What a service opens when it starts is not wiring: I/O cannot happen at construction
# (makeService runs before the reactor), so the store is connected in startService and
# held by its service from then on.  Nothing else may change after makeService.
ALLOWED: frozenset[str] = frozenset({
    "StoreService._store",  # the Store opened at start (epio/store/service.py)
})


def _is_epio(value: object) -> bool:
    return type(value).__module__.startswith("epio.")


def _is_collaborator(value: object) -> bool:
    return _is_epio(value) or IService.providedBy(value)


def _attrs(obj: object) -> dict[str, Any]:
    out: dict[str, Any] = dict(getattr(obj, "__dict__", {}))
    for klass in type(obj).__mro__:
        for slot in getattr(klass, "__slots__", ()):
            if slot not in out and hasattr(obj, slot):
                out[slot] = getattr(obj, slot)
    return out


def _reachable(root: object) -> Iterator[object]:
    """The services under ``root`` and the epio objects their attributes reach."""
    seen: set[int] = set()
    todo: list[tuple[object, int]] = [(root, 0)]
    while todo:
        obj, depth = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        if IServiceCollection.providedBy(obj):
            todo.extend((child, 0) for child in obj)  # type: ignore[attr-defined]
        if depth >= MAX_DEPTH:
            continue
        for value in _attrs(obj).values():
            values = value if isinstance(value, (list, tuple)) else [value]
            todo.extend((v, depth + 1) for v in values if _is_collaborator(v))


def snapshot(root: object) -> dict[tuple[int, str], tuple[str, int]]:
    """(object, attribute) -> (Class.attr, id of the collaborator) over the walk."""
    snap: dict[tuple[int, str], tuple[str, int]] = {}
    for obj in _reachable(root):
        if not _is_epio(obj):
            continue
        for name, value in _attrs(obj).items():
            if _is_collaborator(value):
                snap[(id(obj), name)] = (f"{type(obj).__name__}.{name}", id(value))
    return snap


def offenders(before: dict[tuple[int, str], tuple[str, int]],
              after: dict[tuple[int, str], tuple[str, int]], objects: set[int]) -> list[str]:
    """``Class.attr`` of each collaborator attribute of an object walked before that
    was added or replaced since (objects made later are their own graph's business)."""
    bad = {label for key, (label, ident) in after.items()
           if key[0] in objects and before.get(key, (label, -1))[1] != ident}
    return sorted(bad - ALLOWED)


class CompositionTests(TestCase):
    """``--role=all`` as twistd builds it."""

    timeout = 60

    def _options(self) -> Options:
        data = Path(self.mktemp()).absolute()
        data.mkdir(parents=True)
        # trial's mktemp parent is 0700: a root runner refuses a data dir its build
        # and app users cannot reach (epio.node.reach_problem)
        data.parent.chmod(0o711)
        cfg = data / "epio.toml"
        cfg.write_text(
            '[api]\nlisten = "tcp:0:interface=127.0.0.1"\n'
            '[lb]\nlisten = "tcp:0:interface=127.0.0.1"\n'
            '[runner]\nfence = "off"\nsandbox = "none"\n'
            '[metrics]\nlisten = ""\n')
        options = Options()
        options.parseOptions(["--role=all", "--config", str(cfg),
                              "--data-dir", str(data / "data")])
        return options

    async def test_wired_at_construction(self) -> None:
        """No epio object gets a collaborator attribute after makeService returned:
        not from starting the store and the api (whose store-dependent graph is
        built then), nor from stopping them; the tree holds the store first, then
        the roles in ROLES order."""
        root = makeService(self._options())
        # the store, the roles in start order, then what the root decides for the whole
        # process because the lb role runs here (SIGHUP reload, GC tuning)
        self.assertEqual([svc.name for svc in root], ["store", *ROLES, "lb-process"])
        before = snapshot(root)
        objects = {key[0] for key in before} | {id(o) for o in _reachable(root)}
        store = root.getServiceNamed("store")
        api = root.getServiceNamed("api")
        store.startService()
        self.addCleanup(store.stopService)
        await store.whenReady()
        api.startService()
        try:
            await api.whenReady()
            self.assertTrue(api.gate.is_open)
        finally:
            await api.stopService()
        await deferLater(reactor, 0, lambda: None)
        bad = offenders(before, snapshot(root), objects)
        self.assertEqual(bad, [], "collaborators assigned after makeService: "
                         + ", ".join(bad))

    def test_offenders_are_named(self) -> None:
        """The check names the ``Class.attr`` that changed (it can fail)."""
        root = makeService(self._options())
        before = snapshot(root)
        objects = {id(o) for o in _reachable(root)}
        api = root.getServiceNamed("api")
        api.gate = type(api.gate)(api.gate)  # a collaborator replaced after construction
        self.assertEqual(offenders(before, snapshot(root), objects), ["ApiService.gate"])
