"""The domain API of the state store: every method is async and SQL-free for callers.

Methods return frozen records (:mod:`epio.store.records`) and raise typed
errors (:mod:`epio.store.errors`): :class:`NotFound`, :class:`Conflict`,
:class:`InvalidName`, :class:`InvalidValue`, :class:`StoreUnavailable`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import attrs
from attrs import frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from epio.config.schema import DEFAULT_UIDS
from epio.domain import (
    DEPLOY_FINAL,
    DEPLOY_INITIAL,
    DEPLOY_STATES,
    DEPLOY_TRANSITIONS,
    HOSTNAME_LABEL,
    HOSTNAME_MAX,
    INSTANCE_STATES,
    MAX_CONFIG_VALUE,
    MAX_EMAIL,
    PROCESS_TYPE,
    app_name_problem,
)
from epio.store.backend import Backend, Transaction
from epio.store.errors import (
    AppQuotaExceeded,
    Conflict,
    HostnameRefused,
    IntegrityError,
    InvalidName,
    InvalidTransition,
    InvalidValue,
    LastAdminToken,
    NotFound,
    RateLimited,
    UidsExhausted,
)
from epio.store.records import (
    PURGING,
    App,
    Deploy,
    Domain,
    Formation,
    Instance,
    NewToken,
    NodeInfo,
    Release,
    TokenInfo,
    User,
)

T = TypeVar("T")

# The names the store accepts, matched whole (re.fullmatch: "$" alone would let a trailing
# newline through).  The API's OpenAPI schemas use these very patterns (epio.api.spec).
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$")
CONFIG_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
EMAIL = re.compile(r"^[^@]*@.*$", re.DOTALL)  # the store's only rule: an "@" (and MAX_EMAIL)
IMAGE_DIGEST = re.compile(r"^(?:sha256:)?[0-9a-f]{64}$")

TOKEN_PREFIX = "epio_"
ADMIN_TOKENS_LOCK = "epio.store.admin_tokens"
APP_UIDS_LOCK = "epio.store.app_uids"

TOKEN_DISPLAY_CHARS = 12


#: serialises add_domain's overlap check with every other add_domain (tx.exclusive)
DOMAINS_LOCK = "epio.store.domains"

#: the reason of the deploys that were running when their app was destroyed
APP_DESTROYED = "app destroyed"

CHANGE_KINDS = ("user", "app", "collaborator", "release", "config", "formation", "instance",
                "domain", "node", "deploy", "certificate", "reported", "resync")


@frozen
class AppLimits:
    """Per-user limits on apps (``api.max_apps_per_user``, ``api.app_changes_*``);
    0 means no limit."""

    max_apps: int = 0
    changes: int = 0
    window: float = 3600.0


@frozen
class Change:
    """A committed change announced by :meth:`Store.subscribe`."""

    kind: str
    app: str | None = None
    id: str | None = None

    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.app is not None:
            out["app"] = self.app
        if self.id is not None:
            out["id"] = self.id
        return out


def hash_token(token: str) -> str:
    """The stored form of an API token: hex sha256 (tokens are 256-bit random)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def validate_app_name(name: Any) -> str:
    """Return ``name`` if it is a valid app name (DNS label, 1-30 chars), else raise."""
    problem = app_name_problem(name)
    if problem is not None or not isinstance(name, str):
        raise InvalidName(problem or "an app name must be a string")
    return name


def normalise_hostname(hostname: Any) -> tuple[str, bool]:
    """Lower-case, strip a trailing dot and validate; return (hostname, wildcard).

    A wildcard is ``*.suffix`` with at least two labels in the suffix.
    """
    if not isinstance(hostname, str):
        raise InvalidName(f"invalid hostname {hostname!r}")
    host = hostname.strip().lower().rstrip(".")
    wildcard = host.startswith("*.")
    labels = host[2:].split(".") if wildcard else host.split(".")
    if (len(host) > HOSTNAME_MAX or not all(HOSTNAME_LABEL.fullmatch(label) for label in labels)
            or (wildcard and len(labels) < 2)):
        raise InvalidName(f"invalid hostname {hostname!r}")
    return host, wildcard


def _check(pattern: re.Pattern[str], what: str, value: Any) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidName(f"invalid {what} {value!r}")
    return value


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _user(row: Mapping[str, Any]) -> User:
    return User(row["id"], row["name"], row["email"], bool(row["is_admin"]), row["created"])


def _token_info(row: Mapping[str, Any]) -> TokenInfo:
    return TokenInfo(row["id"], row["user_id"], row["prefix"], row["description"],
                     row["created"], row["last_used"])


def _app(row: Mapping[str, Any]) -> App:
    return App(row["name"], row["owner_id"], int(row["uid"]), bool(row["maintenance"]),
               row["created"], row["destroyed"], row["purge_after"])


def _release(row: Mapping[str, Any]) -> Release:
    return Release(row["app"], int(row["version"]), row["image"], json.loads(row["config"]),
                   json.loads(row["processes"]), row["description"], row["created"],
                   row["created_by"], json.loads(row["meta"]))


def _formation(row: Mapping[str, Any]) -> Formation:
    return Formation(row["app"], row["process_type"], int(row["quantity"]), row["size"],
                     json.loads(row["limits"]))


def _instance(row: Mapping[str, Any]) -> Instance:
    return Instance(row["id"], row["app"], int(row["release"]), row["process_type"],
                    int(row["number"]), row["node"], row["host"], row["port"], row["state"],
                    row["since"], int(row["restarts"]))


def _domain(row: Mapping[str, Any]) -> Domain:
    return Domain(row["hostname"], row["app"], bool(row["wildcard"]), row["created"])


def _node(row: Mapping[str, Any]) -> NodeInfo:
    return NodeInfo(row["id"], tuple(json.loads(row["roles"])), row["control_endpoint"],
                    row["boot_id"], row["last_seen"], json.loads(row["status"]))


def _deploy(row: Mapping[str, Any]) -> Deploy:
    return Deploy(row["id"], row["app"], row["status"], row["image"], row["release"],
                  row["log"], row["reason"], row["created"], row["finished"],
                  row["created_by"], json.loads(row["meta"]))


class Store:
    """The state store's domain API over one :class:`Backend`.

    Get one from :class:`epio.store.StoreService` (``await
    service.whenReady()``) or :func:`epio.store.open_store`.
    """

    log = Logger()

    def __init__(self, backend: Backend, reactor: IReactorTime) -> None:
        self.backend = backend
        self.reactor = reactor

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.backend.dialect

    # -- the surface the record modules build on (epio.store.addons, runs, cron,
    # epio.certs.records, epio.logs.stats): a transaction, two read shortcuts, the
    # clock and the app check every write into an app's rows makes first.

    def now(self) -> float:
        """The store's clock (the reactor's time), for timestamps written to rows."""
        return float(self.reactor.seconds())

    async def transaction(self, fn: Callable[[Transaction], Awaitable[T]],
                          readonly: bool = False, conflict: str | None = None,
                          change: Iterable[Change] = ()) -> T:
        """Run ``fn(tx)`` in one transaction.  An integrity error becomes
        :class:`Conflict` (``conflict``: its message); each of ``change`` is notified
        to listeners when the transaction commits."""
        changes = list(change)
        body = fn
        if changes:

            async def body(tx: Transaction) -> T:
                result = await fn(tx)
                for c in changes:
                    await tx.notify(c.payload())
                return result

        try:
            return await self.backend.transaction(body, readonly=readonly)
        except IntegrityError as e:
            raise Conflict(conflict or f"conflicting change: {e}") from None

    async def fetch_one(self, sql: str, params: Iterable[Any] = ()) -> dict[str, Any] | None:
        """The first row of one read-only query, or None."""
        async def q(tx: Transaction) -> dict[str, Any] | None:
            return (await tx.execute(sql, tuple(params))).one()

        return await self.transaction(q, readonly=True)

    async def fetch_all(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        """Every row of one read-only query."""
        async def q(tx: Transaction) -> list[dict[str, Any]]:
            return (await tx.execute(sql, tuple(params))).dicts()

        return await self.transaction(q, readonly=True)

    @staticmethod
    async def app_exists(tx: Transaction, app: str, live: bool = False) -> None:
        """``NotFound`` unless the app exists (``live``: and is not destroyed -- every
        write that makes it run or change: a destroyed app is out of sight)."""
        sql = "SELECT 1 FROM apps WHERE name = ?" + (" AND destroyed IS NULL" if live else "")
        if (await tx.execute(sql, (app,))).scalar() is None:
            raise NotFound(f"no app named {app!r}")

    async def close(self) -> None:
        """Close the backend (pending and later calls fail with StoreUnavailable)."""
        await self.backend.close()

    def lock(self, name: str) -> Any:
        """A named :class:`epio.store.locks.Lock` (advisory lock / local file lock)."""
        return self.backend.lock(name)

    async def subscribe(self, callback: Callable[[Change], None]) -> Callable[[], None]:
        """Call ``callback(change)`` after every committed change; returns an unsubscriber.

        Returns once listening (changes committed afterwards are seen).  A
        :class:`Change` names a ``kind`` (:data:`CHANGE_KINDS`), the ``app``
        and/or ``id`` concerned.  ``Change("resync")`` means changes may have
        been missed (the listener reconnected): reload what you cache.
        PostgreSQL: every node's changes (LISTEN/NOTIFY).  SQLite: changes
        made by this process only -- keep a slow periodic reload as well.
        Notifications are hints, not a log: read the store for the facts.
        """

        def deliver(payload: dict[str, Any]) -> None:
            kind = payload.get("kind")
            if isinstance(kind, str):
                callback(Change(kind, payload.get("app"), payload.get("id")))

        return await self.backend.listen(deliver)

    async def announce(self, change: Change) -> None:
        """Notify listeners of ``change`` without writing anything.  Kind ``reported``:
        a runner reports an app's instances in states the store does not show yet
        (a deploy saw them through a nexus), so the scheduler leader folds its
        runners' reports now rather than at its next pass.  A hint, like every
        notification: the facts still come from the runners' own answers."""

        async def nothing(tx: Transaction) -> None:
            return None

        await self.transaction(nothing, change=[change])

    # ------------------------------------------------------------- users

    async def create_user(self, name: str, email: str | None = None,
                          is_admin: bool = False) -> User:
        """Create a user; ``Conflict`` if the name is taken, ``InvalidName`` if malformed."""
        _check(USER_NAME, "user name", name)
        if email is not None and (not isinstance(email, str) or not EMAIL.fullmatch(email)
                                  or len(email) > MAX_EMAIL):
            raise InvalidValue(f"invalid email {email!r}")
        user = User(uuid.uuid4().hex, name, email, bool(is_admin), self.now())

        async def q(tx: Transaction) -> User:
            await tx.execute(
                "INSERT INTO users (id, name, email, is_admin, created) VALUES (?, ?, ?, ?, ?)",
                (user.id, user.name, user.email, user.is_admin, user.created))
            return user

        return await self.transaction(q, conflict=f"a user named {name!r} already exists",
                              change=[Change("user")])

    async def get_user(self, user_id: str) -> User:
        """The user with id ``user_id``; ``NotFound`` otherwise."""
        row = await self.fetch_one("SELECT * FROM users WHERE id = ?", (user_id,))
        if row is None:
            raise NotFound(f"no user with id {user_id!r}")
        return _user(row)

    async def get_user_by_name(self, name: str) -> User:
        """The user named ``name``; ``NotFound`` otherwise."""
        row = await self.fetch_one("SELECT * FROM users WHERE name = ?", (name,))
        if row is None:
            raise NotFound(f"no user named {name!r}")
        return _user(row)

    async def list_users(self) -> list[User]:
        """Every user, by name."""
        return [_user(r) for r in await self.fetch_all("SELECT * FROM users ORDER BY name")]

    async def delete_user(self, user_id: str) -> None:
        """Delete a user and their tokens/collaborations; ``Conflict`` if they own apps."""

        async def q(tx: Transaction) -> None:
            owned = (await tx.execute("SELECT count(*) FROM apps WHERE owner_id = ?",
                                      (user_id,))).scalar()
            if owned:
                raise Conflict(f"the user owns {owned} app(s); delete or transfer them first")
            if not (await tx.execute("DELETE FROM users WHERE id = ?", (user_id,))).rowcount:
                raise NotFound(f"no user with id {user_id!r}")

        await self.transaction(q, change=[Change("user")])

    async def create_token(self, user_id: str, description: str = "") -> NewToken:
        """Issue an API token for a user.

        The plaintext (``result.token``) exists only in the return value: the
        store keeps its sha256 and a short display prefix.
        """
        if not isinstance(description, str) or len(description) > 200:
            raise InvalidValue("token description must be a string of at most 200 characters")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        info = TokenInfo(uuid.uuid4().hex, user_id, token[:TOKEN_DISPLAY_CHARS], description,
                         self.now(), None)

        async def q(tx: Transaction) -> None:
            if (await tx.execute("SELECT 1 FROM users WHERE id = ?", (user_id,))).scalar() is None:
                raise NotFound(f"no user with id {user_id!r}")
            await tx.execute(
                "INSERT INTO api_tokens (id, user_id, token_hash, prefix, description, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (info.id, user_id, hash_token(token), info.prefix, description, info.created))

        await self.transaction(q)
        return NewToken(token, info)

    async def user_for_token(self, token: str) -> User | None:
        """The user a presented API token belongs to, or None (unknown/revoked/malformed).

        The token is looked up by its sha256; the stored hash is compared again
        in constant time.  ``last_used`` is refreshed at most once a minute.
        """
        if not isinstance(token, str) or not token or len(token) > 512:
            return None
        digest = hash_token(token)
        row = await self.fetch_one(
            "SELECT t.id AS token_id, t.token_hash, t.last_used, u.* FROM api_tokens t "
            "JOIN users u ON u.id = t.user_id WHERE t.token_hash = ?", (digest,))
        if row is None or not hmac.compare_digest(row["token_hash"], digest):
            return None
        now = self.now()
        if row["last_used"] is None or now - row["last_used"] > 60:

            async def touch(tx: Transaction) -> None:
                await tx.execute("UPDATE api_tokens SET last_used = ? WHERE id = ?",
                                 (now, row["token_id"]))

            await self.transaction(touch)
        return _user(row)

    async def list_tokens(self, user_id: str) -> list[TokenInfo]:
        """A user's tokens (never the token itself), oldest first."""
        rows = await self.fetch_all(
            "SELECT * FROM api_tokens WHERE user_id = ? ORDER BY created, id", (user_id,))
        return [_token_info(r) for r in rows]

    async def revoke_token(self, token_id: str, user_id: str | None = None) -> None:
        """Delete a token by its id (restricted to ``user_id``'s tokens if given).

        ``LastAdminToken`` if it is the last token of any admin: revoking it
        would leave nobody able to administer the platform through the API
        (``epio-admin token create`` on a node is the way back in then).
        """

        async def q(tx: Transaction) -> None:
            await tx.exclusive(ADMIN_TOKENS_LOCK)  # two revokes cannot both pass the check
            sql = ("SELECT t.user_id, u.is_admin FROM api_tokens t JOIN users u "
                   "ON u.id = t.user_id WHERE t.id = ?")
            params: tuple[Any, ...] = (token_id,)
            if user_id is not None:
                sql += " AND t.user_id = ?"
                params += (user_id,)
            row = (await tx.execute(sql, params)).one()
            if row is None:
                raise NotFound(f"no token with id {token_id!r}")
            if row["is_admin"]:
                others = (await tx.execute(
                    "SELECT count(*) FROM api_tokens t JOIN users u ON u.id = t.user_id "
                    "WHERE u.is_admin AND t.id <> ?", (token_id,))).scalar()
                if not others:
                    raise LastAdminToken(
                        "this is the last admin token; revoking it would lock every admin "
                        "out: create another admin token first (POST /api/v1/tokens)")
            await tx.execute("DELETE FROM api_tokens WHERE id = ?", (token_id,))

        await self.transaction(q)

    # -------------------------------------------------------------- apps

    async def create_app(self, name: str, owner_id: str, *, uids: tuple[int, int] = DEFAULT_UIDS,
                         limits: AppLimits | None = None) -> App:
        """Create an app owned by ``owner_id``, with the lowest free UID of ``uids``
        (``runner.uid_min``, ``runner.uid_max``): a UID is free again once the app that
        had it is gone, for an app of another name (never for one of the same name: a
        runner tells an earlier app's files apart by their owner and the name).

        ``InvalidName`` for a bad name, ``Conflict`` if taken, ``NotFound`` for
        an unknown owner, ``UidsExhausted`` when the range is full;
        ``AppQuotaExceeded`` / ``RateLimited`` when ``limits`` say no.
        """
        validate_app_name(name)
        uid_min, uid_max = uids
        now = self.now()

        async def q(tx: Transaction) -> App:
            await tx.exclusive(APP_UIDS_LOCK)  # one allocation at a time, every node
            if (await tx.execute("SELECT 1 FROM users WHERE id = ?", (owner_id,))).scalar() is None:
                raise NotFound(f"no user with id {owner_id!r}")
            taken = (await tx.execute("SELECT destroyed FROM apps WHERE name = ?",
                                      (name,))).one()
            if taken is not None and taken["destroyed"] is not None:
                raise Conflict(f"an app named {name!r} was destroyed and is kept for its "
                               "grace period: restore it, or purge it first")
            if taken is not None:
                raise Conflict(f"an app named {name!r} already exists")
            if limits is not None:
                await self._check_app_limits(tx, owner_id, limits, now)
            # the lowest UID of the range held by no app and never held by an app of
            # this name: uid_min or one above a UID that is taken for this name
            uid = (await tx.execute(
                "SELECT min(c) FROM (SELECT ? AS c UNION ALL SELECT uid + 1 FROM apps "
                "WHERE uid >= ? AND uid < ? UNION ALL SELECT uid + 1 FROM app_uid_names "
                "WHERE app = ? AND uid >= ? AND uid < ?) cand "
                "WHERE NOT EXISTS (SELECT 1 FROM apps a WHERE a.uid = cand.c) "
                "AND NOT EXISTS (SELECT 1 FROM app_uid_names h "
                "WHERE h.uid = cand.c AND h.app = ?)",
                (uid_min, uid_min, uid_max, name, uid_min, uid_max, name))).scalar()
            if uid is None:
                raise UidsExhausted(
                    f"every app UID from {uid_min} to {uid_max} is taken; the operator can "
                    "widen runner.uid_min/uid_max (docs/apps.md)")
            await tx.execute(
                "INSERT INTO apps (name, owner_id, uid, maintenance, release_seq, created)"
                " VALUES (?, ?, ?, ?, 0, ?)", (name, owner_id, int(uid), False, now))
            await tx.execute("INSERT INTO app_uid_names (uid, app) VALUES (?, ?)",
                             (int(uid), name))
            await self._record_app_change(tx, owner_id, name, "create", now)
            return App(name, owner_id, int(uid), False, now)

        return await self.transaction(q, conflict=f"an app named {name!r} already exists",
                              change=[Change("app", name)])

    async def _check_app_limits(self, tx: Transaction, user_id: str, limits: AppLimits,
                                now: float) -> None:
        """Raise AppQuotaExceeded / RateLimited if ``user_id`` may not add an app now."""
        if limits.max_apps:
            owned = int((await tx.execute("SELECT count(*) FROM apps WHERE owner_id = ?",
                                          (user_id,))).scalar() or 0)
            if owned >= limits.max_apps:
                # destroyed apps count until purged: the first purge frees a place
                first = (await tx.execute(
                    "SELECT min(purge_after) FROM apps WHERE owner_id = ? "
                    "AND destroyed IS NOT NULL", (user_id,))).scalar()
                retry = limits.window if first is None else max(1.0, float(first) - now)
                raise AppQuotaExceeded(
                    f"you have {owned} apps (destroyed ones count until purged), the most "
                    f"one user may have ({limits.max_apps}); destroy and purge one first",
                    retry)
        if limits.changes:
            await tx.execute("DELETE FROM app_changes WHERE user_id = ? AND at <= ?",
                             (user_id, now - limits.window))
            times = [float(r[0]) for r in (await tx.execute(
                "SELECT at FROM app_changes WHERE user_id = ? ORDER BY at", (user_id,))).rows]
            if len(times) >= limits.changes:
                retry = times[len(times) - limits.changes] + limits.window - now
                raise RateLimited(
                    f"too many app creations and deletions: at most {limits.changes} in "
                    f"{limits.window:g} seconds; try again in {math.ceil(retry)} s", retry)

    @staticmethod
    async def _record_app_change(tx: Transaction, user_id: str | None, app: str, kind: str,
                                 now: float) -> None:
        if user_id is not None:
            await tx.execute("INSERT INTO app_changes (user_id, app, kind, at) VALUES (?, ?, ?, ?)",
                             (user_id, app, kind, now))

    async def get_app(self, name: str, destroyed: bool = False) -> App:
        """The app named ``name`` (a destroyed one if ``destroyed``); ``NotFound`` otherwise."""
        row = await self.fetch_one(
            "SELECT * FROM apps WHERE name = ? AND destroyed IS "
            + ("NOT NULL" if destroyed else "NULL"), (name,))
        if row is None:
            raise NotFound(f"no {'destroyed ' if destroyed else ''}app named {name!r}")
        return _app(row)

    async def list_apps(self, for_user: str | None = None, destroyed: bool = False) -> list[App]:
        """Every app (``for_user=None``), or those the user owns or collaborates on, by
        name: the live ones, or (``destroyed``) those destroyed and not yet purged."""
        where = "destroyed IS " + ("NOT NULL" if destroyed else "NULL")
        if for_user is None:
            rows = await self.fetch_all(f"SELECT * FROM apps WHERE {where} ORDER BY name")
        else:
            rows = await self.fetch_all(
                f"SELECT * FROM apps WHERE {where} AND (owner_id = ? OR name IN "
                "(SELECT app FROM app_collaborators WHERE user_id = ?)) ORDER BY name",
                (for_user, for_user))
        return [_app(r) for r in rows]

    async def destroy_app(self, name: str, purge_after: float, by: str | None = None) -> App:
        """Mark a live app destroyed, to be purged at ``purge_after``: it vanishes from
        :meth:`get_app`/:meth:`list_apps` (so from routing and scheduling) but keeps
        its rows, name and UID.  Its instances are forgotten (stop them first)."""
        now = self.now()

        async def q(tx: Transaction) -> App:
            row = (await tx.execute(
                "UPDATE apps SET destroyed = ?, purge_after = ? "
                "WHERE name = ? AND destroyed IS NULL RETURNING *",
                (now, purge_after, name))).one()
            if row is None:
                raise NotFound(f"no app named {name!r}")
            await tx.execute("DELETE FROM instances WHERE app = ?", (name,))
            await self._fail_running_deploys(tx, name, APP_DESTROYED, now)
            await self._record_app_change(tx, by, name, "destroy", now)
            return _app(row)

        return await self.transaction(q, change=[Change("app", name)])

    async def fail_running_deploys(self, app: str, reason: str) -> list[str]:
        """Mark every unfinished deploy of ``app`` failed with ``reason`` (each deployer
        stops at its next step: its next status change is refused); returns their ids."""
        return await self.transaction(lambda tx: self._fail_running_deploys(tx, app, reason,
                                                                    self.now()))

    @staticmethod
    async def _fail_running_deploys(tx: Transaction, app: str, reason: str,
                                    now: float) -> list[str]:
        rows = (await tx.execute(
            "UPDATE deploys SET status = 'failed', reason = ?, finished = ?, "
            "log = log || ? WHERE app = ? AND finished IS NULL RETURNING id",
            (reason, now, f"Deploy failed: {reason}\n", app))).rows
        ids = sorted(str(r[0]) for r in rows)
        for i in ids:
            await tx.notify(Change("deploy", app, i).payload())
        return ids

    async def restore_app(self, name: str) -> App:
        """Bring a destroyed app back (``NotFound`` if there is no such destroyed app,
        ``Conflict`` if a purge has claimed it: :meth:`claim_purge`)."""

        async def q(tx: Transaction) -> App:
            row = (await tx.execute(
                "UPDATE apps SET destroyed = NULL, purge_after = NULL "
                "WHERE name = ? AND destroyed IS NOT NULL "
                "AND (purge_after IS NULL OR purge_after <> ?) RETURNING *",
                (name, PURGING))).one()
            if row is None:
                if (await tx.execute("SELECT 1 FROM apps WHERE name = ? AND destroyed IS NOT "
                                     "NULL", (name,))).scalar() is not None:
                    raise Conflict(f"app {name!r} is being purged; it can no longer be "
                                   "restored")
                raise NotFound(f"no destroyed app named {name!r}")
            return _app(row)

        return await self.transaction(q, change=[Change("app", name)])

    async def claim_purge(self, name: str) -> App:
        """Mark a destroyed app as being purged (``purge_after = PURGING``), atomically,
        before anything of it is dropped: from then on :meth:`restore_app` refuses it.
        A claimed app can be claimed again (a purge that failed half-way resumes).
        ``NotFound`` if there is no such destroyed app (restored meanwhile)."""

        async def q(tx: Transaction) -> App:
            row = (await tx.execute(
                "UPDATE apps SET purge_after = ? WHERE name = ? AND destroyed IS NOT NULL "
                "RETURNING *", (PURGING, name))).one()
            if row is None:
                raise NotFound(f"no destroyed app named {name!r}")
            return _app(row)

        return await self.transaction(q, change=[Change("app", name)])

    async def purge_due(self, now: float) -> list[App]:
        """Destroyed apps whose grace period has ended at ``now``, oldest first."""
        rows = await self.fetch_all(
            "SELECT * FROM apps WHERE destroyed IS NOT NULL AND purge_after <= ? "
            "ORDER BY purge_after, name", (now,))
        return [_app(r) for r in rows]

    async def delete_app(self, name: str, by: str | None = None,
                         destroyed_only: bool = False) -> None:
        """Delete an app (live or destroyed; ``destroyed_only``: only if it is still
        destroyed, else ``NotFound``) and everything of it (releases, config, formation,
        instances, domains, certificates, collaborators, deploys); its UID is free again.

        ``by`` (a user id) is counted in that user's app-change rate; a deletion
        itself is never refused by the rate limit.
        """

        async def q(tx: Transaction) -> None:
            # explicit, not only ON DELETE CASCADE: a certificate must go with its app
            only = " AND destroyed IS NOT NULL" if destroyed_only else ""
            if (await tx.execute(f"SELECT 1 FROM apps WHERE name = ?{only}",
                                 (name,))).scalar() is None:
                raise NotFound(f"no {'destroyed ' if destroyed_only else ''}app named {name!r}")
            await tx.execute("DELETE FROM certificates WHERE app = ?", (name,))
            if not (await tx.execute(f"DELETE FROM apps WHERE name = ?{only}",
                                     (name,))).rowcount:
                raise NotFound(f"no app named {name!r}")
            await self._record_app_change(tx, by, name, "delete", self.now())

        await self.transaction(q, change=[Change("app", name), Change("certificate", name)])

    async def set_maintenance(self, name: str, on: bool) -> App:
        """Switch an app's maintenance mode; return the updated app."""

        async def q(tx: Transaction) -> App:
            row = (await tx.execute("UPDATE apps SET maintenance = ? WHERE name = ? RETURNING *",
                                    (bool(on), name))).one()
            if row is None:
                raise NotFound(f"no app named {name!r}")
            return _app(row)

        return await self.transaction(q, change=[Change("app", name)])

    async def add_collaborator(self, app: str, user_id: str) -> None:
        """Let ``user_id`` manage ``app`` (idempotent; NotFound for unknown app/user)."""

        async def q(tx: Transaction) -> None:
            await self.app_exists(tx, app, live=True)
            if (await tx.execute("SELECT 1 FROM users WHERE id = ?", (user_id,))).scalar() is None:
                raise NotFound(f"no user with id {user_id!r}")
            await tx.execute(
                "INSERT INTO app_collaborators (app, user_id, created) VALUES (?, ?, ?) "
                "ON CONFLICT (app, user_id) DO NOTHING", (app, user_id, self.now()))

        await self.transaction(q, change=[Change("collaborator", app)])

    async def remove_collaborator(self, app: str, user_id: str) -> None:
        """Remove a collaborator; ``NotFound`` if they were not one."""

        async def q(tx: Transaction) -> None:
            res = await tx.execute("DELETE FROM app_collaborators WHERE app = ? AND user_id = ?",
                                   (app, user_id))
            if not res.rowcount:
                raise NotFound(f"user {user_id!r} is not a collaborator of {app!r}")

        await self.transaction(q, change=[Change("collaborator", app)])

    async def list_collaborators(self, app: str) -> list[User]:
        """The collaborators of an app (not including the owner), by name."""

        async def q(tx: Transaction) -> list[User]:
            await self.app_exists(tx, app)
            rows = (await tx.execute(
                "SELECT u.* FROM users u JOIN app_collaborators c ON c.user_id = u.id "
                "WHERE c.app = ? ORDER BY u.name", (app,))).dicts()
            return [_user(r) for r in rows]

        return await self.transaction(q, readonly=True)

    async def can_access(self, app: str, user_id: str) -> bool:
        """True if the user is an admin, the app's owner or a collaborator.

        False for an unknown app or user (never raises NotFound).
        """
        row = await self.fetch_one(
            "SELECT (SELECT is_admin FROM users WHERE id = ?) AS admin, "
            "(SELECT count(*) FROM apps WHERE name = ? AND owner_id = ? "
            "AND destroyed IS NULL) AS owner, "
            "(SELECT count(*) FROM app_collaborators WHERE app = ? AND user_id = ?) AS collab",
            (user_id, app, user_id, app, user_id))
        assert row is not None
        live = await self.fetch_one("SELECT 1 AS x FROM apps WHERE name = ? AND destroyed IS NULL",
                               (app,))
        if live is None:
            return False
        if row["admin"]:
            return True
        return bool(row["owner"] or row["collab"])

    # ---------------------------------------------------------- releases

    async def create_release(self, app: str, image: str | None = None, *,
                             config: Mapping[str, str] | None = None,
                             processes: Mapping[str, str] | None = None,
                             description: str = "", created_by: str | None = None,
                             meta: Mapping[str, Any] | None = None,
                             inherit_image: bool = True) -> Release:
        """Create the app's next release (version = previous + 1, atomically).

        Anything not given is taken in the same transaction: ``config`` from
        the app's current config vars, ``processes`` from the latest release,
        ``image`` from the latest release (unless ``inherit_image=False``).
        So a config change is ``set_config`` + ``create_release(app,
        description=...)``, and a rollback is ``create_release(app,
        old.image, processes=old.processes, config=old.config)``.
        """
        _validate_release(image, processes)
        if config is not None:
            _validate_config(config)
        now = self.now()

        async def q(tx: Transaction) -> Release:
            return await self._insert_release(tx, app, image, config, processes, description,
                                              created_by, meta, inherit_image, now)

        return await self.transaction(q, change=[Change("release", app)])

    async def _insert_release(self, tx: Transaction, app: str, image: str | None,
                              config: Mapping[str, str] | None,
                              processes: Mapping[str, str] | None, description: str,
                              created_by: str | None, meta: Mapping[str, Any] | None,
                              inherit_image: bool, now: float) -> Release:
        version = (await tx.execute(
            "UPDATE apps SET release_seq = release_seq + 1 WHERE name = ? AND destroyed IS NULL "
            "RETURNING release_seq", (app,))).scalar()
        if version is None:
            raise NotFound(f"no app named {app!r}")
        prev = (await tx.execute(
            "SELECT * FROM releases WHERE app = ? ORDER BY version DESC LIMIT 1", (app,))).one()
        img = image
        if img is None and inherit_image and prev is not None:
            img = prev["image"]
        procs = dict(processes) if processes is not None else (
            json.loads(prev["processes"]) if prev is not None else {})
        if config is None:
            rows = (await tx.execute("SELECT key, value FROM config_vars WHERE app = ?",
                                     (app,))).rows
            cfg = {k: v for k, v in rows}
        else:
            cfg = dict(config)
        rel = Release(app, int(version), img, cfg, procs, description, now, created_by,
                      dict(meta or {}))
        await tx.execute(
            "INSERT INTO releases (app, version, image, config, processes, description,"
            " created, created_by, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (app, rel.version, img, _dumps(cfg), _dumps(procs), description, now,
             created_by, _dumps(rel.meta)))
        return rel

    async def get_release(self, app: str, version: int) -> Release:
        """Release ``version`` of ``app``; ``NotFound`` otherwise."""
        if not isinstance(version, int) or isinstance(version, bool):
            raise InvalidValue(f"release version must be an integer, not {version!r}")
        if not 1 <= version < 2**31:
            raise NotFound(f"app {app!r} has no release v{version}")
        row = await self.fetch_one("SELECT * FROM releases WHERE app = ? AND version = ?",
                              (app, version))
        if row is None:
            raise NotFound(f"app {app!r} has no release v{version}")
        return _release(row)

    async def list_releases(self, app: str, limit: int | None = None) -> list[Release]:
        """An app's releases, newest first (at most ``limit``); NotFound for unknown app."""

        async def q(tx: Transaction) -> list[Release]:
            await self.app_exists(tx, app)
            sql = "SELECT * FROM releases WHERE app = ? ORDER BY version DESC"
            params: tuple[Any, ...] = (app,)
            if limit is not None:
                sql += " LIMIT ?"
                params += (int(limit),)
            return [_release(r) for r in (await tx.execute(sql, params)).dicts()]

        return await self.transaction(q, readonly=True)

    async def latest_release(self, app: str) -> Release | None:
        """The app's newest release, or None if it has none (NotFound for unknown app)."""
        releases = await self.list_releases(app, limit=1)
        return releases[0] if releases else None

    # ------------------------------------------------------------ config

    async def get_config(self, app: str) -> dict[str, str]:
        """The app's current config vars (NotFound for an unknown app)."""

        async def q(tx: Transaction) -> dict[str, str]:
            await self.app_exists(tx, app)
            rows = (await tx.execute("SELECT key, value FROM config_vars WHERE app = ? "
                                     "ORDER BY key", (app,))).rows
            return {k: v for k, v in rows}

        return await self.transaction(q, readonly=True)

    async def set_config(self, app: str, values: Mapping[str, str | None]) -> dict[str, str]:
        """Set config vars (a None value unsets that key); return the full new config.

        Keys must be environment-variable names; values strings up to 32 KiB.
        """
        _validate_config(values, allow_none=True)

        async def q(tx: Transaction) -> dict[str, str]:
            await self.app_exists(tx, app, live=True)
            return await self._apply_config(tx, app, values)

        return await self.transaction(q, change=[Change("config", app)])

    @staticmethod
    async def _apply_config(tx: Transaction, app: str,
                            values: Mapping[str, str | None]) -> dict[str, str]:
        for key, value in values.items():
            if value is None:
                await tx.execute("DELETE FROM config_vars WHERE app = ? AND key = ?", (app, key))
            else:
                await tx.execute(
                    "INSERT INTO config_vars (app, key, value) VALUES (?, ?, ?) "
                    "ON CONFLICT (app, key) DO UPDATE SET value = excluded.value",
                    (app, key, value))
        rows = (await tx.execute("SELECT key, value FROM config_vars WHERE app = ? ORDER BY key",
                                 (app,))).rows
        return {k: v for k, v in rows}

    async def set_config_and_release(
        self, app: str, values: Mapping[str, str | None], *, description: str,
        created_by: str | None = None, image: str | None = None,
        processes: Mapping[str, str] | None = None, meta: Mapping[str, Any] | None = None,
        inherit_image: bool = True,
    ) -> tuple[dict[str, str], Release]:
        """Change config vars AND create the release carrying them, in ONE transaction.

        ``values`` as for :meth:`set_config`; the release gets the resulting
        config, and ``image``/``processes``/``meta`` as for
        :meth:`create_release`.  Either both happen or neither (no config
        change without its release).  Returns (new config, new release).
        """
        _validate_config(values, allow_none=True)
        _validate_release(image, processes)
        now = self.now()

        async def q(tx: Transaction) -> tuple[dict[str, str], Release]:
            await self.app_exists(tx, app, live=True)
            config = await self._apply_config(tx, app, values)
            release = await self._insert_release(tx, app, image, config, processes,
                                                 description, created_by, meta,
                                                 inherit_image, now)
            return config, release

        return await self.transaction(q, change=[Change("config", app), Change("release", app)])

    async def unset_config(self, app: str, keys: Iterable[str]) -> dict[str, str]:
        """Remove config vars (missing keys are ignored); return the full new config."""
        return await self.set_config(app, {k: None for k in keys})

    # --------------------------------------------------------- formation

    async def set_formation(self, app: str, process_type: str, quantity: int,
                            size: str | None = None,
                            limits: Mapping[str, Any] | None = None) -> Formation:
        """Set how many instances of a process type the app should run (0..1000).

        ``size``/``limits`` left as None keep their current values.
        """
        _check(PROCESS_TYPE, "process type", process_type)
        if not isinstance(quantity, int) or isinstance(quantity, bool) or not 0 <= quantity <= 1000:
            raise InvalidValue(f"quantity must be an integer 0..1000, not {quantity!r}")

        async def q(tx: Transaction) -> Formation:
            await self.app_exists(tx, app, live=True)
            cur = (await tx.execute("SELECT * FROM formation WHERE app = ? AND process_type = ?",
                                    (app, process_type))).one()
            new_size = size if size is not None else (cur["size"] if cur else "standard")
            new_limits = dict(limits) if limits is not None else (
                json.loads(cur["limits"]) if cur else {})
            await tx.execute(
                "INSERT INTO formation (app, process_type, quantity, size, limits) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (app, process_type) DO UPDATE SET "
                "quantity = excluded.quantity, size = excluded.size, limits = excluded.limits",
                (app, process_type, quantity, new_size, _dumps(new_limits)))
            return Formation(app, process_type, quantity, new_size, new_limits)

        return await self.transaction(q, change=[Change("formation", app)])

    async def get_formation(self, app: str) -> dict[str, Formation]:
        """The app's formation: process type -> Formation (NotFound for unknown app)."""

        async def q(tx: Transaction) -> dict[str, Formation]:
            await self.app_exists(tx, app)
            rows = (await tx.execute("SELECT * FROM formation WHERE app = ? ORDER BY process_type",
                                     (app,))).dicts()
            return {r["process_type"]: _formation(r) for r in rows}

        return await self.transaction(q, readonly=True)

    async def formations_by_app(self, apps: Iterable[str]) -> dict[str, dict[str, Formation]]:
        """:meth:`get_formation` of each of ``apps`` at once (one query per 500 apps)."""
        names = sorted(set(apps))
        out: dict[str, dict[str, Formation]] = {a: {} for a in names}
        for i in range(0, len(names), 500):
            chunk = names[i:i + 500]
            rows = await self.fetch_all(
                f"SELECT * FROM formation WHERE app IN ({', '.join('?' * len(chunk))}) "
                "ORDER BY app, process_type", chunk)
            for r in rows:
                out[r["app"]][r["process_type"]] = _formation(r)
        return out

    async def delete_formation(self, app: str, process_type: str) -> None:
        """Forget a process type's formation entry (no-op if absent)."""

        async def q(tx: Transaction) -> None:
            await tx.execute("DELETE FROM formation WHERE app = ? AND process_type = ?",
                             (app, process_type))

        await self.transaction(q, change=[Change("formation", app)])

    # --------------------------------------------------------- instances

    async def upsert_instance(self, instance: Instance) -> Instance:
        """Insert or replace an instance record (keyed by ``instance.id``)."""
        await self.upsert_instances([instance])
        return instance

    async def upsert_instances(self, instances: Iterable[Instance]) -> None:
        """Insert or replace several instance records in one transaction."""
        batch = sorted(instances, key=lambda i: i.id)  # one lock order: no deadlocks
        for i in batch:
            if i.state not in INSTANCE_STATES:
                raise InvalidValue(f"instance state must be one of {', '.join(INSTANCE_STATES)}")
            _check(PROCESS_TYPE, "process type", i.process_type)

        async def q(tx: Transaction) -> None:
            for app in sorted({i.app for i in batch}):
                await self.app_exists(tx, app)
            for i in batch:
                await tx.execute(
                    "INSERT INTO instances (id, app, release, process_type, number, node, host,"
                    " port, state, since, restarts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET app = excluded.app,"
                    " release = excluded.release, process_type = excluded.process_type,"
                    " number = excluded.number, node = excluded.node, host = excluded.host,"
                    " port = excluded.port, state = excluded.state, since = excluded.since,"
                    " restarts = excluded.restarts",
                    (i.id, i.app, i.release, i.process_type, i.number, i.node, i.host, i.port,
                     i.state, i.since, i.restarts))

        await self.transaction(q, change=[Change("instance", a) for a in sorted({i.app for i in batch})])

    async def get_instance(self, instance_id: str) -> Instance:
        """One instance by id; ``NotFound`` otherwise."""
        row = await self.fetch_one("SELECT * FROM instances WHERE id = ?", (instance_id,))
        if row is None:
            raise NotFound(f"no instance {instance_id!r}")
        return _instance(row)

    async def list_instances(self, app: str | None = None,
                             node: str | None = None) -> list[Instance]:
        """Instances, optionally only of one app and/or on one node."""
        sql = "SELECT * FROM instances WHERE 1 = 1"
        params: list[Any] = []
        if app is not None:
            sql += " AND app = ?"
            params.append(app)
        if node is not None:
            sql += " AND node = ?"
            params.append(node)
        sql += " ORDER BY app, process_type, number, id"
        return [_instance(r) for r in await self.fetch_all(sql, params)]

    async def delete_instance(self, instance_id: str) -> bool:
        """Forget an instance; True if it existed."""

        async def q(tx: Transaction) -> bool:
            app = (await tx.execute("DELETE FROM instances WHERE id = ? RETURNING app",
                                    (instance_id,))).scalar()
            if app is not None:
                await tx.notify(Change("instance", app, instance_id).payload())
            return app is not None

        return await self.transaction(q)

    # ----------------------------------------------------------- domains

    async def add_domain(self, app: str, hostname: str,
                         refused: Callable[[list[str]], bool] | None = None) -> Domain:
        """Route ``hostname`` (or ``*.suffix``) to ``app``; ``Conflict`` if already routed.

        ``refused(others)``, given every hostname held by apps of *other* owners, is
        asked inside the transaction, serialised with every other add_domain on every
        node (:data:`DOMAINS_LOCK`): ``HostnameRefused`` when it says so. So two accounts
        adding overlapping names at once cannot both pass the check.
        """
        host, wildcard = normalise_hostname(hostname)
        now = self.now()

        async def q(tx: Transaction) -> Domain:
            await tx.exclusive(DOMAINS_LOCK)
            await self.app_exists(tx, app, live=True)
            if refused is not None:
                others = [r[0] for r in (await tx.execute(
                    "SELECT d.hostname FROM domains d JOIN apps a ON a.name = d.app "
                    "WHERE a.owner_id <> (SELECT owner_id FROM apps WHERE name = ?)",
                    (app,))).rows]
                if refused(others):
                    raise HostnameRefused(f"hostname {host!r} is refused")
            owner = (await tx.execute("SELECT app FROM domains WHERE hostname = ?",
                                      (host,))).scalar()
            if owner is not None:
                raise Conflict(f"hostname {host!r} is already in use")
            await tx.execute(
                "INSERT INTO domains (hostname, app, wildcard, created) VALUES (?, ?, ?, ?)",
                (host, app, wildcard, now))
            return Domain(host, app, wildcard, now)

        return await self.transaction(q, conflict=f"hostname {host!r} is already in use",
                              change=[Change("domain", app)])

    async def remove_domain(self, app: str, hostname: str) -> None:
        """Stop routing ``hostname`` to ``app``; ``NotFound`` if it was not the app's."""
        host, _ = normalise_hostname(hostname)

        async def q(tx: Transaction) -> None:
            res = await tx.execute("DELETE FROM domains WHERE hostname = ? AND app = ?",
                                   (host, app))
            if not res.rowcount:
                raise NotFound(f"app {app!r} has no domain {host!r}")
            # its certificate (ACME's or the owner's, whose key the owner holds) must
            # never be served to the hostname's next holder (epio.certs.records)
            await tx.execute("DELETE FROM certificates WHERE hostname = ? AND app = ?",
                             (host, app))

        await self.transaction(q, change=[Change("domain", app), Change("certificate", app, host)])

    async def list_domains(self, app: str | None = None) -> list[Domain]:
        """Custom domains of one app (or of all apps), by hostname."""
        if app is None:
            rows = await self.fetch_all("SELECT * FROM domains ORDER BY hostname")
        else:
            rows = await self.fetch_all("SELECT * FROM domains WHERE app = ? ORDER BY hostname",
                                   (app,))
        return [_domain(r) for r in rows]

    async def all_hostnames(self) -> dict[str, str]:
        """Every custom hostname -> app (wildcards as ``*.suffix``), for routing tables.

        App names under the platform domain are not included: the nexus adds
        ``<app>.<domain>`` itself from :meth:`list_apps`.
        """
        rows = await self.fetch_all("SELECT hostname, app FROM domains")
        return {r["hostname"]: r["app"] for r in rows}

    # ------------------------------------------------------------- nodes

    async def upsert_node(self, node_id: str, roles: Iterable[str],
                          control_endpoint: str | None = None, boot_id: str | None = None,
                          status: Mapping[str, Any] | None = None,
                          last_seen: float | None = None) -> NodeInfo:
        """Record a node's heartbeat facts (insert or replace); ``last_seen`` defaults to now."""
        if not isinstance(node_id, str) or not node_id or len(node_id) > 255:
            raise InvalidName(f"invalid node id {node_id!r}")
        info = NodeInfo(node_id, tuple(sorted(roles)), control_endpoint, boot_id,
                        self.now() if last_seen is None else float(last_seen),
                        dict(status or {}))

        async def q(tx: Transaction) -> NodeInfo:
            await tx.execute(
                "INSERT INTO nodes (id, roles, control_endpoint, boot_id, last_seen, status) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET roles = excluded.roles,"
                " control_endpoint = excluded.control_endpoint, boot_id = excluded.boot_id,"
                " last_seen = excluded.last_seen, status = excluded.status",
                (info.id, _dumps(list(info.roles)), info.control_endpoint, info.boot_id,
                 info.last_seen, _dumps(info.status)))
            return info

        return await self.transaction(q, change=[Change("node", None, node_id)])

    async def get_node(self, node_id: str) -> NodeInfo:
        """One node; ``NotFound`` otherwise."""
        row = await self.fetch_one("SELECT * FROM nodes WHERE id = ?", (node_id,))
        if row is None:
            raise NotFound(f"no node {node_id!r}")
        return _node(row)

    async def list_nodes(self, role: str | None = None) -> list[NodeInfo]:
        """Every known node (optionally only those with ``role``), by id."""
        nodes = [_node(r) for r in await self.fetch_all("SELECT * FROM nodes ORDER BY id")]
        if role is not None:
            nodes = [n for n in nodes if role in n.roles]
        return nodes

    async def delete_node(self, node_id: str) -> bool:
        """Forget a node; True if it existed."""

        async def q(tx: Transaction) -> bool:
            return bool((await tx.execute("DELETE FROM nodes WHERE id = ?", (node_id,))).rowcount)

        return await self.transaction(q, change=[Change("node", None, node_id)])

    # ----------------------------------------------------------- deploys

    async def create_deploy(self, app: str, status: str = "pending",
                            created_by: str | None = None,
                            meta: Mapping[str, Any] | None = None) -> Deploy:
        """Start recording a build/deploy of ``app``; returns it with a new id."""
        _check_deploy_status(status)
        if status not in DEPLOY_INITIAL:
            raise InvalidTransition(f"a deploy cannot start {status}")
        d = Deploy(uuid.uuid4().hex, app, status, None, None, "", None, self.now(),
                   None, created_by, dict(meta or {}))

        async def q(tx: Transaction) -> Deploy:
            await self.app_exists(tx, app, live=True)
            await tx.execute(
                "INSERT INTO deploys (id, app, status, log, created, created_by, meta) "
                "VALUES (?, ?, ?, '', ?, ?, ?)",
                (d.id, app, status, d.created, created_by, _dumps(d.meta)))
            return d

        return await self.transaction(q, change=[Change("deploy", app, d.id)])

    async def update_deploy(self, deploy_id: str, *, status: str | None = None,
                            image: str | None = None, release: int | None = None,
                            append_log: str | None = None, reason: str | None = None,
                            meta: Mapping[str, Any] | None = None) -> Deploy:
        """Change a deploy's fields; a final status (succeeded/failed/cancelled) sets
        ``finished``.  ``append_log`` is appended to the log; ``meta`` is merged."""
        if status is not None:
            _check_deploy_status(status)
        now = self.now()

        async def q(tx: Transaction) -> Deploy:
            row = (await tx.execute("SELECT * FROM deploys WHERE id = ?", (deploy_id,))).one()
            if row is None:
                raise NotFound(f"no deploy {deploy_id!r}")
            cur = _deploy(row)
            if status is not None and status != cur.status \
                    and status not in DEPLOY_TRANSITIONS[cur.status]:
                raise InvalidTransition(f"deploy {deploy_id} is {cur.status}: it cannot "
                                        f"become {status}")
            finished = cur.finished
            if status in DEPLOY_FINAL and finished is None:
                finished = now
            new = attrs.evolve(
                cur,
                status=status if status is not None else cur.status,
                image=image if image is not None else cur.image,
                release=release if release is not None else cur.release,
                log=cur.log + (append_log or ""),
                reason=reason if reason is not None else cur.reason,
                meta={**cur.meta, **(meta or {})},
                finished=finished,
            )
            await tx.execute(
                "UPDATE deploys SET status = ?, image = ?, release = ?, log = ?, reason = ?,"
                " meta = ?, finished = ? WHERE id = ?",
                (new.status, new.image, new.release, new.log, new.reason, _dumps(new.meta),
                 new.finished, deploy_id))
            await tx.notify(Change("deploy", cur.app, cur.id).payload())
            return new

        return await self.transaction(q)

    async def get_deploy(self, deploy_id: str) -> Deploy:
        """One deploy by id; ``NotFound`` otherwise."""
        row = await self.fetch_one("SELECT * FROM deploys WHERE id = ?", (deploy_id,))
        if row is None:
            raise NotFound(f"no deploy {deploy_id!r}")
        return _deploy(row)

    async def recent_by_app(self, apps: Iterable[str], limit: int
                            ) -> tuple[dict[str, list[Release]], dict[str, list[Deploy]],
                                       dict[str, list[User]]]:
        """For each of ``apps`` at once (a few queries, however many apps): its newest
        ``limit`` releases and deploys (newest first; deploys without their log) and its
        collaborators (by name) — what :meth:`list_releases`, :meth:`list_deploys` and
        :meth:`list_collaborators` give one app, for a listing of many."""
        names = sorted(set(apps))
        releases: dict[str, list[Release]] = {a: [] for a in names}
        deploys: dict[str, list[Deploy]] = {a: [] for a in names}
        collaborators: dict[str, list[User]] = {a: [] for a in names}
        for i in range(0, len(names), 500):
            chunk = names[i:i + 500]
            marks = ", ".join("?" * len(chunk))

            async def q(tx: Transaction, chunk: list[str] = chunk, marks: str = marks) -> None:
                rows = (await tx.execute(
                    "SELECT * FROM (SELECT r.*, ROW_NUMBER() OVER (PARTITION BY app "
                    "ORDER BY version DESC) AS epio_rank FROM releases r "
                    f"WHERE app IN ({marks})) t WHERE epio_rank <= ? "
                    "ORDER BY app, version DESC", (*chunk, int(limit)))).dicts()
                for r in rows:
                    releases[r["app"]].append(_release(r))
                rows = (await tx.execute(
                    "SELECT * FROM (SELECT d.id, d.app, d.status, d.image, d.release, "
                    "'' AS log, d.reason, d.created, d.finished, d.created_by, d.meta, "
                    "ROW_NUMBER() OVER (PARTITION BY app ORDER BY created DESC, id) "
                    f"AS epio_rank FROM deploys d WHERE app IN ({marks})) t "
                    "WHERE epio_rank <= ? ORDER BY app, created DESC, id",
                    (*chunk, int(limit)))).dicts()
                for r in rows:
                    deploys[r["app"]].append(_deploy(r))
                rows = (await tx.execute(
                    "SELECT c.app AS epio_app, u.* FROM users u JOIN app_collaborators c "
                    f"ON c.user_id = u.id WHERE c.app IN ({marks}) ORDER BY u.name",
                    tuple(chunk))).dicts()
                for r in rows:
                    collaborators[r["epio_app"]].append(_user(r))

            await self.transaction(q, readonly=True)
        return releases, deploys, collaborators

    async def pass_inputs_by_app(self, apps: Iterable[str], window: int
                                 ) -> tuple[dict[str, list[int]], dict[str, list[Deploy]]]:
        """What a scheduler pass reads of each of ``apps`` (a few queries, however many
        apps): the versions of its newest ``window + 1`` releases (newest first; no
        release JSON: :meth:`releases_by_version` reads the ones a caller lacks) and,
        of its newest ``window`` deploys, the failed and unfinished ones (newest first,
        without their log) -- a finished deploy that did not fail tells a pass nothing."""
        names = sorted(set(apps))
        versions: dict[str, list[int]] = {a: [] for a in names}
        deploys: dict[str, list[Deploy]] = {a: [] for a in names}
        final = [s for s in DEPLOY_FINAL if s != "failed"]
        for i in range(0, len(names), 500):
            chunk = names[i:i + 500]
            marks = ", ".join("?" * len(chunk))

            async def q(tx: Transaction, chunk: list[str] = chunk, marks: str = marks) -> None:
                rows = (await tx.execute(
                    "SELECT app, version FROM (SELECT app, version, ROW_NUMBER() OVER "
                    "(PARTITION BY app ORDER BY version DESC) AS epio_rank FROM releases "
                    f"WHERE app IN ({marks})) t WHERE epio_rank <= ? "
                    "ORDER BY app, version DESC", (*chunk, int(window) + 1))).dicts()
                for r in rows:
                    versions[r["app"]].append(int(r["version"]))
                rows = (await tx.execute(
                    "SELECT * FROM (SELECT d.id, d.app, d.status, d.image, d.release, "
                    "'' AS log, d.reason, d.created, d.finished, d.created_by, d.meta, "
                    "ROW_NUMBER() OVER (PARTITION BY app ORDER BY created DESC, id) "
                    f"AS epio_rank FROM deploys d WHERE app IN ({marks})) t "
                    f"WHERE epio_rank <= ? AND status NOT IN ({', '.join('?' * len(final))}) "
                    "ORDER BY app, created DESC, id", (*chunk, int(window), *final))).dicts()
                for r in rows:
                    deploys[r["app"]].append(_deploy(r))

            await self.transaction(q, readonly=True)
        return versions, deploys

    async def releases_by_version(self, wanted: Iterable[tuple[str, int]]
                                  ) -> dict[tuple[str, int], Release]:
        """The releases ``(app, version)`` of ``wanted`` that exist (a few queries)."""
        keys = sorted(set(wanted))
        out: dict[tuple[str, int], Release] = {}
        for i in range(0, len(keys), 250):
            chunk = keys[i:i + 250]
            where = " OR ".join(["(app = ? AND version = ?)"] * len(chunk))
            for r in await self.fetch_all(f"SELECT * FROM releases WHERE {where}",
                                          [x for key in chunk for x in key]):
                out[(r["app"], int(r["version"]))] = _release(r)
        return out

    async def list_deploys(self, app: str, limit: int | None = 50) -> list[Deploy]:
        """An app's deploys, newest first (at most ``limit``)."""
        sql = "SELECT * FROM deploys WHERE app = ? ORDER BY created DESC, id"
        params: tuple[Any, ...] = (app,)
        if limit is not None:
            sql += " LIMIT ?"
            params += (int(limit),)
        return [_deploy(r) for r in await self.fetch_all(sql, params)]


def _validate_config(values: Mapping[str, Any], allow_none: bool = False) -> None:
    if not isinstance(values, Mapping):
        raise InvalidValue("config must be a mapping of names to strings")
    for key, value in values.items():
        _check(CONFIG_KEY, "config var name", key)
        if value is None and allow_none:
            continue
        if not isinstance(value, str):
            raise InvalidValue(f"config var {key} must be a string, not {type(value).__name__}")
        if len(value) > MAX_CONFIG_VALUE or "\x00" in value:
            raise InvalidValue(f"config var {key} is longer than 32 KiB or contains NUL")


def _validate_release(image: Any, processes: Mapping[str, Any] | None) -> None:
    if image is not None and (not isinstance(image, str) or not IMAGE_DIGEST.fullmatch(image)):
        raise InvalidValue(f"invalid image digest {image!r}")
    if processes is not None:
        if not isinstance(processes, Mapping):
            raise InvalidValue("processes must map process types to commands")
        for ptype, cmd in processes.items():
            _check(PROCESS_TYPE, "process type", ptype)
            if not isinstance(cmd, str):
                raise InvalidValue(f"command of process {ptype!r} must be a string")


def _check_deploy_status(status: str) -> None:
    if status not in DEPLOY_STATES:
        raise InvalidValue(f"deploy status must be one of {', '.join(DEPLOY_STATES)}")
