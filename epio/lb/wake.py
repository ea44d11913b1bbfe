"""Waking asleep apps: the router's side of ``runner.wake`` (docs/apps.md "Sleeping apps").

A route the nexus marks asleep names the control endpoints of the runners holding the
app's asleep web instances.  The proxy (:meth:`epio.lb.proxy.LB.hold`) holds the app's
requests and calls :meth:`RunnerWaker.wake` at most every ``WAKE_REPEAT`` seconds per
app; this sends ``runner.wake`` to each of those runners over one bus DEALER of the
router process.  Every router of a cluster may ask: a runner launches an asleep
instance once (``Supervisor.wake``), so two routers, or twenty concurrent first
requests, make one start.  The answer is only logged: the route table says when the
app has a backend again.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

#: seconds a runner has to answer runner.wake (it answers at once; the start follows)
WAKE_REQUEST_TIMEOUT = 5.0


class RunnerWaker:
    """``wake(app, endpoints)``: send ``runner.wake`` through a started bus Dealer."""

    log = Logger()

    def __init__(self, dealer: Any, timeout: float = WAKE_REQUEST_TIMEOUT) -> None:
        self.dealer = dealer
        self.timeout = timeout
        self.sent = 0
        self.failed = 0

    def wake(self, app: str, endpoints: tuple[str, ...]) -> None:
        for endpoint in endpoints:
            self.sent += 1
            defer.Deferred.fromCoroutine(self._wake(app, endpoint))

    async def _wake(self, app: str, endpoint: str) -> None:
        try:
            await self.dealer.request_to(endpoint, "runner.wake", {"app": app},
                                         timeout=self.timeout)
        except Exception as e:
            self.failed += 1
            self.log.warn("runner.wake of {app} to {endpoint} failed: {error}", app=app,
                          endpoint=endpoint, error=str(e) or type(e).__name__)
        else:
            self.log.info("asked {endpoint} to wake {app}", app=app, endpoint=endpoint)
