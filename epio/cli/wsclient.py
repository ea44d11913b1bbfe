"""A small blocking websocket client (RFC 6455) on the standard library, for the CLI.

The CLI runs no reactor (see :mod:`epio.cli.client`), so ``epio run`` uses this:
one socket, ``select()``-friendly (``fileno``), masked client frames, text and
binary messages, ping/pong and close.  Writes block: a slow terminal slows the
socket, which is exactly the backpressure the server relies on.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import urllib.parse
from typing import Any

from epio.cli.client import CliError

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG, CONT = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0
MAX_MESSAGE = 64 * 1024 * 1024


class WebSocketClosed(Exception):
    """The connection ended (``code``/``reason`` from the close frame, if any)."""

    def __init__(self, code: int | None = None, reason: str = "") -> None:
        super().__init__(reason or "connection closed")
        self.code = code
        self.reason = reason


class WebSocket:
    """One client connection; build it with :meth:`connect`."""

    def __init__(self, sock: socket.socket, leftover: bytes = b"") -> None:
        self.sock = sock
        self.buf = bytearray(leftover)
        self.fragments: list[bytes] = []
        self.fragment_op = 0
        self.closed = False

    @classmethod
    def connect(cls, url: str, headers: dict[str, str], timeout: float = 30.0) -> WebSocket:
        """Open ``url`` (http/https/ws/wss) and upgrade, or raise CliError."""
        parts = urllib.parse.urlsplit(url)
        secure = parts.scheme in ("https", "wss")
        host = parts.hostname or "localhost"
        port = parts.port or (443 if secure else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            if secure:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        except OSError as e:
            raise CliError(f"cannot reach the epio API at {parts.scheme}://{parts.netloc}: "
                           f"{e.strerror or e}") from None
        key = base64.b64encode(os.urandom(16)).decode()
        netloc = f"[{host}]" if ":" in host else host
        if parts.port:
            netloc += f":{parts.port}"
        lines = [f"GET {path} HTTP/1.1", f"Host: {netloc}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        try:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    raise CliError("the API closed the connection during the websocket "
                                   "handshake")
                head += chunk
                if len(head) > 65536:
                    raise CliError("the API's websocket handshake answer is too long")
        except OSError as e:
            raise CliError(f"the epio API did not answer the websocket handshake: "
                           f"{e.strerror or e}") from None
        raw, _, rest = head.partition(b"\r\n\r\n")
        status_line, *header_lines = raw.decode("latin-1").split("\r\n")
        fields = {}
        for line in header_lines:
            k, _, v = line.partition(":")
            fields[k.strip().lower()] = v.strip()
        try:
            status = int(status_line.split()[1])
        except (IndexError, ValueError):
            raise CliError("the API did not answer HTTP to the websocket handshake") from None
        if status != 101:
            body = rest
            chunked = "chunked" in fields.get("transfer-encoding", "").lower()
            length = int(fields.get("content-length", "0") or 0)
            try:
                while (b"\r\n0\r\n" not in body and len(body) < 65536) if chunked \
                        else len(body) < length:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    body += chunk
            except OSError:
                pass
            sock.close()
            raise CliError(_error_text(status, _dechunk(body) if chunked else body))
        accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
        if fields.get("sec-websocket-accept") != accept:
            sock.close()
            raise CliError("the API's websocket handshake answer is invalid")
        sock.settimeout(None)
        return cls(sock, rest)

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- sending -------------------------------------------------------------------

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        header = bytearray([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header.append(0x80 | n)
        elif n < 65536:
            header.append(0x80 | 126)
            header += struct.pack("!H", n)
        else:
            header.append(0x80 | 127)
            header += struct.pack("!Q", n)
        mask = os.urandom(4)
        header += mask
        masked = _mask(payload, mask)
        try:
            self.sock.sendall(bytes(header) + masked)
        except OSError as e:
            self.closed = True
            raise WebSocketClosed(None, f"sending failed: {e.strerror or e}") from None

    def send_text(self, text: str) -> None:
        self._send_frame(TEXT, text.encode("utf-8"))

    def send_json(self, value: Any) -> None:
        self.send_text(json.dumps(value, separators=(",", ":")))

    def send_binary(self, data: bytes) -> None:
        self._send_frame(BINARY, data)

    def close(self, code: int = 1000) -> None:
        if not self.closed:
            try:
                self._send_frame(CLOSE, struct.pack("!H", code))
            except WebSocketClosed:
                pass
            self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    # -- receiving -----------------------------------------------------------------

    def receive(self) -> list[tuple[int, bytes]]:
        """Read what the socket has (one recv) and return complete messages
        ``[(TEXT|BINARY, payload), ...]``; raises WebSocketClosed at the end."""
        if not self._parse_ready():
            try:
                chunk = self.sock.recv(256 * 1024)
            except OSError as e:
                raise WebSocketClosed(None, f"connection lost: {e.strerror or e}") from None
            if not chunk:
                raise WebSocketClosed(None, "the API closed the connection")
            self.buf += chunk
        out: list[tuple[int, bytes]] = []
        while True:
            frame = self._parse()
            if frame is None:
                return out
            fin, opcode, payload = frame
            if opcode == PING:
                self._send_frame(PONG, payload)
            elif opcode == PONG:
                pass
            elif opcode == CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                reason = payload[2:].decode("utf-8", "replace")
                if out:
                    self.buf[:0] = _frame_bytes(CLOSE, payload)  # deliver the rest first
                    return out
                if not self.closed:
                    try:
                        self._send_frame(CLOSE, payload[:2])
                    except WebSocketClosed:
                        pass
                    self.closed = True
                raise WebSocketClosed(code, reason)
            elif opcode == CONT:
                self.fragments.append(payload)
                if fin:
                    out.append((self.fragment_op, b"".join(self.fragments)))
                    self.fragments = []
            elif not fin:
                self.fragment_op = opcode
                self.fragments = [payload]
            else:
                out.append((opcode, payload))

    def _parse_ready(self) -> bool:
        return self._frame_length() is not None

    def _frame_length(self) -> int | None:
        b = self.buf
        if len(b) < 2:
            return None
        n = b[1] & 0x7F
        pos = 2
        if n == 126:
            if len(b) < 4:
                return None
            n = struct.unpack("!H", b[2:4])[0]
            pos = 4
        elif n == 127:
            if len(b) < 10:
                return None
            n = struct.unpack("!Q", b[2:10])[0]
            pos = 10
        if n > MAX_MESSAGE:
            raise WebSocketClosed(None, "the API sent a frame that is too large")
        if b[1] & 0x80:
            pos += 4
        return pos + n if len(b) >= pos + n else None

    def _parse(self) -> tuple[bool, int, bytes] | None:
        total = self._frame_length()
        if total is None:
            return None
        b = self.buf
        fin = bool(b[0] & 0x80)
        opcode = b[0] & 0x0F
        n = b[1] & 0x7F
        pos = 2 + (2 if n == 126 else 8 if n == 127 else 0)
        masked = bool(b[1] & 0x80)
        mask = bytes(b[pos:pos + 4]) if masked else b""
        if masked:
            pos += 4
        payload = bytes(b[pos:total])
        if masked:
            payload = _mask(payload, mask)
        del self.buf[:total]
        return fin, opcode, payload


def _frame_bytes(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    head = bytes([0x80 | opcode, n]) if n < 126 else bytes([0x80 | opcode, 126]) + \
        struct.pack("!H", n)
    return head + payload


def _mask(data: bytes, mask: bytes) -> bytes:
    if not data:
        return b""
    n = len(data)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return out


def _error_text(status: int, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except Exception:
        return f"the API refused the websocket ({status})"
    if status == 401:
        return f"{message}; run `epio login` again"
    return str(message)
