"""Images a runner lacks are fetched from a peer runner over the bus.

Builds happen on one runner; an instance may be placed on another.  Before it
mounts an image, the launcher asks :class:`FetchingImages`, which, when the
image is not in the local :class:`~epio.runner.build.images.ImageStore`, pulls
it in chunks from the runners registered in the store (``runner.fetch_image``
{digest, offset} -> ``runner.image_chunk`` {digest, format, offset, size, data,
eof}) and installs it with ``ImageStore.begin_import``, which verifies the
digest before the image appears (a peer cannot substitute another image).

The serving side (:class:`ImageServer`) reads the SquashFS file itself, or a tar
of a directory image made once per fetch and kept for ``runner.fetch_timeout``
after its last use.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from epio.runner.build.images import ImageError, ImageStore, check_digest

if TYPE_CHECKING:
    from epio.node import INodeReactor


class FetchError(Exception):
    """No peer could give us the image (the message says what was tried)."""


class ImageServer:
    """Serves chunks of this node's images to peers."""

    log = Logger()

    def __init__(self, reactor: INodeReactor, images: ImageStore, chunk_bytes: int,
                 keep_open: float = 60.0) -> None:
        self.reactor = reactor
        self.images = images
        self.chunk_bytes = chunk_bytes
        self.keep_open = keep_open
        self._open: dict[str, tuple[IO[bytes], int, str, Any]] = {}
        self.served_bytes = 0

    def _defer(self, fn: Any, *args: Any) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)

    async def chunk(self, digest: str, offset: int) -> dict[str, Any]:
        """One chunk at ``offset``; raises ImageError when the image is not here."""
        check_digest(digest)
        entry = self._open.get(digest)
        if entry is None:
            fmt = self.images.format(digest)  # raises ImageError if absent

            def open_stream() -> tuple[IO[bytes], int]:
                stream = self.images.open_for_read(digest)
                stream.seek(0, 2)
                size = stream.tell()
                return stream, size

            stream, size = await self._defer(open_stream)
            entry = (stream, size, fmt, None)
        stream, size, fmt, timer = entry
        if timer is not None and timer.active():
            timer.cancel()

        def read() -> bytes:
            stream.seek(offset)
            return stream.read(self.chunk_bytes)

        data = await self._defer(read)
        eof = offset + len(data) >= size
        if eof:
            self._open.pop(digest, None)
            stream.close()
        else:
            self._open[digest] = (stream, size, fmt,
                                  self.reactor.callLater(self.keep_open, self._expire, digest))
        self.served_bytes += len(data)
        return {"digest": digest, "format": fmt, "offset": offset, "size": size,
                "data": data, "eof": eof}

    def _expire(self, digest: str) -> None:
        entry = self._open.pop(digest, None)
        if entry is not None:
            entry[0].close()

    def close(self) -> None:
        for digest in list(self._open):
            stream, _, _, timer = self._open.pop(digest)
            if timer is not None and timer.active():
                timer.cancel()
            stream.close()


class FetchingImages:
    """``mount``/``unmount`` of the local ImageStore, fetching missing images first."""

    log = Logger()

    def __init__(
        self,
        reactor: INodeReactor,
        images: ImageStore,
        peers: Callable[[], Awaitable[list[str]]],
        request: Callable[[str, str, dict[str, Any], float], Awaitable[dict[str, Any]]],
        timeout: float = 30.0,
    ) -> None:
        self.reactor = reactor
        self.images = images
        self.peers = peers
        self.request = request  # (endpoint, type, body, timeout) -> reply body
        self.timeout = timeout
        self._fetching: dict[str, list[defer.Deferred[None]]] = {}
        self.fetched_bytes = 0

    async def mount(self, digest: str) -> Path:
        if not self.images.has(digest):
            await self.fetch(digest)
        return await self.images.mount(digest)

    async def unmount(self, digest: str, force: bool = False) -> None:
        await self.images.unmount(digest, force=force)

    def fetch(self, digest: str) -> defer.Deferred[None]:
        """Fetch ``digest`` once, however many instances wait for it."""
        out: defer.Deferred[None] = defer.Deferred()
        waiters = self._fetching.get(digest)
        if waiters is not None:
            waiters.append(out)
            return out
        self._fetching[digest] = [out]

        def fire(result: Any) -> None:
            for w in self._fetching.pop(digest, []):
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(None)

        defer.Deferred.fromCoroutine(self._fetch(digest)).addBoth(fire)
        return out

    async def _fetch(self, digest: str) -> None:
        check_digest(digest)
        tried: list[str] = []
        for endpoint in await self.peers():
            try:
                await self._fetch_from(endpoint, digest)
                return
            except Exception as e:
                why = getattr(e, "message", None) or str(e) or type(e).__name__
                tried.append(f"{endpoint}: {why}")
                self.log.warn("fetching image {digest} from {peer} failed: {why}",
                              digest=digest, peer=endpoint, why=why)
        raise FetchError(f"image {digest} is not on this node and no peer gave it"
                         + (f" ({'; '.join(tried)})" if tried else " (no peer runner known)"))

    async def _fetch_from(self, endpoint: str, digest: str) -> None:
        offset = 0
        writer = None
        try:
            while True:
                body = await self.request(endpoint, "runner.fetch_image",
                                          {"digest": digest, "offset": offset}, self.timeout)
                data = body.get("data")
                if body.get("digest") != digest or body.get("offset") != offset \
                        or not isinstance(data, bytes):
                    raise ImageError("peer sent a malformed chunk")
                if writer is None:
                    writer = self.images.begin_import(digest, str(body.get("format")))
                if data:
                    await threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                                    writer.write, data)
                offset += len(data)
                self.fetched_bytes += len(data)
                if body.get("eof"):
                    break
                if not data:
                    raise ImageError("peer sent an empty chunk before the end")
            await threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                            writer.finish)
            writer = None
            self.log.info("fetched image {digest} from {peer} ({n} bytes)", digest=digest,
                          peer=endpoint, n=offset)
        finally:
            if writer is not None:
                writer.abort()

