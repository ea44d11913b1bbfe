"""Shared PostgreSQL: one role and one database per app on the cluster's server.

Each app gets a role with a random password and a database it owns; ``CONNECT``
on that database is revoked from ``PUBLIC`` and granted to the app's role only,
so an app cannot connect to another app's database.  The admin connection uses
txpostgres (psycopg2 async connections are autocommit, which ``CREATE
DATABASE`` needs).
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

from attrs import frozen
from twisted.logger import Logger

from epio.addons import AddonError, db_identifier

if TYPE_CHECKING:
    from epio.node import INodeReactor

PASSWORD_BYTES = 24


@frozen
class PostgresCredentials:
    """What an app needs to reach its database.  ``url`` holds the password."""

    app: str
    host: str
    port: int
    database: str
    user: str
    password: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literal
        return (
            f"postgresql://{quote(self.user)}:{quote(self.password, safe='')}@"
            f"{host}:{self.port}/{quote(self.database)}"
        )

    def __repr__(self) -> str:  # never print the password
        return f"PostgresCredentials(app={self.app!r}, database={self.database!r}, host={self.host!r})"


def url_fields(url: str) -> dict[str, str]:
    """libpq fields (host, port, user, dbname, password?) of a ``postgresql://`` URL.

    User, password and database are percent-decoded (``PostgresCredentials.url`` and
    :func:`epio.api.addons.addon_url` encode them).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise AddonError(f"not a PostgreSQL URL: {parts.scheme}://…")
    fields = {
        "host": parts.hostname or "127.0.0.1",
        "port": str(parts.port or 5432),
        "user": unquote(parts.username or "") or "postgres",
        "dbname": unquote((parts.path or "/postgres").lstrip("/")) or "postgres",
    }
    if parts.password:
        fields["password"] = unquote(parts.password)
    return fields


def dsn_value(value: str) -> str:
    """One libpq conninfo value: single-quoted, ``\\`` and ``'`` escaped with ``\\``."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def dsn_from_url(url: str) -> str:
    """Turn ``postgresql://user:pass@host:port/db`` into a libpq DSN string."""
    return " ".join(f"{k}={dsn_value(v)}" for k, v in url_fields(url).items())


class SharedPostgres:
    """Provision and drop per-app roles and databases on one PostgreSQL server.

    ``admin_url`` is a superuser (or CREATEROLE+CREATEDB) URL; ``public_host`` and
    ``public_port`` are what apps use to reach the server (defaults: the admin URL's).
    """

    log = Logger()

    def __init__(
        self, reactor: INodeReactor, admin_url: str, public_host: str | None = None,
        public_port: int | None = None,
    ) -> None:
        self.reactor = reactor
        self.admin_url = admin_url
        parts = urlsplit(admin_url)
        self.public_host = public_host or parts.hostname or "127.0.0.1"
        self.public_port = public_port or parts.port or 5432

    async def _connect(self) -> Any:
        from txpostgres import txpostgres

        conn = txpostgres.Connection(reactor=self.reactor)
        try:
            await conn.connect(dsn_from_url(self.admin_url))
        except Exception as e:
            raise AddonError(f"cannot reach the shared PostgreSQL server: {type(e).__name__}") from None
        return conn

    async def exists(self, app: str) -> bool:
        name = db_identifier(app)
        conn = await self._connect()
        try:
            rows = await conn.runQuery("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            return bool(rows)
        finally:
            conn.close()

    async def provision(self, app: str) -> PostgresCredentials:
        """Create the app's role and database (fresh password); idempotent on the role.

        Calling it again for an existing app rotates the password and returns the
        new credentials; the data is untouched.
        """
        name = db_identifier(app)
        password = secrets.token_urlsafe(PASSWORD_BYTES)
        conn = await self._connect()
        try:
            role = await conn.runQuery("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
            verb = "ALTER" if role else "CREATE"
            await conn.runOperation(
                f'{verb} ROLE "{name}" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE '
                f"NOREPLICATION PASSWORD %s",
                (password,),
            )
            db = await conn.runQuery("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if not db:
                await conn.runOperation(f'CREATE DATABASE "{name}" OWNER "{name}"')
            await conn.runOperation(f'REVOKE ALL ON DATABASE "{name}" FROM PUBLIC')
            await conn.runOperation(f'GRANT CONNECT, TEMPORARY ON DATABASE "{name}" TO "{name}"')
        finally:
            conn.close()
        self.log.info("provisioned PostgreSQL database {database} for app {app}", database=name, app=app)
        return PostgresCredentials(app, self.public_host, self.public_port, name, name, password)

    async def deprovision(self, app: str) -> None:
        """Drop the app's database and role (callers take a final backup first)."""
        name = db_identifier(app)
        conn = await self._connect()
        try:
            # the live database and those kept by restores (<db>_pre_<stamp>): every
            # database the app's role owns
            owned = await conn.runQuery(
                "SELECT datname FROM pg_database WHERE datname = %s OR datdba = "
                "(SELECT oid FROM pg_roles WHERE rolname = %s)", (name, name))
            for (db,) in owned:
                await conn.runOperation(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (db,),
                )
                quoted = db.replace('"', '""')
                await conn.runOperation(f'DROP DATABASE IF EXISTS "{quoted}"')
            await conn.runOperation(f'DROP ROLE IF EXISTS "{name}"')
        except Exception as e:
            if isinstance(e, AddonError):
                raise
            self.log.error("dropping the database of {app} failed: {error}", app=app,
                           error=str(e).strip())
            raise AddonError(f"dropping the database of {app} failed: "
                             f"{str(e).strip().splitlines()[0]}") from None
        finally:
            conn.close()
        self.log.info("dropped PostgreSQL database {database} of app {app}", database=name, app=app)
