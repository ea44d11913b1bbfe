"""Purging destroyed apps once their grace period is over.

``epio apps destroy`` keeps an app (add-ons, data dir, config, releases, UID) for
``api.destroyed_grace`` seconds.  One api process at a time -- the holder of the
``epio.purge`` store lock (an advisory lock on PostgreSQL) -- looks every
``api.purge_interval`` seconds for destroyed apps whose ``purge_after`` has passed
and purges each (:meth:`epio.api.domain.Platform.purge_app`).  A purge that fails
(a runner down, the shared PostgreSQL unreachable) is logged and tried again at the
next look; the app stays listed until it succeeds.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from epio.api.errors import ApiError
from epio.services import attach
from epio.store import LeaderService, Store, StoreError

PURGE_LOCK = "epio.purge"


class AppPurger:
    """Purges the destroyed apps that are due, by the injected clock."""

    log = Logger()

    def __init__(self, platform: Any, store: Store, clock: IReactorTime) -> None:
        self.platform = platform
        self.store = store
        self.clock = clock
        self.looks = 0  # completed looks (each purge_due call that ran to its end)

    async def purge_due(self) -> list[str]:
        """Purge every destroyed app due now; return the names purged."""
        purged = []
        for app in await self.store.purge_due(self.clock.seconds()):
            try:
                await self.platform.purge_app(None, app)
            except (ApiError, StoreError) as e:
                message = e.message if isinstance(e, ApiError) else str(e)
                self.log.warn("purging destroyed app {app} failed, tried again later: {error}",
                              app=app.name, error=message)
                continue
            purged.append(app.name)
        self.looks += 1
        return purged


class PurgeService(MultiService):
    """Runs an :class:`AppPurger` every ``interval`` seconds while this process holds
    the purge lock (leader only)."""

    log = Logger()

    def __init__(self, purger: AppPurger, store: Store, clock: IReactorTime, interval: float,
                 retry_interval: float) -> None:
        MultiService.__init__(self)
        self.purger = purger
        self.clock = clock
        self.interval = interval
        self._loop: LoopingCall | None = None
        self.leader = LeaderService(store, PURGE_LOCK, self._elected, self._lost, clock=clock,
                                    retry_interval=retry_interval)
        attach(self.leader, self)

    def _elected(self) -> None:
        self.log.info("elected leader for {lock}: purging destroyed apps every {interval}s",
                      lock=PURGE_LOCK, interval=self.interval)
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("the purge loop died", f))

    def _lost(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _tick(self) -> Deferred[Any]:
        return Deferred.fromCoroutine(self.purger.purge_due()).addErrback(
            lambda f: self.log.failure("purging destroyed apps failed", f))

    def stopService(self) -> Any:
        self._lost()
        return MultiService.stopService(self)
