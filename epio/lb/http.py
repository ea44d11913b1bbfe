"""Strict HTTP/1.1 message parsing for the router (RFC 9110/9112).

Hand-written rather than llhttp (httptools): the router must reject everything a
backend could read differently (CL+TE, duplicate or odd Content-Length, a
Transfer-Encoding not ending in chunked, obs-fold, whitespace before the colon,
bare CR/LF and other control characters, a missing or duplicate Host) and then
re-serialise the head anyway (hop-by-hop headers out, X-Forwarded-* in), so the
header loop is ours in any case.  The whole header block is validated by one
compiled regular expression (C speed); then one ``split`` and a short loop pick
out the few headers that matter.  Bodies are framed by :class:`ChunkedDecoder`
or a byte count; the backend only ever sees a head we wrote and a body we framed.

:func:`parse_request` and :func:`parse_response` each keep their own header loop,
on purpose: their shared part is four lines (find the colon, look the name up, keep
or drop), and every shared form measured costs the proxied request more than it
saves (docs/architecture.md "Why lb/http.py keeps two header loops").

Nothing here does I/O; the proxy feeds bytes in.
"""

from __future__ import annotations

import re

MAX_REQUEST_LINE = 8192
MAX_HEADERS = 100
MAX_HEADER_BYTES = 16384
MAX_RESPONSE_HEAD = 65536
MAX_CHUNK_LINE = 4096


class HTTPError(Exception):
    """A request the router answers itself: ``status`` with error ``code``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class BadMessage(HTTPError):
    """Bad framing: answered with 400 (or 414/431/501/505) and the connection closed."""


class BadResponse(Exception):
    """A backend response the router will not pass on (502)."""


_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# name ":" OWS value OWS CRLF, value = HTAB / SP / VCHAR / obs-text.  A line starting
# with whitespace (obs-fold), a space before the colon, a bare CR or LF, NUL or any
# other control character makes the block fail to match.
_HEADER_BLOCK = re.compile(rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*")
_METHOD = re.compile(_TOKEN)
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+")
_HOST = re.compile(
    rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=%]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?"
)
_REQUEST_ID = re.compile(rb"[A-Za-z0-9+/=_.\-]{20,200}")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})(?:[\t ]*;[\t\x20-\x7e\x80-\xff]*)?")

# Headers the proxy interprets or rewrites: the value says what to do.
H_DROP = 0      # hop-by-hop or proxy-owned: never forwarded as received
H_HOST = 1
H_CL = 2
H_TE = 3
H_CONN = 4
H_UPGRADE = 5
H_EXPECT = 6
H_XFF = 7
H_XFPROTO = 8
H_XFPORT = 9
H_RID = 10
H_ACCEPT = 11
H_FORWARDED = 12
H_AUTH = 13

REQUEST_SPECIAL: dict[bytes, int] = {
    b"host": H_HOST,
    b"content-length": H_CL,
    b"transfer-encoding": H_TE,
    b"connection": H_CONN,
    b"upgrade": H_UPGRADE,
    b"expect": H_EXPECT,
    b"x-forwarded-for": H_XFF,
    b"x-forwarded-proto": H_XFPROTO,
    b"x-forwarded-port": H_XFPORT,
    b"x-request-id": H_RID,
    b"accept": H_ACCEPT,
    b"forwarded": H_FORWARDED,
    b"authorization": H_AUTH,
    b"keep-alive": H_DROP,
    b"proxy-connection": H_DROP,
    b"te": H_DROP,
    b"trailer": H_DROP,
    b"x-request-start": H_DROP,
    b"via": H_DROP,
    b"x-epio-static": H_DROP,  # only the router says a request is static (docs/static.md)
}

RESPONSE_SPECIAL: dict[bytes, int] = {
    b"content-length": H_CL,
    b"transfer-encoding": H_TE,
    b"connection": H_CONN,
    b"upgrade": H_UPGRADE,
    b"keep-alive": H_DROP,
    b"proxy-connection": H_DROP,
    b"te": H_DROP,
    b"trailer": H_DROP,
}

_SIMPLE_CONN = frozenset({b"keep-alive", b"close", b"upgrade"})
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


class Request:
    """One parsed request head (what the proxy needs; ``lines`` are kept verbatim).

    Defaults are class attributes: a request only stores what differs (cheap to make).
    """

    method = b""
    target = b""
    version = 1  # minor version: 1 = HTTP/1.1, 0 = HTTP/1.0
    host = ""
    host_line = b""
    lines: list[bytes] = []
    content_length = -1
    chunked = False
    keep_alive = True
    expect_continue = False
    upgrade: bytes | None = None
    xff: bytes | None = None
    xfproto: bytes | None = None
    xfport: bytes | None = None
    request_id: bytes | None = None
    accept_json = False
    forwarded: list[bytes] | None = None
    # the Authorization value ([basic_auth] apps); b"" when sent more than once
    authorization: bytes | None = None

    @property
    def has_body(self) -> bool:
        return self.chunked or self.content_length > 0


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip(b" \t").lower() for t in value.split(b",") if t.strip(b" \t")]


def _content_length(value: bytes, seen: int) -> int:
    if seen >= 0:
        raise BadMessage(400, "bad_request", "duplicate Content-Length")
    if not value.isdigit() or len(value) > 18:
        raise BadMessage(400, "bad_request", "invalid Content-Length")
    return int(value)


def _split_head(head: bytes) -> tuple[bytes, bytes]:
    """A head's first line, and its header block with each line CRLF-terminated."""
    nl = head.find(b"\r\n")
    if nl < 0:
        return head, b""
    return head[:nl], head[nl + 2:] + b"\r\n"


def _connection_tokens(value: bytes) -> list[bytes]:
    lv = value.lower()
    return [lv] if lv in _SIMPLE_CONN else _tokens(value)


def _without_hop_by_hop(kept: list[bytes], conn: list[bytes]) -> list[bytes]:
    """``kept`` without the headers a Connection header names (RFC 9110 7.6.1); called
    only when it names more than keep-alive, close or upgrade (rare: the test is inline
    in the callers, the per-request path)."""
    drop = {c for c in conn if c not in _SIMPLE_CONN}
    if not drop:
        return kept
    return [ln for ln in kept if ln[: ln.find(b":")].lower() not in drop]


def check_request_line_length(buf: bytes) -> None:
    """Raise 414 when ``buf`` (a head in progress) has a request line over the limit."""
    nl = buf.find(b"\r\n", 0, MAX_REQUEST_LINE + 2)
    if nl < 0 and len(buf) > MAX_REQUEST_LINE:
        raise BadMessage(414, "uri_too_long", "request line longer than 8 KiB")


def parse_request(head: bytes) -> Request:
    """Parse a request head (without its final CRLFCRLF); raise :class:`HTTPError`.

    The request line (:func:`_request_line`), then the header fields in one pass,
    then what they mean together (:func:`_request_semantics`)."""
    line, block = _split_head(head)
    if len(line) > MAX_REQUEST_LINE:
        raise BadMessage(414, "uri_too_long", "request line longer than 8 KiB")
    if len(head) - len(line) > MAX_HEADER_BYTES:
        raise BadMessage(431, "headers_too_large", "request headers larger than 16 KiB")
    req = Request()
    abs_host = _request_line(req, line)
    if block and not _HEADER_BLOCK.fullmatch(block):
        raise BadMessage(400, "bad_request", "malformed header field")
    lines = block.split(b"\r\n")
    lines.pop()
    if len(lines) > MAX_HEADERS:
        raise BadMessage(431, "headers_too_large", "more than 100 request headers")
    minor = req.version
    kept = []
    hosts = 0
    cl = -1
    te: list[bytes] | None = None
    conn: list[bytes] | None = None
    upgrade = None
    special = REQUEST_SPECIAL
    for ln in lines:
        colon = ln.find(b":")
        kind = special.get(ln[:colon].lower())
        if kind is None:
            kept.append(ln)
            continue
        if kind == H_DROP:
            continue
        value = ln[colon + 1:].strip(b" \t")
        if kind == H_HOST:
            hosts += 1
            req.host_line = ln
            req.host = value.decode("latin-1")
            if not _HOST.fullmatch(value):
                raise BadMessage(400, "bad_request", "invalid Host")
        elif kind == H_CL:
            cl = _content_length(value, cl)
        elif kind == H_TE:
            te = (te or []) + _tokens(value)
        elif kind == H_CONN:
            conn = (conn or []) + _connection_tokens(value)
        elif kind == H_UPGRADE:
            upgrade = value
        elif kind == H_ACCEPT:
            kept.append(ln)
            if b"json" in value:
                req.accept_json = True
        elif kind == H_EXPECT:
            if value.lower() == b"100-continue":
                req.expect_continue = minor == 1
            else:
                raise HTTPError(417, "expectation_failed", "only Expect: 100-continue is understood")
        elif kind == H_XFF:
            req.xff = value if req.xff is None else req.xff + b", " + value
        elif kind == H_XFPROTO:
            req.xfproto = value
        elif kind == H_XFPORT:
            req.xfport = value
        elif kind == H_RID:
            req.request_id = value
        elif kind == H_AUTH:
            kept.append(ln)  # the app sees it too, as behind any auth_basic proxy
            req.authorization = value if req.authorization is None else b""
        elif kind == H_FORWARDED:
            if req.forwarded is None:
                req.forwarded = []
            req.forwarded.append(ln)
    _request_semantics(req, kept, hosts, abs_host, cl, te, conn, upgrade)
    return req


def _request_line(req: Request, line: bytes) -> bytes | None:
    """Set ``req``'s method, version and target from its request line; return the host
    of an absolute-form target (``http://host/path``), else None."""
    parts = line.split(b" ")
    if len(parts) != 3:
        raise BadMessage(400, "bad_request", "malformed request line")
    method, target, version = parts
    if version == b"HTTP/1.1":
        minor = 1
    elif version == b"HTTP/1.0":
        minor = 0
    elif version.startswith(b"HTTP/") and len(version) == 8 and version[5:6].isdigit():
        raise BadMessage(505, "version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served")
    else:
        raise BadMessage(400, "bad_request", "malformed request line")
    if not _METHOD.fullmatch(method):
        raise BadMessage(400, "bad_request", "malformed method")
    if not _TARGET.fullmatch(target):
        raise BadMessage(400, "bad_request", "malformed request target")
    req.method = method
    req.version = minor
    abs_host = None
    if target[0] != 47:  # "/"
        if target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
            rest = target[target.find(b"//") + 2:]
            slash = rest.find(b"/")
            abs_host = rest if slash < 0 else rest[:slash]
            target = b"/" if slash < 0 else rest[slash:]
            q = abs_host.find(b"?")
            if q >= 0:
                target = b"/" + abs_host[q:]
                abs_host = abs_host[:q]
            if b"@" in abs_host or not abs_host:
                raise BadMessage(400, "bad_request", "malformed absolute request target")
        elif not (target == b"*" and method == b"OPTIONS"):
            if method == b"CONNECT":
                raise BadMessage(405, "method_not_allowed", "CONNECT is not served")
            raise BadMessage(400, "bad_request", "malformed request target")
    req.target = target
    return abs_host


def _request_semantics(req: Request, kept: list[bytes], hosts: int, abs_host: bytes | None,
                       cl: int, te: list[bytes] | None, conn: list[bytes] | None,
                       upgrade: bytes | None) -> None:
    """What a request's header fields mean together: its host, its body framing, its
    connection and upgrade; the header lines forwarded (``req.lines``)."""
    minor = req.version
    if hosts > 1:
        raise BadMessage(400, "bad_request", "more than one Host header")
    if abs_host is not None:
        if not _HOST.fullmatch(abs_host):
            raise BadMessage(400, "bad_request", "invalid host in request target")
        req.host = abs_host.decode("latin-1")
        req.host_line = b"Host: " + abs_host
    elif hosts == 0:
        if minor == 1:
            raise BadMessage(400, "bad_request", "HTTP/1.1 request without Host")
    elif not req.host and minor == 1:
        raise BadMessage(400, "bad_request", "empty Host")
    if te is not None:
        if cl >= 0:
            raise BadMessage(400, "bad_request", "both Content-Length and Transfer-Encoding")
        if minor == 0:
            raise BadMessage(400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request")
        if not te or te[-1] != b"chunked":
            raise BadMessage(400, "bad_request", "Transfer-Encoding does not end in chunked")
        if len(te) != 1:
            raise BadMessage(501, "not_implemented", "only Transfer-Encoding: chunked is served")
        req.chunked = True
    req.content_length = cl
    if conn is not None:
        if b"close" in conn:
            req.keep_alive = False
        elif minor == 0:
            req.keep_alive = b"keep-alive" in conn
        if upgrade is not None and b"upgrade" in conn:
            req.upgrade = upgrade
        if len(conn) > 1 or conn[0] not in _SIMPLE_CONN:
            kept = _without_hop_by_hop(kept, conn)
    elif minor == 0:
        req.keep_alive = False
    if req.upgrade is not None and req.has_body:
        raise BadMessage(400, "bad_request", "upgrade request with a body")
    req.lines = kept


def valid_request_id(value: bytes) -> bool:
    return _REQUEST_ID.fullmatch(value) is not None


class Response:
    """One parsed response head from a backend (defaults are class attributes)."""

    status = 0
    version = 1
    status_line = b""
    lines: list[bytes] = []
    content_length = -1
    chunked = False
    keep_alive = True
    upgrade: bytes | None = None


def parse_response(head: bytes) -> Response:
    """Parse a backend's response head (without the final CRLFCRLF)."""
    line, block = _split_head(head)
    m = _STATUS_LINE.fullmatch(line)
    if m is None:
        raise BadResponse("malformed status line")
    resp = Response()
    resp.version = 1 if m.group(1) == b"1" else 0
    resp.status = int(m.group(2))
    resp.status_line = b"HTTP/1.1" + line[8:]
    if block and not _HEADER_BLOCK.fullmatch(block):
        raise BadResponse("malformed header field")
    lines = block.split(b"\r\n")
    lines.pop()
    kept = []
    cl = -1
    te: list[bytes] | None = None
    conn: list[bytes] | None = None
    special = RESPONSE_SPECIAL
    for ln in lines:
        colon = ln.find(b":")
        kind = special.get(ln[:colon].lower())
        if kind is None:
            kept.append(ln)
            continue
        if kind == H_DROP:
            continue
        value = ln[colon + 1:].strip(b" \t")
        if kind == H_CL:
            if cl >= 0:
                try:
                    same = int(value) == cl
                except ValueError:
                    same = False
                if not same:
                    raise BadResponse("conflicting Content-Length")
            if not value.isdigit() or len(value) > 18:
                raise BadResponse("invalid Content-Length")
            cl = int(value)
        elif kind == H_TE:
            te = (te or []) + _tokens(value)
        elif kind == H_CONN:
            conn = (conn or []) + _connection_tokens(value)
        elif kind == H_UPGRADE:
            resp.upgrade = value
    if te is not None:
        if not te or te[-1] != b"chunked":
            # not chunked: the body runs until the backend closes (RFC 9112 6.3)
            resp.keep_alive = False
            cl = -1
        elif len(te) == 1:
            resp.chunked = True
            cl = -1
        else:
            raise BadResponse("unsupported Transfer-Encoding")
    resp.content_length = cl
    if conn is not None:
        if b"close" in conn:
            resp.keep_alive = False
        elif resp.version == 0 and b"keep-alive" not in conn:
            resp.keep_alive = False
        if len(conn) > 1 or conn[0] not in _SIMPLE_CONN:
            kept = _without_hop_by_hop(kept, conn)
    elif resp.version == 0:
        resp.keep_alive = False
    resp.lines = kept
    return resp


# ChunkedDecoder states
_SIZE, _DATA, _DATA_CRLF, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    """Incremental strict chunked-body decoder.

    :meth:`feed` calls ``on_data(bytes)`` for each piece of body data and returns
    the bytes that follow the end of the body once it is complete (else ``None``).
    Trailers are read and dropped.  Raises :class:`BadMessage` on bad framing.
    """

    __slots__ = ("on_data", "state", "remaining", "buf", "total", "trailer_bytes")

    def __init__(self, on_data) -> None:  # type: ignore[no-untyped-def]
        self.on_data = on_data
        self.state = _SIZE
        self.remaining = 0
        self.buf = b""
        self.total = 0
        self.trailer_bytes = 0

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def feed(self, data: bytes) -> bytes | None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        pos = 0
        n = len(data)
        while pos < n:
            st = self.state
            if st == _DATA:
                take = min(self.remaining, n - pos)
                if pos == 0 and take == n:
                    self.on_data(data)
                else:
                    self.on_data(data[pos:pos + take])
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = _DATA_CRLF
            elif st == _SIZE:
                nl = data.find(b"\r\n", pos, pos + MAX_CHUNK_LINE + 2)
                if nl < 0:
                    if n - pos > MAX_CHUNK_LINE:
                        raise BadMessage(400, "bad_request", "chunk size line too long")
                    if b"\n" in data[pos:] or (b"\r" in data[pos:n - 1]):
                        raise BadMessage(400, "bad_request", "bad chunk size line")
                    self.buf = data[pos:]
                    return None
                m = _CHUNK_SIZE.fullmatch(data, pos, nl)
                if m is None:
                    raise BadMessage(400, "bad_request", "bad chunk size line")
                size = int(m.group(1), 16)
                pos = nl + 2
                if size == 0:
                    self.state = _TRAILER
                else:
                    self.remaining = size
                    self.total += size
                    self.state = _DATA
            elif st == _DATA_CRLF:
                if n - pos < 2:
                    if data[pos:] != b"\r":
                        raise BadMessage(400, "bad_request", "chunk data not followed by CRLF")
                    self.buf = data[pos:]
                    return None
                if data[pos:pos + 2] != b"\r\n":
                    raise BadMessage(400, "bad_request", "chunk data not followed by CRLF")
                pos += 2
                self.state = _SIZE
            elif st == _TRAILER:
                nl = data.find(b"\r\n", pos)
                if nl < 0:
                    if n - pos > MAX_HEADER_BYTES:
                        raise BadMessage(431, "headers_too_large", "trailers too large")
                    self.buf = data[pos:]
                    return None
                if nl == pos:
                    self.state = _DONE
                    return data[nl + 2:]
                line = data[pos:nl + 2]
                self.trailer_bytes += len(line)
                if self.trailer_bytes > MAX_HEADER_BYTES:
                    raise BadMessage(431, "headers_too_large", "trailers too large")
                if not _HEADER_BLOCK.fullmatch(line):
                    raise BadMessage(400, "bad_request", "malformed trailer field")
                pos = nl + 2
            else:  # _DONE
                return data[pos:]
        if self.state == _DONE:
            return b""
        return None

