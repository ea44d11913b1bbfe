"""The runner's static file server: an app's ``[static]`` served by the platform.

One HTTP server per runner node (``runner.static_listen``) serves, for every app
that has a ``healthy`` (or ``draining``) web instance on this node, the static
directories of that instance's image (the build facts' ``static`` map in
``epio/manifest.json``: URL prefix -> image-relative directory, or a directory
under ``/data``, the app's writable storage).  The app process never sees these
requests.  docs/static.md has the whole design; in short:

* **Who may ask.**  Only the router: every request must carry
  ``X-Epio-Static: <app> <token>`` where the token is
  :func:`epio.routing.static_token` (an HMAC of the app name under a key derived
  from the cluster secret, which apps cannot read).  The router strips any
  client-sent ``X-Epio-Static`` from every request.  Without a valid token: 403.
* **What is served.**  GET and HEAD only (405 otherwise); no directory listings
  (``dir/`` serves ``dir/index.html`` if there is one, else 404); ``..`` and NUL
  in a path are refused; in an image (read-only) a symlink is followed only when
  its target stays inside the static directory; under ``/data`` (written by the
  app while we read it) no symlink is ever followed (every component is opened
  with ``O_NOFOLLOW`` relative to its parent), a file not owned by the app's UID
  is refused (a hard link the app made to someone else's file), and anything but a
  regular file (a FIFO, a socket) is a 404.
* **Headers.**  ``Content-Type`` from the file name (``charset=utf-8`` for text),
  ``ETag`` (sha256 of the content for files up to ``static_gzip_max_kb``, else
  image digest / inode based), ``Last-Modified`` (not for SquashFS images, whose
  times are all zero), ``Cache-Control: public, max-age=N`` and ``Expires`` (N from
  the manifest's ``[http] expires-/path``, longest prefix, else
  ``runner.static_max_age``), ``Vary: Accept-Encoding``,
  ``X-Content-Type-Options: nosniff``; 304 on ``If-None-Match`` (or, without it,
  ``If-Modified-Since``); single ``Range`` requests (206/416).
* **Compression.**  Text-like types between 256 bytes and ``static_gzip_max_kb``
  are gzipped (in the reactor's thread pool, once per file version, kept in an
  LRU of ``static_cache_mb``) when the client accepts gzip and
  ``runner.static_gzip`` is on.

Which releases a node serves follows the supervisor: an image is mounted (a
reference of our own on the :class:`~epio.runner.build.images.ImageStore`) when
a web instance of it starts, served once the instance is healthy, and released
when no web instance of it is left.  An app's releases are searched newest
first, so during a rollover a page rendered by the old release still finds its
(hashed) files while the new one serves its own.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import mimetypes
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from attrs import define, frozen
from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from epio.config.settings import RunnerSettings
from epio.routing import static_token

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from epio.node import INodeReactor
    from epio.runner.images import FetchingImages

HEADER = b"x-epio-static"
DATA = "/data"  # the app's writable storage as the manifest names it
GZIP_MIN_BYTES = 256  # smaller files gain nothing from compression
# served for these states of a web instance on this node (prepared from "starting")
SERVED_STATES = frozenset({"healthy", "draining"})
PREPARED_STATES = frozenset({"starting", "healthy", "draining", "crashed"})

_COMPRESSIBLE = frozenset({
    "application/javascript", "application/json", "application/xml", "application/xhtml+xml",
    "application/rss+xml", "application/atom+xml", "application/manifest+json",
    "application/wasm", "application/x-javascript", "application/ld+json",
    "application/vnd.ms-fontobject", "font/ttf", "font/otf", "image/svg+xml",
    "image/x-icon", "image/vnd.microsoft.icon", "image/bmp",
})
_TEXT_CHARSET = frozenset({"application/javascript", "application/json", "image/svg+xml",
                           "application/xml", "application/manifest+json"})
_EXTRA_TYPES = {".js": "application/javascript", ".mjs": "application/javascript",
                ".json": "application/json", ".map": "application/json",
                ".svg": "image/svg+xml", ".woff": "font/woff", ".woff2": "font/woff2",
                ".ttf": "font/ttf", ".otf": "font/otf", ".wasm": "application/wasm",
                ".webmanifest": "application/manifest+json", ".webp": "image/webp",
                ".ico": "image/vnd.microsoft.icon", ".txt": "text/plain",
                ".css": "text/css", ".html": "text/html", ".htm": "text/html"}
_MIME = mimetypes.MimeTypes()  # the built-in table only: the same on every host


def content_type(name: str) -> str:
    """The Content-Type for a file name (``charset=utf-8`` on text)."""
    ext = os.path.splitext(name)[1].lower()
    ctype = _EXTRA_TYPES.get(ext) or _MIME.guess_type("f" + ext, strict=False)[0] \
        or "application/octet-stream"
    if ctype.startswith("text/") or ctype in _TEXT_CHARSET:
        return ctype + "; charset=utf-8"
    return ctype


def compressible(ctype: str) -> bool:
    base = ctype.split(";", 1)[0]
    return base.startswith("text/") or base in _COMPRESSIBLE


class NotServed(Exception):
    """The path names nothing this server may give out (the answer is a 404)."""


# -- what one release serves --------------------------------------------------------


@frozen
class StaticDir:
    """One ``[static]`` entry of a release: URL prefix -> directory."""

    prefix: str  # "/static" or "/"
    image_rel: str | None  # image-relative directory, or None for a /data directory
    data_rel: tuple[str, ...] = ()  # components under the app's data dir (for /data)


@frozen
class Served:
    """An (app, release) whose image this node has mounted for a web instance."""

    app: str
    release: int
    digest: str
    uid: int
    image_root: str
    dirs: tuple[StaticDir, ...]  # longest prefix first
    expires: tuple[tuple[str, int], ...] = ()  # longest path prefix first

    @property
    def prefixes(self) -> list[str]:
        return [d.prefix for d in self.dirs]


def _clean_rel(path: str) -> tuple[str, ...] | None:
    parts = PurePosixPath(path).parts
    if not parts or parts[0] == "/" or any(p in ("..", "") or "\0" in p for p in parts):
        return None
    return tuple(p for p in parts if p != ".")


def read_static_facts(image_root: Path) -> tuple[list[StaticDir], list[tuple[str, int]]]:
    """The static map and ``[http] expires-/path`` of an image (bad entries are left out)."""
    try:
        doc = json.loads((image_root / "epio" / "manifest.json").read_text())
    except (OSError, ValueError):
        return [], []
    if not isinstance(doc, dict):
        return [], []
    build: Any = doc.get("build") if isinstance(doc.get("build"), dict) else {}
    manifest: Any = doc.get("manifest") if isinstance(doc.get("manifest"), dict) else {}
    raw: Any = build.get("static") if isinstance(build.get("static"), dict) else {}
    dirs = []
    for prefix, where in raw.items():
        if not (isinstance(prefix, str) and prefix.startswith("/") and isinstance(where, str)):
            continue
        prefix = "/" + prefix.strip("/")
        if any(p in ("..", ".") for p in prefix.split("/")):
            continue
        if where == DATA or where.startswith(DATA + "/"):
            rel = _clean_rel(where[len(DATA):].lstrip("/") or ".")
            if rel is None and where.rstrip("/") != DATA:
                continue
            dirs.append(StaticDir(prefix, None, rel or ()))
        else:
            rel = _clean_rel(where)
            if rel is None:
                continue
            dirs.append(StaticDir(prefix, "/".join(rel)))
    dirs.sort(key=lambda d: -len(d.prefix))
    http_facts: Any = manifest.get("http") if isinstance(manifest.get("http"), dict) else {}
    raw_exp: Any = http_facts.get("expires")
    raw_exp = raw_exp if isinstance(raw_exp, dict) else {}
    expires = [(p if p == "/" else "/" + p.strip("/"), int(s)) for p, s in raw_exp.items()
               if isinstance(p, str) and p.startswith("/") and isinstance(s, int)
               and not isinstance(s, bool) and s >= 0]
    expires.sort(key=lambda e: -len(e[0]))
    return dirs, expires


def match_prefix(path: str, prefix: str) -> str | None:
    """The rest of ``path`` under ``prefix`` (segment boundary), or None."""
    if prefix == "/":
        return path
    if path == prefix:
        return ""
    if path.startswith(prefix) and path[len(prefix)] == "/":
        return path[len(prefix):]
    return None


# -- opening files safely -------------------------------------------------------------

_O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_O_DIR = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC


def open_in_image(static_root: str, parts: Iterable[str],
                  image_root: str | None = None) -> tuple[int, os.stat_result]:
    """Open ``static_root/parts`` of a read-only image, following a symlink only when
    it stays inside ``static_root``, which itself must resolve inside ``image_root``
    (an image built before builds checked this may hold a planted link).  Returns
    (fd, stat); raises NotServed."""
    try:
        real_root = os.path.realpath(static_root, strict=True)
    except OSError:
        raise NotServed("no such static directory") from None
    if image_root is not None:
        real_image = os.path.realpath(image_root)
        if not real_root.startswith(real_image + os.sep):
            raise NotServed("the static directory leaves the image")
    cand = os.path.realpath(os.path.join(real_root, *parts))
    if cand != real_root and not cand.startswith(real_root + os.sep):
        raise NotServed("outside the static directory")
    try:
        fd = os.open(cand, _O_FILE)
    except OSError:
        raise NotServed("cannot open") from None
    return fd, os.fstat(fd)


def open_in_data(data_dir: str, parts: Iterable[str], owner: int | None
                 ) -> tuple[int, os.stat_result]:
    """Open ``data_dir/parts`` without following any symlink on the way (the app
    writes there while we read); refuse files not owned by ``owner``."""
    parts = list(parts)
    try:
        dfd = os.open(data_dir, _O_DIR)
    except OSError:
        raise NotServed("no data directory") from None
    try:
        for seg in parts[:-1]:
            nfd = os.open(seg, _O_DIR, dir_fd=dfd)
            os.close(dfd)
            dfd = nfd
        if parts:
            fd = os.open(parts[-1], _O_FILE, dir_fd=dfd)
        else:
            fd = os.dup(dfd)
    except OSError:
        raise NotServed("cannot open") from None
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if owner is not None and st.st_uid != owner:
        os.close(fd)
        raise NotServed("not the app's file")
    return fd, st


# -- per-file facts (ETag, gzip) -------------------------------------------------------


@frozen
class FileFacts:
    etag: str  # without quotes
    gz: bytes | None  # the gzipped body, when worth it


def analyse(fd: int, size: int, want_gzip: bool) -> FileFacts:
    """Hash (and gzip) a file's content (blocking: runs in a thread)."""
    chunks = []
    h = hashlib.sha256()
    off = 0
    while off < size:
        data = os.pread(fd, min(1 << 20, size - off), off)
        if not data:
            break
        h.update(data)
        if want_gzip:
            chunks.append(data)
        off += len(data)
    gz = None
    if want_gzip:
        body = b"".join(chunks)
        out = gzip.compress(body, compresslevel=6, mtime=0)
        gz = out if len(out) < len(body) else None
    return FileFacts(h.hexdigest()[:32], gz)


class FactsCache:
    """File version -> FileFacts, least recently used out past ``max_bytes`` of gzip."""

    def __init__(self, max_bytes: int, max_entries: int = 20000) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.bytes = 0
        self._d: OrderedDict[tuple[Any, ...], FileFacts] = OrderedDict()

    def get(self, key: tuple[Any, ...]) -> FileFacts | None:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key: tuple[Any, ...], value: FileFacts) -> None:
        if value.gz is not None and len(value.gz) > self.max_bytes:
            value = FileFacts(value.etag, None)
        old = self._d.pop(key, None)
        if old is not None and old.gz is not None:
            self.bytes -= len(old.gz)
        self._d[key] = value
        if value.gz is not None:
            self.bytes += len(value.gz)
        while self._d and (self.bytes > self.max_bytes or len(self._d) > self.max_entries):
            _, gone = self._d.popitem(last=False)
            if gone.gz is not None:
                self.bytes -= len(gone.gz)


def _etag_matches(header: bytes, tags: Iterable[str]) -> bool:
    """If-None-Match (weak comparison): ``*`` or any listed tag equal to one of ``tags``."""
    text = header.decode("latin-1")
    if text.strip() == "*":
        return True
    wanted = {t.strip().removeprefix("W/") for t in text.split(",")}
    return any(f'"{t}"' in wanted for t in tags)


def _parse_range(header: bytes, size: int) -> tuple[int, int] | None | bool:
    """A single ``bytes=`` range as (start, end inclusive); None: ignore the header
    (malformed or several ranges); False: unsatisfiable."""
    text = header.decode("latin-1").strip()
    if not text.startswith("bytes=") or "," in text:
        return None
    a, sep, b = text[6:].strip().partition("-")
    if not sep:
        return None
    try:
        if a == "":
            n = int(b)
            if n <= 0:
                return False
            return (max(0, size - n), size - 1) if size else False
        start = int(a)
        end = int(b) if b else size - 1
    except ValueError:
        return None
    if start >= size:
        return False
    if start < 0 or end < start:
        return None
    return start, min(end, size - 1)


# -- the HTTP side ---------------------------------------------------------------------


class StaticResource(Resource):
    """Every request of the static server (a leaf: the path is ours to interpret)."""

    isLeaf = True
    log = Logger()

    def __init__(self, server: StaticServer) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
        self.static = server

    def render(self, request: Any) -> Any:
        s = self.static
        request.setHeader(b"server", b"epio-static")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return self._error(request, 405, b"method not allowed\n")
        app = s.authorised_app(request.getHeader(HEADER))
        if app is None:
            s.counters["forbidden"] = s.counters.get("forbidden", 0) + 1
            return self._error(request, 403, b"forbidden\n")
        releases = s.releases.get(app)
        if not releases:
            return self._error(request, 404, b"not found\n")
        try:
            raw = unquote_to_bytes(request.path)
            path = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._error(request, 404, b"not found\n")
        if "\0" in path or not path.startswith("/"):
            return self._error(request, 404, b"not found\n")
        if ".." in path.split("/"):
            return self._error(request, 404, b"not found\n")
        for served in releases:
            for d in served.dirs:
                rest = match_prefix(path, d.prefix)
                if rest is None:
                    continue
                try:
                    fd, st, name = s.open(served, d, rest)
                except NotServed:
                    continue
                image = served.digest if d.image_rel is not None else ""
                return self._serve(request, served, path, fd, st, name, image)
        return self._error(request, 404, b"not found\n")

    def _error(self, request: Any, code: int, body: bytes) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(body))
        return b"" if request.method == b"HEAD" else body

    def _serve(self, request: Any, served: Served, path: str, fd: int,
               st: os.stat_result, name: str, image: str) -> Any:
        s = self.static
        f = os.fdopen(fd, "rb")
        ctype = content_type(name)
        gz_ok = (s.gzip and compressible(ctype) and GZIP_MIN_BYTES <= st.st_size
                 <= s.gzip_max_bytes)
        # a file version: in an image the digest is part of it (a later image mounted on
        # the same loop device has the same inode numbers and all-zero times)
        key = (image, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        facts = s.facts.get(key)
        if facts is None and st.st_size <= s.gzip_max_bytes:
            d = threads.deferToThreadPool(s.reactor, s.reactor.getThreadPool(), analyse,
                                          f.fileno(), st.st_size, gz_ok)

            def done(result: FileFacts) -> None:
                s.facts.put(key, result)
                self._respond(request, served, path, f, st, ctype, result)

            def failed(reason: Failure) -> None:
                f.close()
                self.log.failure("static file analysis failed", reason)
                if not request.finished and not request._disconnected:
                    request.setResponseCode(500)
                    request.finish()

            d.addCallbacks(done, failed)
            return NOT_DONE_YET
        if facts is None:  # too big to hash: a version tag from the image / inode
            tag = (f"{served.digest[:16]}-{st.st_ino:x}-{st.st_size:x}" if st.st_mtime_ns == 0
                   else f"{st.st_dev:x}-{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}")
            facts = FileFacts(tag, None)
        self._respond(request, served, path, f, st, ctype, facts)
        return NOT_DONE_YET

    def _respond(self, request: Any, served: Served, path: str, f: Any,
                 st: os.stat_result, ctype: str, facts: FileFacts) -> None:
        if request.finished or request._disconnected:
            f.close()
            return
        s = self.static
        accept = (request.getHeader(b"accept-encoding") or b"").lower()
        rng = request.getHeader(b"range")
        use_gz = facts.gz is not None and b"gzip" in accept and rng is None
        etag = facts.etag + ("-gz" if use_gz else "")
        max_age = s.max_age_for(served, path)
        now = s.reactor.seconds()
        request.setHeader(b"content-type", ctype.encode())
        request.setHeader(b"etag", f'"{etag}"'.encode())
        if facts.gz is not None:
            request.setHeader(b"vary", b"Accept-Encoding")
        request.setHeader(b"cache-control", b"public, max-age=%d" % max_age)
        request.setHeader(b"expires", http.datetimeToString(int(now + max_age)))
        request.setHeader(b"x-content-type-options", b"nosniff")
        mtime = int(st.st_mtime)
        if mtime > 0:
            request.setHeader(b"last-modified", http.datetimeToString(mtime))
        inm = request.getHeader(b"if-none-match")
        ims = request.getHeader(b"if-modified-since")
        not_modified = False
        if inm is not None:
            not_modified = _etag_matches(inm, (facts.etag, facts.etag + "-gz"))
        elif ims is not None and mtime > 0:
            since = http.stringToDatetime(ims) if _valid_http_date(ims) else None
            not_modified = since is not None and mtime <= since
        if not_modified:
            f.close()
            request.setResponseCode(304)
            request.finish()
            return
        if use_gz:
            f.close()
            assert facts.gz is not None
            request.setHeader(b"content-encoding", b"gzip")
            request.setHeader(b"content-length", b"%d" % len(facts.gz))
            if request.method != b"HEAD":
                request.write(facts.gz)
            request.finish()
            return
        size = st.st_size
        request.setHeader(b"accept-ranges", b"bytes")
        if rng is not None:
            if_range = request.getHeader(b"if-range")
            if if_range is None or if_range.strip() == f'"{facts.etag}"'.encode():
                r = _parse_range(rng, size)
                if r is False:
                    f.close()
                    request.setResponseCode(416)
                    request.setHeader(b"content-range", b"bytes */%d" % size)
                    request.setHeader(b"content-length", b"0")
                    request.finish()
                    return
                if r is not None and not isinstance(r, bool):
                    start, end = r
                    request.setResponseCode(206)
                    request.setHeader(b"content-range", b"bytes %d-%d/%d" % (start, end, size))
                    request.setHeader(b"content-length", b"%d" % (end - start + 1))
                    if request.method == b"HEAD":
                        f.close()
                        request.finish()
                        return
                    FileProducer(request, f, start, end - start + 1).start()
                    return
        request.setHeader(b"content-length", b"%d" % size)
        if request.method == b"HEAD" or size == 0:
            f.close()
            request.finish()
            return
        FileProducer(request, f, 0, size).start()


@implementer(IPushProducer)
class FileProducer:
    """Streams ``length`` bytes of an open file from ``offset`` to a request, pausing
    when the connection's buffer is full (a push producer: no cooperator involved)."""

    CHUNK = 65536

    def __init__(self, request: Any, f: Any, offset: int, length: int) -> None:
        self.request: Any = request
        self.f = f
        self.offset = offset
        self.left = length
        self.paused = False
        self._busy = False

    def start(self) -> None:
        self.f.seek(self.offset)
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._pump()

    def _pump(self) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            while self.request is not None and not self.paused and self.left > 0:
                data = self.f.read(min(self.CHUNK, self.left))
                if not data:  # the file shrank under us: end the response early
                    request, self.request = self.request, None
                    self.f.close()
                    request.unregisterProducer()
                    request.loseConnection()
                    return
                self.left -= len(data)
                self.request.write(data)
            if self.request is not None and self.left <= 0:
                request, self.request = self.request, None
                self.f.close()
                request.unregisterProducer()
                request.finish()
        finally:
            self._busy = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._pump()

    def stopProducing(self) -> None:
        self.request = None
        self.f.close()


def _valid_http_date(value: bytes) -> bool:
    try:
        http.stringToDatetime(value)
        return True
    except (ValueError, IndexError, KeyError):
        return False


class StaticSite(Site):
    """No access log here: the router logs every request it forwarded."""

    displayTracebacks = False
    noisy = False

    def log(self, request: Any) -> None:
        pass


# -- the service -----------------------------------------------------------------------


def default_listen(advertise_host: str) -> str:
    """An ephemeral port on ``advertise_host`` (the address routers reach this node at)."""
    if ":" in advertise_host:
        return "tcp6:0:interface=" + advertise_host.replace(":", "\\:")
    return f"tcp:0:interface={advertise_host}"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@define(eq=False)
class _Want:
    digest: str
    uid: int
    serve: bool


class StaticServer(Service):
    """The node's static file server and the set of releases it serves."""

    log = Logger()

    def __init__(
        self,
        reactor: INodeReactor,
        secret: bytes,
        images: FetchingImages,
        data_dir: Path,
        instances: Callable[[], Iterable[Any]],
        *,
        listen: str,
        advertise_host: str,
        max_age: int = 3600,
        gzip_on: bool = True,
        gzip_max_bytes: int = 2 << 20,
        cache_bytes: int = 64 << 20,
        idle_timeout: float = 120.0,
        uid_check: bool = True,
    ) -> None:
        self.reactor = reactor
        self._key = secret
        self.images = images
        self.appdata = Path(data_dir) / "appdata"
        self.instances = instances
        self.listen = listen
        self.advertise_host = advertise_host
        self.max_age = max_age
        self.gzip = gzip_on
        self.gzip_max_bytes = gzip_max_bytes
        self.facts = FactsCache(cache_bytes)
        self.idle_timeout = idle_timeout
        self.uid_check = uid_check
        self.releases: dict[str, list[Served]] = {}  # app -> served releases, newest first
        self.prepared: dict[tuple[str, int], Served] = {}
        self._preparing: set[tuple[str, int]] = set()
        self._tokens: dict[str, bytes] = {}
        self.counters: dict[str, int] = {}
        self.port: Any = None  # the IListeningPort (see _listening)
        self.endpoint: str | None = None  # "host:port" once listening
        self._want: dict[tuple[str, int], _Want] = {}
        self.on_listening: list[Callable[[], None]] = []  # told once it listens (the fence)

    # -- life ----------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
        endpoint = serverFromString(self.reactor, self.listen)
        d = defer.maybeDeferred(endpoint.listen, self.site())
        d.addCallbacks(self._listening, self._listen_failed)
        self.refresh()

    def site(self) -> StaticSite:
        """The twisted.web site answering this server's requests."""
        return StaticSite(StaticResource(self), timeout=self.idle_timeout, reactor=self.reactor)  # type: ignore[no-untyped-call]  # Twisted leaves it untyped

    def _listening(self, port: Any) -> None:  # IListeningPort: Twisted types getHost() as IAddress, without host and port
        self.port = port
        addr = port.getHost()
        host = addr.host
        if host in ("", "0.0.0.0", "::"):
            host = self.advertise_host
        self.endpoint = _hostport(host, addr.port)
        self.log.info("static files served on {endpoint}", endpoint=self.endpoint)
        for hook in list(self.on_listening):
            hook()

    def _listen_failed(self, f: Failure) -> None:
        self.log.error("static file server cannot listen on {listen}: {error}; apps' static "
                       "files go to the app processes", listen=self.listen,
                       error=f.getErrorMessage())

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.port is not None:
            port, self.port = self.port, None
            self.endpoint = None
            await defer.maybeDeferred(port.stopListening)
        self.releases = {}
        prepared, self.prepared = self.prepared, {}
        for served in prepared.values():
            await self._unmount(served.digest)

    # -- authorisation -----------------------------------------------------------------
    def authorised_app(self, header: bytes | None) -> str | None:
        """The app named by a valid ``X-Epio-Static: <app> <token>``, else None."""
        if not header:
            return None
        app_b, sep, token = header.strip().partition(b" ")
        if not sep or not app_b or len(app_b) > 100:
            return None
        try:
            app = app_b.decode("ascii")
        except UnicodeDecodeError:
            return None
        good = self._tokens.get(app)
        if good is None:
            if app not in self.releases:
                return None
            good = self._tokens[app] = static_token(self._key, app).encode()
        return app if hmac.compare_digest(token.strip(), good) else None

    # -- opening -------------------------------------------------------------------------
    def open(self, served: Served, d: StaticDir, rest: str) -> tuple[int, os.stat_result, str]:
        """Open the file for URL rest ``rest`` under ``d``: (fd, stat, name)."""
        parts = [p for p in rest.split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            raise NotServed("..")
        want_index = rest == "" or rest.endswith("/")
        for attempt in (parts, [*parts, "index.html"]):
            if d.image_rel is not None:
                fd, st = open_in_image(os.path.join(served.image_root, d.image_rel), attempt,
                                       served.image_root)
            else:
                owner = served.uid if self.uid_check else None
                fd, st = open_in_data(str(self.appdata / served.app), [*d.data_rel, *attempt],
                                      owner)
            if stat.S_ISREG(st.st_mode):
                return fd, st, attempt[-1] if attempt else ""
            os.close(fd)
            if not (stat.S_ISDIR(st.st_mode) and want_index):
                break
        raise NotServed("not a regular file")

    def max_age_for(self, served: Served, path: str) -> int:
        for prefix, seconds in served.expires:
            if match_prefix(path, prefix) is not None:
                return seconds
        return self.max_age

    # -- which releases are served --------------------------------------------------------
    def instances_changed(self) -> None:
        """The supervisor's observer: refresh while serving."""
        if self.running:
            self.refresh()

    def refresh(self) -> None:
        """Follow the supervisor: prepare new web releases, serve healthy ones, release
        the ones no web instance uses any more."""
        want: dict[tuple[str, int], _Want] = {}
        for inst in self.instances():
            spec = inst.spec
            state = getattr(inst.state, "value", inst.state)
            if spec.process_type != "web" or state not in PREPARED_STATES:
                continue
            key = (spec.app, int(spec.release))
            w = want.get(key)
            serve = state in SERVED_STATES
            if w is None:
                want[key] = _Want(str(spec.image_digest).removeprefix("sha256:"),
                                  int(spec.uid), serve)
            else:
                w.serve = w.serve or serve
        self._want = want
        for key, w in want.items():
            if key not in self.prepared and key not in self._preparing and self.running:
                self._preparing.add(key)
                d = defer.Deferred.fromCoroutine(self._prepare(key, w))
                d.addErrback(self._prepare_failed, key)
        for key in [k for k in self.prepared if k not in want]:
            served = self.prepared.pop(key)
            d = defer.Deferred.fromCoroutine(self._unmount(served.digest))
            d.addErrback(lambda f: self.log.failure("releasing a static image failed", f))
        self._publish()

    def _prepare_failed(self, f: Failure, key: tuple[str, int]) -> None:
        self._preparing.discard(key)
        self.log.failure("preparing static files of {app} v{release} failed", f, app=key[0],
                         release=key[1])

    def _publish(self) -> None:
        releases: dict[str, list[Served]] = {}
        for key, served in self.prepared.items():
            w = self._want.get(key)
            if w is not None and w.serve and served.dirs:
                releases.setdefault(served.app, []).append(served)
        for lst in releases.values():
            lst.sort(key=lambda x: -x.release)
        self.releases = releases
        self._tokens = {a: t for a, t in self._tokens.items() if a in releases}

    async def _prepare(self, key: tuple[str, int], w: _Want) -> None:
        try:
            root = Path(await self.images.mount(w.digest))
        except Exception as e:
            self._preparing.discard(key)
            self.log.warn("static files of {app} v{release}: image not available: {error}",
                          app=key[0], release=key[1], error=str(e))
            return
        self._preparing.discard(key)
        if key not in self._want or self._want[key].digest != w.digest or not self.running:
            await self._unmount(w.digest)
            return
        dirs, expires = read_static_facts(root)
        self.prepared[key] = Served(app=key[0], release=key[1], digest=w.digest, uid=w.uid,
                                    image_root=str(root), dirs=tuple(dirs),
                                    expires=tuple(expires))
        if dirs:
            self.log.info("static files of {app} v{release}: {prefixes}", app=key[0],
                          release=key[1], prefixes=", ".join(d.prefix for d in dirs))
        self._publish()

    async def _unmount(self, digest: str) -> None:
        try:
            await self.images.unmount(digest)
        except Exception as e:
            self.log.warn("unmounting image {digest} failed: {error}", digest=digest,
                          error=str(e))

    # -- heartbeat ------------------------------------------------------------------------
    def announcement(self) -> dict[str, Any]:
        """The heartbeat fields: ``static`` ("host:port") and ``static_prefixes``
        ({app: [prefix, ...]}) -- empty when not listening."""
        self.refresh()
        if self.endpoint is None:
            return {}
        prefixes = {app: sorted({p for s in lst for p in s.prefixes})
                    for app, lst in sorted(self.releases.items())}
        return {"static": self.endpoint, "static_prefixes": prefixes}


def make_static(reactor: INodeReactor, secret: bytes, images: FetchingImages, data_dir: Path,
                instances: Callable[[], Iterable[Any]], settings: RunnerSettings, *,
                uid_check: bool) -> StaticServer | None:
    """The runner's static file server (``runner.static_listen``; ``off``: None).  It
    follows the supervisor's ``instances`` (:meth:`StaticServer.instances_changed` is
    one of the supervisor's observers) and adds its endpoint and prefixes to every
    heartbeat."""
    if settings.static_listen == "off":
        return None
    advertise = settings.advertise_host
    server = StaticServer(
        reactor, secret, images, data_dir, instances,
        listen=settings.static_listen or default_listen(advertise), advertise_host=advertise,
        max_age=settings.static_max_age, gzip_on=settings.static_gzip,
        gzip_max_bytes=settings.static_gzip_max_kb * 1024,
        cache_bytes=settings.static_cache_mb * 1024 * 1024,
        idle_timeout=settings.static_idle_timeout, uid_check=uid_check,
    )
    server.setName("static-files")  # type: ignore[no-untyped-call]  # Twisted leaves it untyped
    return server


__all__ = ["StaticServer", "make_static", "content_type", "open_in_data", "open_in_image",
           "read_static_facts", "HEADER"]
