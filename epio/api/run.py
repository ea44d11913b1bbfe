"""``epio run`` on the api: session endpoints, the websocket bridge, the release phase.

Endpoints (every one app-scoped: the same auth and the same 404 for other users as
the rest of the API -- on the websocket handshake too, since the upgrade is only
answered after :meth:`epio.api.web.Api._dispatch` checked the token and the app):

* ``GET /apps/{app}/run`` with ``Upgrade: websocket`` -- a new interactive session.
  The client's first message is ``{"type": "start", "command": [...], "tty": bool,
  "rows", "cols", "term"}``;
* ``GET /apps/{app}/runs/{number}/attach`` (websocket) -- reattach to a running
  interactive session; first message ``{"type": "attach", "rows", "cols"}``;
* ``POST /apps/{app}/runs`` ``{"command": [...], "detach": true}`` -- a detached
  session (output to the app's log, source ``run.N``);
* ``GET /apps/{app}/runs`` (``?history=true`` for ended ones too), ``GET`` and
  ``DELETE /apps/{app}/runs/{number}``.

Websocket frames.  Client to server: binary = stdin/keystrokes; text JSON
``{"type": "resize", "rows", "cols"}``, ``{"type": "eof"}``, ``{"type": "signal",
"name"}`` (no PTY), ``{"type": "detach"}``.  Server to client: text JSON
``{"type": "session", "number", "id", "node", "tty", "command"}`` first, binary
frames ``<fd byte><data>`` (fd 1 = PTY/stdout, 2 = stderr), then ``{"type":
"exit", "status", "signal", "reason"}`` or ``{"type": "error", "code",
"message"}``; then the server closes.

The api carries a session between the websocket and the runner over the bus
(:class:`Bridge`): output polls acknowledge what was received; the next poll is
sent while a reply is being written, and none is sent while the websocket's
transport is paused (a slow client), so the api holds at most two replies of
``run.chunk_kb`` per session; input events go one request
at a time, in order, and past ``run.input_buffer_kb`` queued the websocket stops
being read.  Keep-alive polls renew the runner's lease while output is paused.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from attrs import frozen
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from epio import domain
from epio.api import errors
from epio.api.control import IRunnerControl
from epio.api.jsonschema import SchemaError, validate
from epio.api.operations import operation, query_int
from epio.api.spec import (
    BOOL,
    INT,
    NO_NUL,
    NULLABLE_INT,
    NULLABLE_NUM,
    NULLABLE_STR,
    SCHEMAS,
    STR,
    array,
    obj,
    ref,
)
from epio.api.state import DEFAULT_SIZE, SIZES, current_release
from epio.config import Config
from epio.store.addons import addon_ports
from epio.store.runs import new_session_id

if TYPE_CHECKING:
    from epio.store.records import App, User

FIRST_MESSAGE_TIMEOUT = 30.0
_log = Logger()
MAX_ARGS = 256

SCHEMAS["RunSession"] = obj({
    "id": STR, "app": STR, "number": INT, "user": NULLABLE_STR, "command": STR,
    "kind": {"type": "string", "enum": list(domain.RUN_KINDS)},
    "tty": BOOL, "node": NULLABLE_STR, "release": NULLABLE_INT,
    "state": {"type": "string", "enum": list(domain.RUN_STATES)},
    "started": {"type": "number"}, "ended": NULLABLE_NUM, "exit_status": NULLABLE_INT,
    "exit_signal": NULLABLE_STR, "reason": NULLABLE_STR,
    "attached": {"type": ["boolean", "null"]},
}, required=["id", "app", "number", "command", "kind", "state", "started"])
# argv: 1-MAX_ARGS non-empty strings without NUL, at least one not blank; the one rule
# for POST /runs and the websocket's first message (check_command)
COMMAND = {"type": "array", "minItems": 1, "maxItems": MAX_ARGS,
           "items": {"type": "string", "minLength": 1, "maxLength": 16384, "pattern": NO_NUL},
           "contains": {"type": "string", "pattern": "\\S"},
           "x-error": f"must be a list of 1-{MAX_ARGS} non-empty strings (argv) without NUL, "
                      "not all blank"}
SCHEMAS["NewRun"] = obj({"command": COMMAND, "detach": BOOL}, required=["command"])


@frozen
class RunApiSettings:
    """The ``run`` section as the api uses it (seconds, bytes)."""

    max_sessions_per_app: int = 5
    lease: float = 30.0
    poll_wait: float = 15.0
    chunk: int = 256 * 1024
    input_buffer: int = 256 * 1024
    runner_timeout: float = 10.0
    release_timeout: float = 600.0
    runner_dead_after: float = 15.0

    @classmethod
    def from_config(cls, config: Config) -> RunApiSettings:
        c = config.settings.run
        return cls(
            max_sessions_per_app=c.max_sessions_per_app, lease=c.lease,
            poll_wait=c.poll_wait, chunk=c.chunk_kb * 1024,
            input_buffer=c.input_buffer_kb * 1024, runner_timeout=c.runner_timeout,
            release_timeout=c.release_timeout,
            runner_dead_after=config.settings.api.runner_dead_after,
        )


def _message(e: BaseException) -> str:
    return getattr(e, "message", None) or str(e) or type(e).__name__


def _command_text(argv: list[str]) -> str:
    import shlex

    return argv[0] if len(argv) == 1 else shlex.join(argv)


def check_command(command: Any) -> list[str]:
    try:
        validate(command, COMMAND, path="command")
    except SchemaError as e:
        raise errors.ValidationFailed(f"{e.path} {e.message}") from None
    if len(_command_text(command)) > 16384:
        raise errors.ValidationFailed("the command is longer than 16 KiB")
    return list(command)


class RunSessions:
    """The api's side of sessions: placement, audit rows, runner requests."""

    log = Logger()

    def __init__(self, store: Any, control: IRunnerControl, clock: IReactorTime, settings: RunApiSettings,
                 log_sink: Any = None,
                 platform_env: Callable[[str], Awaitable[dict[str, str]]] | None = None) -> None:
        self.store = store
        # what every process of an app gets from the platform (hostnames, secret key)
        self.platform_env = platform_env
        self.control = control
        self.clock = clock
        self.settings = settings
        self.log_sink = log_sink

    async def _platform_env(self, app: str) -> dict[str, str]:
        return await self.platform_env(app) if self.platform_env is not None else {}

    # -- runners -----------------------------------------------------------------

    async def _runners(self) -> list[Any]:
        now = self.clock.seconds()
        nodes = [n for n in await self.store.list_nodes(role="runner") if n.control_endpoint]
        return [n for n in nodes if now - n.last_seen < self.settings.runner_dead_after] \
            or nodes

    async def pick_runner(self, app: str) -> Any:
        """A runner where the app runs (its image is there), else the least loaded."""
        runners = await self._runners()
        if not runners:
            raise errors.Unavailable("no runner is registered; start a node with the runner "
                                     "role", code="no_runner")
        instances = await self.store.list_instances()
        mine = {i.node for i in instances if i.app == app and i.state == "healthy"}

        def score(n: Any) -> tuple[int, int, str]:
            return (0 if n.id in mine else 1, sum(1 for i in instances if i.node == n.id), n.id)

        return min(runners, key=score)

    async def endpoint_of(self, node_id: str | None) -> str:
        from epio.store import NotFound

        try:
            node = await self.store.get_node(node_id or "")
        except NotFound:
            raise errors.Unavailable("the runner of this session is gone",
                                     code="runner_gone") from None
        if not node.control_endpoint:
            raise errors.Unavailable("the runner of this session has no control endpoint",
                                     code="runner_gone")
        return str(node.control_endpoint)

    # -- sessions ----------------------------------------------------------------

    async def _limits(self, app: str) -> dict[str, int]:
        formation = await self.store.get_formation(app)
        f = formation.get("web") or next(iter(formation.values()), None)
        size = f.size if f is not None else DEFAULT_SIZE
        extra = dict(f.limits) if f is not None and f.limits else {}
        return {**SIZES.get(size, SIZES[DEFAULT_SIZE]), **extra}

    async def start(self, app: App, user: User, command: list[str], *, tty: bool,
                    detach: bool, rows: int = 24, cols: int = 80, term: str = "xterm",
                    client: str | None = None, kind: str | None = None,
                    source: str | None = None,
                    session_id: str | None = None) -> tuple[Any, str]:
        """Record and start a session; returns (RunRecord, runner endpoint).

        ``kind`` (default ``interactive``/``detached``) is the audit's kind;
        ``source`` the log source of a detached session's output (default
        ``run.N``): the cron runner passes ``cron`` and ``cron.NAME``, and the
        ``session_id`` (:func:`new_session_id`) it stored with its claim first.
        """
        from epio.store.runs import LimitReached, create_run, update_run

        release = await current_release(self.store, app.name)
        if release is None or not release.image:
            raise errors.Conflict(f"{app.name} has no release to run commands in yet: "
                                  "deploy it first", code="no_release")
        await self.reconcile(app.name)
        node = await self.pick_runner(app.name)
        sid = session_id or new_session_id()
        text = _command_text(command)
        try:
            rec = await create_run(self.store, sid, app.name, user=user.name, command=text,
                                   kind=kind or ("detached" if detach else "interactive"),
                                   tty=tty,
                                   node=node.id, release=release.version,
                                   max_live=self.settings.max_sessions_per_app)
        except LimitReached as e:
            raise errors.Conflict(str(e), code="session_limit") from None
        meta = dict(release.meta or {})
        body = {
            "session_id": sid, "app": app.name, "uid": app.uid, "number": rec.number,
            "command": command, "image_digest": release.image, "tty": tty, "detach": detach,
            "release": release.version,
            "env": {**(meta.get("env") or {}), **await self._platform_env(app.name),
                    **release.config},
            "limits": await self._limits(app.name), "rows": rows, "cols": cols,
            "term": term, "user": user.name,
            "addon_ports": await addon_ports(self.store, app.name),  # the fence opens them
        }
        if client is not None:
            body["client"] = client
        if kind is not None:
            body["kind"] = kind
        if source is not None:
            body["source"] = source
        try:
            await self.control.request(node.control_endpoint, "run.start", body,
                                       timeout=self.settings.runner_timeout)
        except Exception as e:
            why = _message(e)
            await update_run(self.store, sid, state="failed", reason=why)
            raise errors.ApiError(f"the runner could not start the command: {why}",
                                  code="run_failed", status=503) from None
        rec = await update_run(self.store, sid, state="running")
        return rec, str(node.control_endpoint)

    async def reconcile(self, app: str) -> dict[str, dict[str, Any]]:
        """Mark live rows whose runner no longer has them ``lost``; return what the
        reachable runners say about the app's sessions (by session id)."""
        from epio.store.runs import list_runs, update_run

        live = await list_runs(self.store, app, live_only=True, limit=None)
        if not live:
            return {}
        seen: dict[str, dict[str, Any]] = {}
        by_node: dict[str | None, list[Any]] = {}
        for r in live:
            by_node.setdefault(r.node, []).append(r)
        now = self.clock.seconds()
        nodes = {n.id: n for n in await self.store.list_nodes()}
        for node_id, recs in by_node.items():
            node = nodes.get(node_id or "")
            reply = None
            if node is not None and node.control_endpoint:
                try:
                    reply = await self.control.request(node.control_endpoint, "run.list",
                                                       {"app": app},
                                                       timeout=self.settings.runner_timeout)
                except Exception as e:
                    self.log.info("runner {node} does not answer run.list: {error}",
                                  node=node_id, error=_message(e))
            if reply is None:
                gone = node is None or now - node.last_seen > self.settings.runner_dead_after
                if gone:
                    for r in recs:
                        await update_run(self.store, r.id, state="lost",
                                         reason=f"its runner {node_id} is gone")
                continue
            known = {s["session_id"]: s for s in reply.get("sessions", [])
                     if isinstance(s, dict) and "session_id" in s}
            for r in recs:
                s = known.get(r.id)
                if s is None:
                    if now - r.started > self.settings.runner_timeout:
                        await update_run(self.store, r.id, state="lost",
                                         reason=f"runner {node_id} no longer has it")
                else:
                    seen[r.id] = s
        return seen

    async def describe(self, app: str, history: bool, limit: int) -> list[dict[str, Any]]:
        from epio.store.runs import list_runs

        live = await self.reconcile(app)
        out = []
        for r in await list_runs(self.store, app, live_only=not history, limit=limit):
            d = r.to_json()
            info = live.get(r.id)
            d["attached"] = bool(info.get("attached")) if info is not None else None
            out.append(d)
        return out

    async def get(self, app: str, number: int) -> Any:
        from epio.store.runs import get_run

        return await get_run(self.store, app, number)

    async def kill(self, app: str, number: int, user: User) -> Any:
        from epio.store.runs import get_run, update_run

        rec = await get_run(self.store, app, number)
        if rec.state not in ("starting", "running"):
            return rec
        try:
            endpoint = await self.endpoint_of(rec.node)
            await self.control.request(endpoint, "run.kill",
                                       {"session_id": rec.id,
                                        "reason": f"stopped by {user.name}"},
                                       timeout=self.settings.runner_timeout)
        except errors.ApiError:
            return await update_run(self.store, rec.id, state="lost",
                                    reason="its runner is gone")
        except Exception as e:
            if getattr(e, "code", None) == "unknown_session":
                return await update_run(self.store, rec.id, state="lost",
                                        reason="its runner no longer has it")
            raise errors.Unavailable(f"the runner did not answer: {_message(e)}",
                                     code="runner_unreachable") from None
        return await get_run(self.store, app, number)


# ------------------------------------------------------------------------ the bridge


class BridgeSink:
    """What a :class:`Bridge` delivers to (the websocket)."""

    def on_output(self, fd: int, data: bytes) -> None: ...
    def on_exit(self, status: int | None, signal: str | None, reason: str | None) -> None: ...
    def on_error(self, code: str, message: str) -> None: ...
    def pause_input(self) -> None: ...
    def resume_input(self) -> None: ...


class Bridge:
    """One attached client of one session: output polls and input events over the bus."""

    log = Logger()

    def __init__(self, control: IRunnerControl, endpoint: str, session_id: str, client: str, clock: IReactorTime,
                 settings: RunApiSettings, sink: Any) -> None:
        self.control = control
        self.endpoint = endpoint
        self.session_id = session_id
        self.client = client
        self.clock = clock
        self.settings = settings
        self.sink = sink
        self.ack = 0
        self.seq = 0
        self.done = False
        self.exited = False
        self.paused = False
        self._resumed: Deferred[None] | None = None
        self.queue: deque[dict[str, Any]] = deque()
        self.queued = 0
        self.input_paused = False
        self._sending = False
        self._keepalive: LoopingCall | None = None
        self.polls = 0
        self.delivered = 0

    def start(self, offset: int, seq: int) -> None:
        self.ack = offset
        self.seq = seq
        d = ensureDeferred(self._poll_loop())
        d.addErrback(lambda f: self.log.failure("run bridge poll loop failed", f))
        self._keepalive = LoopingCall(self._keep_alive)
        self._keepalive.clock = self.clock
        self._keepalive.start(self.settings.lease / 3, now=False).addErrback(
            lambda f: self.log.failure("run bridge keep-alive failed", f))

    # -- output ------------------------------------------------------------------

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        d, self._resumed = self._resumed, None
        if d is not None:
            d.callback(None)

    async def _request(self, type: str, body: dict[str, Any], timeout: float) -> Any:
        return await self.control.request(self.endpoint, type, body, timeout=timeout)

    def _poll(self) -> Deferred[Any]:
        body = {"session_id": self.session_id, "client": self.client, "ack": self.ack,
                "max": self.settings.chunk, "wait": self.settings.poll_wait}
        return ensureDeferred(self._request(
            "run.poll", body, self.settings.poll_wait + self.settings.runner_timeout))

    async def _poll_loop(self) -> None:
        last_ok = self.clock.seconds()
        pending: Deferred[Any] | None = None
        while not self.done:
            if pending is None:
                if self.paused:
                    self._resumed = Deferred()
                    await self._resumed
                    continue
                pending = self._poll()
            try:
                reply = await pending
            except Exception as e:
                pending = None
                if self.done:
                    return
                code = getattr(e, "code", None)
                if code is not None and code != "internal":
                    self._fail(code, _message(e))
                    return
                if self.clock.seconds() - last_ok > self.settings.lease:
                    self._fail("runner_unreachable",
                               f"the runner did not answer for {self.settings.lease:g}s")
                    return
                await deferLater(self.clock, 0.5, lambda: None)
                continue
            pending = None
            last_ok = self.clock.seconds()
            self.polls += 1
            if self.done:
                return
            parts: list[tuple[int, bytes]] = []
            offset = int(reply.get("offset", 0))
            for fd, data in reply.get("chunks", []):
                end = offset + len(data)
                if end > self.ack:
                    parts.append((int(fd), data[max(0, self.ack - offset):]))
                    self.ack = end
                offset = end
            exited = bool(reply.get("exited"))
            if not exited and not self.paused:
                # the next reply travels while this one is written: at most two chunks
                # of this session are ever held here
                pending = self._poll()
            for fd, part in parts:
                self.delivered += len(part)
                self.sink.on_output(fd, part)
            if exited:
                self.exited = True
                self.done = True
                self._stop_keepalive()
                # a last acknowledgement lets the runner forget the session now
                d = ensureDeferred(self._request(
                    "run.poll", {"session_id": self.session_id, "client": self.client,
                                 "ack": self.ack, "max": 0}, self.settings.runner_timeout))
                d.addErrback(lambda f: None)
                self.sink.on_exit(reply.get("status"), reply.get("signal"), reply.get("reason"))
                return

    def _keep_alive(self) -> None:
        """While output is paused no poll renews the runner's lease: this one does."""
        if self.done or not self.paused:
            return
        d = ensureDeferred(self._request(
            "run.poll", {"session_id": self.session_id, "client": self.client, "ack": self.ack,
                         "max": 0}, self.settings.runner_timeout))
        d.addErrback(lambda f: None)

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()

    def _fail(self, code: str, message: str) -> None:
        if self.done:
            return
        self.done = True
        self._stop_keepalive()
        self.sink.on_error(code, message)

    # -- input ---------------------------------------------------------------------

    def send(self, **event: Any) -> None:
        """Queue one input event (data, eof, rows+cols, signal); sent in order."""
        if self.done:
            return
        data = event.get("data")
        if data is not None and self.queue and set(self.queue[-1]) == {"data"} \
                and set(event) == {"data"} and len(self.queue[-1]["data"]) < 65536:
            self.queue[-1]["data"] += data
        else:
            self.queue.append(dict(event))
        self.queued += len(data or b"")
        if self.queued > self.settings.input_buffer and not self.input_paused:
            self.input_paused = True
            self.sink.pause_input()
        if not self._sending:
            self._sending = True
            d = ensureDeferred(self._send_loop())
            d.addErrback(lambda f: self.log.failure("run bridge input failed", f))

    async def _send_loop(self) -> None:
        try:
            while self.queue and not self.done:
                event = self.queue.popleft()
                body = {"session_id": self.session_id, "client": self.client, "seq": self.seq,
                        **event}
                started = self.clock.seconds()
                while True:
                    try:
                        await self._request("run.input", body, self.settings.runner_timeout)
                        break
                    except Exception as e:
                        code = getattr(e, "code", None)
                        if self.done:
                            return
                        if code is not None and code != "internal":
                            self._fail(code, _message(e))
                            return
                        if self.clock.seconds() - started > self.settings.lease:
                            self._fail("runner_unreachable", "the runner did not take input "
                                       f"for {self.settings.lease:g}s")
                            return
                self.seq += 1
                self.queued -= len(event.get("data") or b"")
                if self.input_paused and self.queued <= self.settings.input_buffer // 2:
                    self.input_paused = False
                    self.sink.resume_input()
        finally:
            self._sending = False

    def close(self) -> None:
        """The client went away: tell the runner (unless the command ended)."""
        was_done = self.done
        self.done = True
        self._stop_keepalive()
        self.resume()
        if self.exited or was_done:
            return
        d = ensureDeferred(self._request("run.detach", {"session_id": self.session_id,
                                                        "client": self.client},
                                         self.settings.runner_timeout))
        d.addErrback(lambda f: self.log.info("run.detach of {id} failed: {error}",
                                             id=self.session_id, error=f.getErrorMessage()))


# ------------------------------------------------------------------------ websocket


def websocket_resource(sessions: RunSessions, app: App, user: User,
                       number: int | None) -> Any:
    """The websocket resource of one session.  Its classes live in
    :mod:`epio.api.run_ws`: autobahn (about 6 MiB of a node's memory) is imported with
    the first ``epio run`` session, not when the api starts."""
    from epio.api.run_ws import websocket_resource as make

    return make(sessions, app, user, number)


# ------------------------------------------------------------------------ routes


def _sessions(api: RunRoutes) -> RunSessions:
    sessions = api.run
    if sessions is None:
        raise errors.Unavailable("the api is starting; try again in a moment", code="starting")
    return sessions


def _number(text: str) -> int:
    t = text[4:] if text.startswith("run.") else text
    if not re.fullmatch(r"[0-9]{1,9}", t) or int(t) < 1:
        raise errors.NotFound(f"no session {text!r}")
    return int(t)


def _upgrade(request: IRequest) -> bool:
    return (request.getHeader(b"upgrade") or b"").lower() == b"websocket"


# ------------------------------------------------------------------------ release phase


async def release_phase(deployer: Any, app: App, deploy: Any, runner: Any, digest: str,
                        manifest: dict[str, Any]) -> Any:
    """Run the manifest's ``[release] command`` once, before the new release exists.

    Runs detached (output to the app's log, source ``release``) on the runner that
    built the image; a non-zero exit (or a timeout) raises the deployer's
    ``DeployFailed``, so no release is made and the current one keeps serving.
    Returns the (updated) deploy.
    """
    from epio.api.deploys import DeployFailed
    from epio.store.runs import create_run, update_run

    command = manifest.get("release_command")
    if not command:
        return deploy
    sessions: RunSessions | None = deployer.run_sessions
    settings = sessions.settings if sessions is not None else RunApiSettings()
    store, control, clock = deployer.store, deployer.control, deployer.clock
    deploy = await deployer._say(deploy, f"Release phase: {command}")
    sid = new_session_id()
    rec = await create_run(store, sid, app.name, user=deploy.created_by, command=str(command),
                           kind="release", tty=False, node=runner.id, release=None)
    formation = await store.get_formation(app.name)
    f = formation.get("web")
    limits = {**SIZES.get(f.size if f else DEFAULT_SIZE, SIZES[DEFAULT_SIZE]),
              **(dict(f.limits) if f and f.limits else {})}
    scheduler = getattr(deployer, "scheduler", None)
    env = {**{str(k): str(v) for k, v in (manifest.get("env") or {}).items()},
           **(await scheduler.platform_env(app.name) if scheduler is not None else {}),
           **await store.get_config(app.name)}
    body = {"session_id": sid, "app": app.name, "uid": app.uid, "number": rec.number,
            "command": [str(command)], "image_digest": digest, "tty": False, "detach": True,
            "env": env, "limits": limits, "user": deploy.created_by or "deploy",
            "kind": "release", "source": "release",
            "addon_ports": await addon_ports(store, app.name)}
    try:
        await control.request(runner.control_endpoint, "run.start", body,
                              timeout=settings.runner_timeout)
    except Exception as e:
        await update_run(store, sid, state="failed", reason=_message(e))
        raise DeployFailed(f"the release command could not start: {_message(e)}") from None
    await update_run(store, sid, state="running")
    deadline = clock.seconds() + settings.release_timeout
    reply: dict[str, Any] = {}
    while True:
        left = deadline - clock.seconds()
        if left <= 0:
            try:
                await control.request(runner.control_endpoint, "run.kill",
                                      {"session_id": sid, "reason": "release_timeout"},
                                      timeout=settings.runner_timeout)
            except Exception as e:  # the deploy fails either way; the runner's lease ends it
                _log.info("run.kill of release command {id} failed: {error}", id=sid,
                          error=str(e) or type(e).__name__)
            raise DeployFailed(f"the release command did not finish within "
                               f"{settings.release_timeout:g}s; "
                               + await _what_keeps_serving(store, app.name))
        try:
            reply = await control.request(runner.control_endpoint, "run.wait",
                                          {"session_id": sid, "timeout": min(left, 20.0)},
                                          timeout=min(left, 20.0) + settings.runner_timeout)
        except Exception as e:
            if getattr(e, "code", None) == "unknown_session":
                raise DeployFailed("the release command's runner lost it (restarted?)") \
                    from None
            await deferLater(clock, 1.0, lambda: None)
            continue
        if reply.get("state") == "exited":
            break
    status, sig = reply.get("status"), reply.get("signal")
    for line in (reply.get("tail") or [])[-10:]:
        deploy = await deployer._say(deploy, f"  release: {line}")
    if status == 0 and not sig:
        return await deployer._say(deploy, "Release phase succeeded")
    how = f"was killed by {sig}" if sig else f"exited with status {status}"
    raise DeployFailed(f"the release command ({command}) {how}; "
                       + await _what_keeps_serving(store, app.name)
                       + " (see `epio logs --source release`)")


async def _what_keeps_serving(store: Any, app: str) -> str:
    """After a failed release phase: which release still serves, or that none does."""
    from epio.api.state import current_release

    current = await current_release(store, app)
    if current is None or current.image is None:
        return "no release was made, and the app has none serving yet"
    return f"no release was made; v{current.version} keeps serving"


class RunRoutes:
    """The ``epio run`` endpoints of :class:`epio.api.web.Api`."""

    run: RunSessions | None  # None while the api is starting (503)

    @operation("GET", "/apps/{app}/run", "runSession",
               "With `Upgrade: websocket`: start an interactive session (epio run); first "
               "message {type: start, command, tty, rows, cols}", response=None, tag="run",
               raw=True)
    async def run_websocket(self, request: IRequest, user: User, app: App) -> Any:
        sessions = _sessions(self)
        if not _upgrade(request):
            raise errors.BadRequest("connect with a websocket (Upgrade: websocket)")
        return websocket_resource(sessions, app, user, None)

    @operation("GET", "/apps/{app}/runs/{number}/attach", "attachRunSession",
               "With `Upgrade: websocket`: reattach to a running interactive session; first "
               "message {type: attach, rows, cols}", response=None, tag="run", raw=True)
    async def attach_websocket(self, request: IRequest, user: User, app: App, number: str) -> Any:
        sessions = _sessions(self)
        n = _number(number)
        if not _upgrade(request):
            raise errors.BadRequest("connect with a websocket (Upgrade: websocket)")
        await sessions.get(app.name, n)
        return websocket_resource(sessions, app, user, n)

    @operation("GET", "/apps/{app}/runs", "listRunSessions",
               "Running sessions (with history=true, ended ones too: the audit), newest first",
               response=array(ref("RunSession")), tag="run",
               query={"history": {"type": "boolean"},
                      "limit": {"type": "integer", "minimum": 1, "maximum": 500}})
    async def list_runs(self, request: IRequest, user: User, app: App) -> Any:
        values = request.args.get(b"history") or [b""]
        history = values[-1].lower() in (b"1", b"true", b"yes")
        limit = query_int(request, "limit", 50, 1, 500)
        return await _sessions(self).describe(app.name, history, limit)

    @operation("POST", "/apps/{app}/runs", "createRunSession",
               "Run a command detached (its output goes to the app's log, source run.N)",
               request=ref("NewRun"), response=ref("RunSession"), status=201, tag="run")
    async def create_run(self, request: IRequest, user: User, app: App,
                         body: dict[str, Any]) -> Any:
        if not body.get("detach", True):
            raise errors.BadRequest("interactive sessions need the websocket: GET /apps/{app}/run")
        command = check_command(body["command"])
        rec, _ = await _sessions(self).start(app, user, command, tty=False, detach=True)
        return {**rec.to_json(), "attached": None}

    @operation("GET", "/apps/{app}/runs/{number}", "getRunSession", "One session (audit record)",
               response=ref("RunSession"), tag="run")
    async def get_run(self, request: IRequest, user: User, app: App, number: str) -> Any:
        rec = await _sessions(self).get(app.name, _number(number))
        return {**rec.to_json(), "attached": None}

    @operation("DELETE", "/apps/{app}/runs/{number}", "stopRunSession",
               "Stop a session: SIGTERM, then SIGKILL after run.kill_grace",
               response=ref("RunSession"), tag="run")
    async def stop_run(self, request: IRequest, user: User, app: App, number: str) -> Any:
        rec = await _sessions(self).kill(app.name, _number(number), user)
        return {**rec.to_json(), "attached": None}


__all__ = ["Bridge", "BridgeSink", "RunApiSettings", "RunSessions",
           "release_phase", "websocket_resource"]
