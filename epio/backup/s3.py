"""A small S3 client for the archive target ``backup.archive_s3_*``: put (multipart for
large objects), ranged get, delete and list, signed with :mod:`epio.backup.sigv4`.

Path-style addressing (``ENDPOINT/BUCKET/KEY``), which AWS, MinIO, Ceph RGW, Garage,
moto and the other S3-compatible stores all answer.  Requests go through Twisted's
``Agent`` on a persistent connection pool; every request (one object or one part up,
one range down, a listing page, a deletion) is bounded by ``timeout`` seconds and is
cancelled past it.  Memory is bounded by ``part_size``: an object larger than one
part is uploaded with a multipart upload (aborted if any step fails) and read back in
ranges of one part.

A hostile or broken endpoint cannot make the client hold more than that: an object or
range answer is read up to the size asked for, any other answer (a listing page, an
error, an upload id) up to ``MAX_ANSWER`` bytes, and a listing stops at ``MAX_PAGES``
pages; past a limit, or at the timeout, the connection is closed (not left streaming
into memory) and the request fails with :class:`S3Error`.  XML is parsed by the
standard library's expat, which fetches no external entity and refuses entity
expansion bombs (expat >= 2.4), only ever on an answer of bounded size.

The secret key is held by this object only: it is never logged, never in an error
(:class:`S3Error`'s text is the operation, the HTTP status and the store's error code
and message).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from io import BytesIO
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit
from xml.etree import ElementTree

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Cooperator
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from epio.backup import sigv4

MIN_PART = 5 << 20  # S3's smallest part but the last
MAX_PARTS = 10_000
META_SHA256 = "x-amz-meta-epio-sha256"  # the object's sha256, written at upload
ERROR_TEXT = 200  # characters of the store's error message kept
MAX_ANSWER = 8 << 20  # bytes of an answer that is not object data (listing page, error)
MAX_PAGES = 1000  # listing pages of one list() (1000 keys a page at most on AWS)


class S3Error(Exception):
    """An S3 request failed; ``str()`` is safe to show (no credentials)."""


class S3NotFound(S3Error):
    """No such object (HTTP 404)."""


class S3Refused(S3Error):
    """The object read back is not the one uploaded (its sha256 differs): refused."""


@frozen
class S3Object:
    key: str
    size: int


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _xml(body: bytes) -> ElementTree.Element | None:
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None


def _find(node: ElementTree.Element, name: str) -> str:
    for child in node.iter():
        if _local(child.tag) == name:
            return child.text or ""
    return ""


def _int(value: str | bytes, what: str) -> int:
    """A non-negative integer the store sent (a size, a length), else :class:`S3Error`."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    if not text.strip().isdigit():
        raise S3Error(f"{what}: not a size: {text[:40]!r}")
    return int(text)


class _Body(Protocol):
    """Reads one response body, at most ``limit`` bytes: past it, or when its Deferred
    is cancelled (the timeout), the connection is closed and no more is kept."""

    def __init__(self, what: str, limit: int) -> None:
        self.what = what
        self.limit = limit
        self.size = 0
        self.chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred(lambda _: self._close())

    def _close(self) -> None:
        self.chunks = []
        if self.transport is not None:
            # a body's transport is the connection as a producer (TransportProxyProducer):
            # stopping it stops reading and closes the TCP connection, TLS or not
            cast(IPushProducer, self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self._close()
            self.done.errback(S3Error(f"{self.what}: the answer is larger than "
                                      f"{self.limit} bytes; refused"))
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def _read_body(response: IResponse, what: str, limit: int) -> Deferred[bytes]:
    body = _Body(what, limit)
    response.deliverBody(body)
    return body.done


def _read_part(path: Path, offset: int, size: int) -> tuple[bytes, str]:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    return data, hashlib.sha256(data).hexdigest()


class S3Client:
    """One bucket of one S3-compatible endpoint, under a key prefix."""

    log = Logger()

    def __init__(self, reactor: Any, endpoint: str, bucket: str, access_key_id: str,
                 secret_key: str, region: str = "us-east-1", prefix: str = "",
                 part_size: int = 16 << 20, timeout: float = 300.0) -> None:
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError("the S3 endpoint must be an http:// or https:// URL")
        self.reactor = reactor
        self.endpoint = f"{url.scheme}://{url.netloc}"
        self.host = url.netloc
        self.base = url.path.rstrip("/")
        self.bucket = bucket
        self.access_key_id = access_key_id
        self._secret = secret_key
        self.region = region
        self.prefix = prefix
        self.part_size = part_size
        self.timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._agent = Agent(reactor, pool=self._pool)
        self._cooperator = Cooperator(scheduler=lambda f: reactor.callLater(0, f))

    def key(self, name: str) -> str:
        return self.prefix + name

    def where(self, name: str) -> str:
        """Where object ``name`` is, for people: ``s3://BUCKET/KEY``."""
        return f"s3://{self.bucket}/{self.key(name)}"

    def close(self) -> Deferred[None]:
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed

    async def _thread(self, f: Any, *args: Any) -> Any:
        return await deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def _amz_date(self) -> str:
        return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.reactor.seconds()))

    async def _request(self, method: str, key: str | None,
                       query: list[tuple[str, str]] | None = None, body: bytes = b"",
                       payload_sha256: str | None = None,
                       headers: Mapping[str, str] | None = None,
                       ok: tuple[int, ...] = (200,),
                       limit: int | None = None) -> tuple[IResponse, bytes]:
        """One signed request on the bucket (``key`` None) or an object; its response
        and body (at most ``limit`` bytes, ``MAX_ANSWER`` if None).  :class:`S3Error` for a transport failure,
        a timeout, a larger body or a status not in ``ok``."""
        query = query or []
        path = sigv4.encode_path(f"{self.base}/{self.bucket}"
                                 + (f"/{key}" if key is not None else "/"))
        payload = payload_sha256 or (hashlib.sha256(body).hexdigest() if body
                                     else sigv4.EMPTY_SHA256)
        signed = {"host": self.host, "x-amz-date": self._amz_date(),
                  "x-amz-content-sha256": payload, **(headers or {})}
        auth = sigv4.authorization(method, path, query, signed, payload, self.access_key_id,
                                   self._secret, self.region, "s3", signed["x-amz-date"])
        raw = Headers({k.encode(): [v.encode()] for k, v in signed.items()})
        raw.setRawHeaders(b"authorization", [auth.encode()])
        qs = sigv4.canonical_query(query)
        url = f"{self.endpoint}{path}" + (f"?{qs}" if qs else "")
        producer = (FileBodyProducer(BytesIO(body), cooperator=self._cooperator)
                    if body or method in ("PUT", "POST") else None)
        what = f"S3 {method} {key if key is not None else self.bucket}"

        async def go() -> tuple[IResponse, bytes]:
            response = await self._agent.request(method.encode(), url.encode(), raw, producer)
            data: bytes = await _read_body(response, what,
                                           MAX_ANSWER if limit is None else limit)
            return response, data

        def timed_out(result: Any, timeout: float) -> Failure:
            # the cancelled request fails as ResponseNeverReceived or the like: say why
            return Failure(DeferredTimeout(f"{what} timed out"))

        d = Deferred.fromCoroutine(go())
        d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=timed_out)
        try:
            response, data = await d
        except (CancelledError, S3Error):
            raise
        except (TimeoutError, DeferredTimeout):
            raise S3Error(f"{what}: no answer within {self.timeout:g}s "
                          "(backup.archive_s3_timeout)") from None
        except Exception as e:  # a refused connection, a reset, a bad DNS name
            raise S3Error(f"{what}: {self.endpoint} unreachable ({type(e).__name__})") from None
        if response.code not in ok:
            raise self._error(what, response.code, data)
        return response, data

    def _error(self, what: str, status: int, data: bytes) -> S3Error:
        node = _xml(data)
        # the store's words, on one line (no forged log lines, no terminal controls)
        code = " ".join((_find(node, "Code") if node is not None else "").split())[:64]
        message = " ".join((_find(node, "Message") if node is not None else "").split()
                           )[:ERROR_TEXT]
        code, message = ("".join(c for c in t if c.isprintable()) for t in (code, message))
        text = f"{what}: HTTP {status}" + (f" {code}" if code else "") + (
            f": {message}" if message else "")
        return (S3NotFound if status == 404 else S3Error)(text)

    # -- objects -------------------------------------------------------------------

    async def put_file(self, name: str, path: Path, sha256: str) -> None:
        """Upload ``path`` as object ``name`` (its sha256 kept as the object's metadata):
        one PUT up to ``part_size``, a multipart upload above."""
        size = path.stat().st_size
        key = self.key(name)
        meta = {META_SHA256: sha256}
        if size <= self.part_size:
            data, digest = await self._thread(_read_part, path, 0, size)
            await self._request("PUT", key, body=data, payload_sha256=digest, headers=meta)
            return
        _, body = await self._request("POST", key, [("uploads", "")], headers=meta)
        node = _xml(body)
        upload = _find(node, "UploadId") if node is not None else ""
        if not upload:
            raise S3Error(f"S3 POST {key}?uploads: no UploadId in the answer")
        try:
            etags: list[str] = []
            for offset in range(0, size, self.part_size):
                data, digest = await self._thread(_read_part, path, offset, self.part_size)
                n = len(etags) + 1
                response, _ = await self._request(
                    "PUT", key, [("partNumber", str(n)), ("uploadId", upload)], body=data,
                    payload_sha256=digest)
                etag = response.headers.getRawHeaders(b"etag", [b""])[0].decode()
                if not etag:
                    raise S3Error(f"S3 PUT {key} part {n}: no ETag in the answer")
                etags.append(etag)
            parts = "".join(f"<Part><PartNumber>{i}</PartNumber><ETag>{e}</ETag></Part>"
                            for i, e in enumerate(etags, 1))
            _, body = await self._request(
                "POST", key, [("uploadId", upload)],
                body=f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode())
            node = _xml(body)
            if node is not None and _local(node.tag) == "Error":  # a 200 that failed
                raise self._error(f"S3 POST {key}?uploadId", 200, body)
        except BaseException:
            try:
                await self._request("DELETE", key, [("uploadId", upload)], ok=(200, 204, 404))
            except S3Error as e:
                self.log.warn("S3 multipart upload of {key} not aborted: {why}", key=key,
                              why=str(e))
            raise
        self.log.info("S3 multipart upload of {key}: {parts} parts", key=key,
                      parts=len(etags))

    async def get_file(self, name: str, dest: Path) -> str:
        """Download object ``name`` into ``dest`` (in ranges of ``part_size``); return the
        sha256 it was uploaded with (its metadata, "" if none).  :class:`S3Error` if the
        object changes size or differs from that sha256 (refused, ``dest`` removed);
        :class:`S3NotFound` if there is no such object."""
        key = self.key(name)
        head, _ = await self._request("HEAD", key)
        size = _int(head.headers.getRawHeaders(b"content-length", [b"0"])[0],
                    f"S3 HEAD {key}: Content-Length")
        expected = str(head.headers.getRawHeaders(META_SHA256.encode(), [b""])[0].decode())
        digest = hashlib.sha256()
        try:
            with open(dest, "wb") as out:
                os.fchmod(out.fileno(), 0o600)
                if size <= self.part_size:
                    _, data = await self._request("GET", key, limit=size)
                    out.write(data)
                    digest.update(data)
                else:
                    for offset in range(0, size, self.part_size):
                        last = min(size, offset + self.part_size) - 1
                        _, data = await self._request("GET", key,
                                                      headers={"range": f"bytes={offset}-{last}"},
                                                      ok=(206,), limit=last + 1 - offset)
                        out.write(data)
                        digest.update(data)
            if dest.stat().st_size != size:
                raise S3Error(f"S3 GET {key}: {dest.stat().st_size} bytes read of {size}")
            if expected and digest.hexdigest() != expected:
                raise S3Refused(f"archive object {key} does not match the sha256 it was "
                              "uploaded with; refusing")
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        return expected

    async def delete(self, name: str) -> None:
        """Delete object ``name`` (no error if it is already gone)."""
        await self._request("DELETE", self.key(name), ok=(200, 204, 404))

    async def list(self, prefix: str = "") -> list[S3Object]:
        """The objects whose names start with ``prefix`` (under the client's prefix),
        every page of them, with their names (the client's prefix taken off)."""
        found: list[S3Object] = []
        token = ""
        for _ in range(MAX_PAGES):
            query = [("list-type", "2"), ("prefix", self.key(prefix))]
            if token:
                query.append(("continuation-token", token))
            _, body = await self._request("GET", None, query)
            node = _xml(body)
            if node is None:
                raise S3Error(f"S3 GET {self.bucket}?list-type=2: not an XML listing")
            for item in node:
                if _local(item.tag) == "Contents":
                    key = _find(item, "Key")
                    if key.startswith(self.prefix):
                        found.append(S3Object(key[len(self.prefix):], _int(
                            _find(item, "Size") or "0", f"S3 listing of {self.bucket}")))
            token = _find(node, "NextContinuationToken")
            if _find(node, "IsTruncated") != "true" or not token:
                return found
        raise S3Error(f"S3 GET {self.bucket}?list-type=2: more than {MAX_PAGES} listing "
                      "pages; refused")
