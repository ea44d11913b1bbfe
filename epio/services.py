"""Service-tree helpers shared by the roles.

:class:`OrderedMultiService`: Twisted's ``MultiService.stopService`` stops every
child at once and waits for all of them, so a child that must outlive the others
(the runner's network fence, which has to stay until no app process is left) cannot
say so.  This one stops its children one after the other, in reverse start order,
each only once the previous one's ``stopService`` Deferred fired -- the order in
which they were started, undone.
"""

from __future__ import annotations

from twisted.application.service import IService, IServiceCollection, MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger


class OrderedMultiService(MultiService):
    """A MultiService whose children stop in reverse order, one at a time.

    Children start in the order they were added (as with MultiService); on stop the
    last one stops first and the first one last, each after the previous finished.
    A child whose stop fails is logged and the next one still stops: the returned
    Deferred always fires (with None).  A child that is not running (never started: an
    earlier sibling could not bind its port and the node is stopping) is skipped.
    """

    log = Logger()

    def stopService(self) -> defer.Deferred[None]:
        Service.stopService(self)  # running = False; the children are stopped below
        return defer.Deferred.fromCoroutine(self._stop_children(list(reversed(list(self)))))

    async def _stop_children(self, children: list[IService]) -> None:
        for child in children:
            if not child.running:  # never started (a sibling before it could not bind)
                continue
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:
                self.log.failure("stopping {name} failed", name=child.name or repr(child))


def named(name: str, service: IService) -> IService:
    """``service`` named ``name`` (typed through IService: Twisted's Service is
    unannotated)."""
    service.setName(name)
    return service


def attach(child: IService, parent: IServiceCollection) -> None:
    """Make ``child`` a child service of ``parent`` (``child.setServiceParent``)."""
    child.setServiceParent(parent)
