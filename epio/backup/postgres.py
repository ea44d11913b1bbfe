"""PostgreSQL backups: consistent dumps with row counts, verified restores.

A dump and its row counts come from one snapshot: the backup opens a REPEATABLE
READ transaction on the app's database, exports its snapshot, counts the rows of
every table in it and runs ``pg_dump --snapshot`` against the same snapshot, so
verification compares like with like even while the app writes.  Verification
restores the archive into a scratch database and compares the counts; only then
is a backup good.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.logger import Logger

from epio.addons.postgres import dsn_from_url, url_fields
from epio.backup import proc

COUNT_TABLES = """
SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
ORDER BY 1, 2
"""


class BackupFailed(Exception):
    """A dump, verification or restore failed; ``str()`` is safe to show."""

    code = "backup_failed"


class NotReady(BackupFailed):
    """The database does not accept connections yet (starting, loading, in recovery, its
    server being restarted): worth waiting for, unlike other failures."""


def _ping(dsn: str) -> None:
    import psycopg2  # here, not at start: 4.6 MiB a node on SQLite never needs

    conn = psycopg2.connect(dsn, connect_timeout=PING_CONNECT_TIMEOUT)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        conn.close()


PING_CONNECT_TIMEOUT = 10  # seconds (libpq connect_timeout of a readiness probe)
# libpq/server messages of a PostgreSQL that is not accepting connections *yet*
PG_NOT_READY = (
    "the database system is starting up", "the database system is shutting down",
    "the database system is not yet accepting connections",
    "the database system is in recovery mode", "Connection refused",
    "server closed the connection unexpectedly", "timeout expired",
)


def _url_for(admin_url: str, database: str) -> str:
    parts = urlsplit(admin_url)
    return parts._replace(path="/" + database).geturl()


def _pg_env(url: str) -> dict[str, str]:
    """libpq environment for the command-line tools: the password never goes in argv.

    The URL's user, password and database are percent-decoded (environment values
    need no further quoting).
    """
    fields = url_fields(url)
    env = {
        "PGHOST": fields["host"],
        "PGPORT": fields["port"],
        "PGUSER": fields["user"],
        "PGDATABASE": fields["dbname"],
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LC_ALL": "C",
    }
    if "password" in fields:
        env["PGPASSWORD"] = fields["password"]
    return env


def _last_line(data: bytes) -> str:
    lines = [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


class PostgresBackups:
    """Dump, verify and restore app databases on one PostgreSQL server."""

    log = Logger()

    def __init__(self, reactor: Any, admin_url: str, pg_bin: str = "") -> None:
        self.reactor = reactor
        self.admin_url = admin_url
        self.pg_bin = pg_bin

    def _tool(self, name: str) -> str:
        return os.path.join(self.pg_bin, name) if self.pg_bin else f"/usr/bin/{name}"

    async def _connect(self, database: str) -> Any:
        from txpostgres import txpostgres

        conn = txpostgres.Connection(reactor=self.reactor)
        try:
            await conn.connect(dsn_from_url(_url_for(self.admin_url, database)))
        except Exception as e:
            raise BackupFailed(f"cannot connect to database {database}: {type(e).__name__}") from None
        return conn

    async def ping(self, database: str) -> None:
        """Return if ``database`` accepts a connection and a query; :class:`NotReady`
        when its server does not accept connections yet ("the database system is
        starting up", refused), :class:`BackupFailed` for anything else (no such
        database, a refused password): that one will not pass by waiting.  A blocking
        libpq connection in the reactor's thread pool (txpostgres reports a failed
        connection's startup error only to the log)."""
        import psycopg2
        from twisted.internet.threads import deferToThreadPool

        dsn = dsn_from_url(_url_for(self.admin_url, database))
        try:
            await deferToThreadPool(self.reactor, self.reactor.getThreadPool(), _ping, dsn)
        except psycopg2.Error as e:
            why = next((t for t in PG_NOT_READY if t in str(e)), None)
            if why is not None:  # the pattern only: the message may name the server
                raise NotReady(f"database {database} does not accept connections yet "
                               f"({why})") from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BackupFailed(f"cannot connect to database {database}: "
                               f"{first.removeprefix('FATAL:').strip()}") from None

    async def count_rows(self, conn: Any) -> dict[str, int]:
        counts: dict[str, int] = {}
        for schema, table in await conn.runQuery(COUNT_TABLES):
            ident = '"' + schema.replace('"', '""') + '"."' + table.replace('"', '""') + '"'
            rows = await conn.runQuery(f"SELECT count(*) FROM {ident}")
            counts[f"{schema}.{table}"] = int(rows[0][0])
        return counts

    async def _run(self, argv: list[str], url: str) -> tuple[bytes, bytes, int]:
        out, err, code = await proc.run(self.reactor, argv, _pg_env(url))
        return out, err, code

    async def dump(self, database: str, dest: Path) -> dict[str, int]:
        """Dump ``database`` (custom format, compressed) to ``dest``; return row counts."""
        conn = await self._connect(database)
        try:
            await conn.runOperation("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            [(snapshot,)] = await conn.runQuery("SELECT pg_export_snapshot()")
            counts = await self.count_rows(conn)
            url = _url_for(self.admin_url, database)
            _, err, code = await self._run(
                [self._tool("pg_dump"), "--format=custom", "--compress=6", "--no-password",
                 f"--snapshot={snapshot}", f"--file={dest}", database],
                url,
            )
            await conn.runOperation("COMMIT")
        finally:
            conn.close()
        if code != 0:
            raise BackupFailed(f"pg_dump of {database} failed: {_last_line(err)}")
        return counts

    async def _admin(self) -> Any:
        return await self._connect(urlsplit(self.admin_url).path.lstrip("/") or "postgres")

    async def _restore_into(self, archive: Path, database: str, owner: str | None) -> None:
        admin = await self._admin()
        try:
            owner_sql = f' OWNER "{owner}"' if owner else ""
            await admin.runOperation(f'CREATE DATABASE "{database}"{owner_sql}')
        finally:
            admin.close()
        argv = [self._tool("pg_restore"), "--no-password", "--exit-on-error", "--no-acl",
                f"--dbname={database}"]
        if owner:
            argv += ["--no-owner", f"--role={owner}"]
        argv.append(str(archive))
        try:
            _, err, code = await self._run(argv, _url_for(self.admin_url, database))
        except BaseException:  # cancelled (step timeout): no half-restored database left
            await self.drop_database(database)
            raise
        if code != 0:
            await self.drop_database(database)
            raise BackupFailed(f"restore failed: {_last_line(err)}")

    async def drop_database(self, database: str) -> None:
        admin = await self._admin()
        try:
            await admin.runOperation(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (database,),
            )
            await admin.runOperation(f'DROP DATABASE IF EXISTS "{database}"')
        finally:
            admin.close()

    async def verify(self, archive: Path, expected: dict[str, int]) -> None:
        """Restore ``archive`` into a scratch database and compare row counts."""
        scratch = "epio_verify_" + secrets.token_hex(6)
        await self._restore_into(archive, scratch, owner=None)
        try:
            conn = await self._connect(scratch)
            try:
                got = await self.count_rows(conn)
            finally:
                conn.close()
        finally:
            await self.drop_database(scratch)
        if got != expected:
            diff = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
            raise BackupFailed(f"verification failed: row counts differ in {', '.join(diff[:5])}")

    async def restore(self, archive: Path, database: str, owner: str, stamp: str) -> str:
        """Restore ``archive`` as ``database``: into a new database first, then switch.

        The live database is renamed to ``<database>_pre_<stamp>`` (kept for the
        operator), so a bad restore never destroys live data.  Returns that name.
        """
        staging = f"{database}_restore_{stamp}"[:63]
        keep = f"{database}_pre_{stamp}"[:63]
        await self._restore_into(archive, staging, owner=owner)
        admin = await self._admin()
        try:
            exists = await admin.runQuery("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            await admin.runOperation(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname IN (%s, %s)",
                (database, staging),
            )
            if exists:
                await admin.runOperation(f'ALTER DATABASE "{database}" RENAME TO "{keep}"')
                await admin.runOperation(f'REVOKE ALL ON DATABASE "{keep}" FROM PUBLIC')
            await admin.runOperation(f'ALTER DATABASE "{staging}" RENAME TO "{database}"')
            await admin.runOperation(f'REVOKE ALL ON DATABASE "{database}" FROM PUBLIC')
            await admin.runOperation(f'GRANT CONNECT, TEMPORARY ON DATABASE "{database}" TO "{owner}"')
        finally:
            admin.close()
        self.log.info("restored database {database}; previous data kept as {keep}",
                      database=database, keep=keep)
        return keep
