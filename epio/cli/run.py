"""``epio run``: management commands on the platform, in a terminal or a pipe.

::

    epio run [--app A] -- python manage.py shell      interactive (PTY when you have a TTY)
    epio run -- 'cat > /data/dump.sql' < dump.sql      no TTY: bytes in, bytes out
    epio run --detach -- python manage.py rebuild      output to the app's log (run.N)
    epio run --list | --history | --attach N | --kill N

With a terminal, stdin is put in raw mode (keystrokes, Ctrl-C included, go to the
command) and restored on exit, whatever happens; window size changes follow.
The CLI exits with the command's exit status (128+N when a signal N ended it).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import struct
import sys
import termios
import time
import tty
from collections.abc import Iterator
from typing import Any

from epio.cli.client import USER_AGENT, Client, CliError, resolve_app
from epio.cli.wsclient import BINARY, TEXT, WebSocket, WebSocketClosed

LOST = 255  # exit status when the connection ended before the command did


def _app(args: argparse.Namespace) -> str:
    return resolve_app(getattr(args, "app", None))


def window_size(fd: int) -> tuple[int, int]:
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return 24, 80
    return (rows or 24), (cols or 80)


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Raw mode on ``fd`` for the duration; the old mode comes back even on errors."""
    old = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, old)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


def _exit_status(msg: dict[str, Any]) -> int:
    status = msg.get("status")
    if isinstance(status, int):
        return status & 0xFF
    sig = msg.get("signal")
    if isinstance(sig, str):
        try:
            return 128 + int(signal.Signals[sig])
        except KeyError:
            return 128
    return 1


class Session:
    """One websocket session: the select loop between the terminal and the API."""

    def __init__(self, ws: WebSocket, interactive: bool, app: str, quiet: bool,
                 announce: bool = True) -> None:
        self.ws = ws
        self.interactive = interactive
        self.app = app
        self.quiet = quiet
        # "Running `CMD` on APP as run.N": off for tools (epio psql) that print nothing
        # of their own on success
        self.announce = announce
        self.number: int | None = None
        self.status: int | None = None
        self.stdin_open = True
        self.stdin_fd = sys.stdin.fileno()
        self.stdout_fd = sys.stdout.fileno()
        self.stderr_fd = sys.stderr.fileno()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.resized = False
        self.raw: contextlib.ExitStack | None = None

    def info(self, text: str) -> None:
        if not self.quiet:
            end = "\r\n" if self.raw is not None else "\n"
            _write_all(self.stderr_fd, (text + end).encode("utf-8", "replace"))

    def _winch(self, signum: int, frame: Any) -> None:
        self.resized = True
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"w")

    def run(self) -> int:
        old_winch = None
        if self.interactive:
            old_winch = signal.signal(signal.SIGWINCH, self._winch)
        try:
            with contextlib.ExitStack() as stack:
                self.raw = None
                stack.callback(self._unraw)
                return self._loop(stack)
        finally:
            if old_winch is not None:
                signal.signal(signal.SIGWINCH, old_winch)
            os.close(self.wake_r)
            os.close(self.wake_w)
            self.ws.close()

    def _unraw(self) -> None:
        if self.raw is not None:
            self.raw.close()
            self.raw = None

    def _loop(self, stack: contextlib.ExitStack) -> int:
        while True:
            watch: list[Any] = [self.ws, self.wake_r]
            if self.stdin_open and self.number is not None:
                watch.append(self.stdin_fd)
            try:
                ready, _, _ = select.select(watch, [], [])
            except InterruptedError:
                continue
            if self.wake_r in ready:
                with contextlib.suppress(OSError):
                    os.read(self.wake_r, 512)
            if self.resized and self.number is not None:
                self.resized = False
                rows, cols = window_size(self.stdin_fd)
                self.ws.send_json({"type": "resize", "rows": rows, "cols": cols})
            if self.ws in ready:
                try:
                    messages = self.ws.receive()
                except WebSocketClosed as e:
                    return self._closed(e)
                for kind, payload in messages:
                    done = self._message(kind, payload)
                    if done is not None:
                        return done
            if self.stdin_fd in ready:
                try:
                    data = os.read(self.stdin_fd, 65536)
                except OSError as e:
                    if e.errno != errno.EIO:
                        raise
                    data = b""
                if data:
                    self.ws.send_binary(data)
                else:
                    self.stdin_open = False
                    self.ws.send_json({"type": "eof"})

    def _message(self, kind: int, payload: bytes) -> int | None:
        if kind == BINARY:
            if payload:
                fd = self.stderr_fd if payload[0] == 2 else self.stdout_fd
                _write_all(fd, payload[1:])
            return None
        if kind != TEXT:
            return None
        try:
            msg = json.loads(payload)
        except ValueError:
            return None
        t = msg.get("type")
        if t == "session":
            self.number = int(msg["number"])
            mode = "attached to a terminal" if msg.get("tty") else "without a terminal"
            if self.announce:
                self.info(f"Running `{msg.get('command')}` on {self.app} as "
                          f"run.{self.number}, {mode} (node {msg.get('node')})")
            if self.interactive and msg.get("tty"):
                raw = contextlib.ExitStack()
                raw.enter_context(raw_terminal(self.stdin_fd))
                self.raw = raw
            return None
        if t == "exit":
            self._unraw()
            status = _exit_status(msg)
            if msg.get("reason") and not self.quiet:
                self.info(f"epio: run.{self.number} stopped: {msg['reason']}")
            return status
        if t == "error":
            self._unraw()
            raise CliError(str(msg.get("message") or msg.get("code") or "session error"))
        return None

    def _closed(self, e: WebSocketClosed) -> int:
        self._unraw()
        if self.number is not None and self.interactive:
            self.info(f"epio: connection lost ({e.reason}); run.{self.number} keeps running "
                      f"for a while: epio run --attach {self.number}")
        else:
            self.info(f"epio: connection lost ({e.reason})")
        return LOST


def _connect(client: Client, path: str) -> WebSocket:
    headers = {"Authorization": f"Bearer {client.token}", "User-Agent": USER_AGENT}
    return WebSocket.connect(client.url(path), headers, timeout=client.timeout)


def cmd_run(args: argparse.Namespace) -> int:
    command = list(args.command or [])
    if command and command[0] == "--":
        command = command[1:]
    client = Client.from_config()
    app = _app(args)
    if args.list or args.history:
        return _list(client, app, history=args.history, as_json=args.json)
    if args.kill is not None:
        rec = client.delete(f"apps/{app}/runs/{_number(args.kill)}")
        if args.json:
            print(json.dumps(rec, indent=2, sort_keys=True))
        else:
            print(f"run.{rec['number']}: {rec['state']}")
        return 0
    interactive = sys.stdin.isatty() and sys.stdout.isatty() and not args.no_tty
    if args.attach is not None:
        if command:
            raise CliError("--attach takes no command")
        ws = _connect(client, f"apps/{app}/runs/{_number(args.attach)}/attach")
        rows, cols = window_size(sys.stdin.fileno()) if interactive else (24, 80)
        ws.send_json({"type": "attach", "rows": rows, "cols": cols})
        return Session(ws, interactive, app, args.quiet).run()
    if not command:
        raise CliError("which command? epio run [--app NAME] -- COMMAND [ARGS...]")
    if args.detach:
        rec = client.post(f"apps/{app}/runs", {"command": command, "detach": True})
        if args.json:
            print(json.dumps(rec, indent=2, sort_keys=True))
        else:
            print(f"Running `{rec['command']}` detached as run.{rec['number']} on {app}; "
                  f"its output: epio logs --app {app} --source run.{rec['number']}")
        return 0
    ws = _connect(client, f"apps/{app}/run")
    rows, cols = window_size(sys.stdin.fileno()) if interactive else (24, 80)
    ws.send_json({"type": "start", "command": command, "tty": interactive, "rows": rows,
                  "cols": cols, "term": os.environ.get("TERM", "xterm")})
    return Session(ws, interactive, app, args.quiet, getattr(args, "announce", True)).run()


def _number(text: str) -> int:
    t = text[4:] if text.startswith("run.") else text
    if not t.isdigit() or int(t) < 1:
        raise CliError(f"a session is a number such as 3 or run.3, not {text!r}")
    return int(t)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _list(client: Client, app: str, history: bool, as_json: bool) -> int:
    runs = client.get(f"apps/{app}/runs", **({"history": "true"} if history else {}))
    if as_json:
        print(json.dumps(runs, indent=2, sort_keys=True))
        return 0
    if not runs:
        print("No sessions." if history else "No running sessions.")
        return 0
    from epio.cli.commands import table

    rows = []
    for r in runs:
        if r.get("exit_signal"):
            end = f"killed by {r['exit_signal']}"
        elif r.get("exit_status") is not None:
            end = f"exit {r['exit_status']}"
        else:
            end = r["state"] if r["state"] not in ("running", "starting") else (
                "attached" if r.get("attached") else "detached" if r["kind"] == "interactive"
                and r.get("attached") is False else r["state"])
        row = [f"run.{r['number']}", r["kind"], r.get("user"), _when(r["started"])]
        if history:
            row += [_when(r.get("ended")), end, r.get("node")]
        else:
            row += [end, r.get("node")]
        rows.append(row + [r["command"][:60]])
    headers = ["SESSION", "KIND", "USER", "STARTED"]
    headers += ["ENDED", "RESULT", "NODE"] if history else ["STATE", "NODE"]
    table(rows, headers + ["COMMAND"])
    return 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "run", parents=[common], help="run a command in the app's environment (epio run -- CMD)",
        description="Run a command on a runner, in the app's sandbox, as the app's user, "
                    "from the current release's image with its environment. With a terminal "
                    "it is interactive (a PTY); without one, stdin and stdout stream as "
                    "bytes. Exits with the command's exit status.")
    p.add_argument("--detach", "-d", action="store_true",
                   help="run in the background; output goes to the app's log (source run.N)")
    p.add_argument("--list", "-l", action="store_true", help="show the running sessions")
    p.add_argument("--history", action="store_true",
                   help="show every session (who, what, where, when, exit status)")
    p.add_argument("--attach", metavar="N", help="reattach to running interactive session N")
    p.add_argument("--kill", metavar="N", help="stop session N (SIGTERM, then SIGKILL)")
    p.add_argument("--no-tty", "-T", action="store_true",
                   help="no PTY even when stdin is a terminal (bytes in, bytes out)")
    p.add_argument("--quiet", "-q", action="store_true", help="no session notices on stderr")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "django", parents=[common], help="run manage.py COMMAND in the app (ep.io's command)",
        description="epio django COMMAND [ARGS...] is epio run -- python manage.py COMMAND "
                    "[ARGS...]: the app's manage.py, run from its directory in the current "
                    "release, interactive on a terminal. Options go before COMMAND.")
    p.add_argument("--detach", "-d", action="store_true",
                   help="run in the background; output goes to the app's log (source run.N)")
    p.add_argument("--no-tty", "-T", action="store_true",
                   help="no PTY even when stdin is a terminal (bytes in, bytes out)")
    p.add_argument("--quiet", "-q", action="store_true", help="no session notices on stderr")
    p.add_argument("command", nargs=argparse.REMAINDER, help="COMMAND [ARGS...] of manage.py")
    p.set_defaults(func=cmd_django)


def cmd_django(args: argparse.Namespace) -> int:
    """``epio django CMD ...`` (ep.io's command) = ``epio run -- python manage.py CMD ...``."""
    command = list(args.command or [])
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise CliError("which manage.py command? epio django [--app NAME] COMMAND [ARGS...] "
                       "(e.g. epio django migrate)")
    args.command = ["python", "manage.py", *command]
    args.list = args.history = False
    args.attach = args.kill = None
    return cmd_run(args)
