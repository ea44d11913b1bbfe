"""How the api talks to runners: one interface, a bus implementation.

:class:`IRunnerControl` is what the scheduler and the deployer use; the real
:class:`BusRunnerControl` sends signed requests over ONE bus DEALER with
``request_to(endpoint, ...)`` (runner control endpoints come from the store's
``nodes`` table, where every runner registers itself).  Tests inject a fake
that implements the same interface (STYLE 18).
"""

from __future__ import annotations

from typing import Any

from zope.interface import Interface, implementer


class IRunnerControl(Interface):
    """Send one control request to the runner listening at ``endpoint``."""

    def request(endpoint: str, type: str, body: dict[str, Any],
                timeout: float | None = None) -> Any:
        """Awaitable: the reply body (dict).

        Raises ``epio.bus.RemoteError`` (the runner answered an error, with a
        code and message), ``epio.bus.RequestTimeout`` or ``epio.bus.BusError``.
        """


@implementer(IRunnerControl)
class BusRunnerControl:
    """:class:`IRunnerControl` over a started ``epio.bus`` Dealer."""

    def __init__(self, dealer: Any) -> None:
        self.dealer = dealer

    async def request(self, endpoint: str, type: str, body: dict[str, Any],
                      timeout: float | None = None) -> dict[str, Any]:
        env = await self.dealer.request_to(endpoint, type, body, timeout=timeout)
        reply: dict[str, Any] = dict(env.body)
        reply.setdefault("_type", env.type)
        return reply
