"""PostgreSQL test databases: unique, fresh, and dropped afterwards.

Other areas import these helpers too::

    from tests.store.pg import pg_url_for_test
    url = pg_url_for_test(self)      # in a trial TestCase: fresh schema, dropped at cleanup

* :func:`create_database` / :func:`drop_database` make and drop a whole
  database ``epio_test_<unixtime>_<random>`` through the ``postgres`` database.
* :func:`run_database` is one such database per test run (created on first use,
  dropped at interpreter exit, also when tests failed).
* :func:`pg_url_for_test` gives a test its own empty schema inside the run
  database (much faster than a database per test) and drops it at cleanup; the
  URL carries ``search_path`` so every connection made from it lands in the
  schema.  Advisory locks are per database: use unique lock names.

The server is ``EPIO_TEST_PG_ADMIN`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``).  When it cannot be reached
the tests FAIL with the reason, unless ``EPIO_TEST_SKIP_PG=1`` is set (then they
are skipped) -- a missing server must not look like a green suite.
"""

from __future__ import annotations

import atexit
import os
import secrets
import time
import urllib.parse
from typing import Any

ADMIN_URL = os.environ.get("EPIO_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
PREFIX = "epio_test_"

_run_db: str | None = None
_unavailable: str | None = None


def _connect(url: str) -> Any:
    import psycopg2

    conn = psycopg2.connect(url, connect_timeout=5)
    conn.autocommit = True
    return conn


def with_database(url: str, dbname: str) -> str:
    """``url`` pointing at database ``dbname`` instead."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + dbname))


def with_search_path(url: str, schema: str) -> str:
    """``url`` whose connections use ``schema`` as their search_path."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query)
    query.append(("options", f"-csearch_path={schema}"))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


STALE_AFTER = 3600.0  # a test database this old was leaked by a killed test run


def create_database(prefix: str = PREFIX) -> str:
    """Create a new empty database ``<prefix><unixtime>_<random>``; return its URL.

    Test databases left over (older than an hour) by killed runs are dropped first.
    """
    name = f"{prefix}{int(time.time())}_{secrets.token_hex(4)}"
    conn = _connect(ADMIN_URL)
    try:
        with conn.cursor() as cur:
            _sweep(cur)
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return with_database(ADMIN_URL, name)


def _sweep(cur: Any) -> None:
    cur.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (PREFIX + "%",))
    for (name,) in cur.fetchall():
        stamp = name[len(PREFIX):].split("_", 1)[0]
        if stamp.isdigit() and time.time() - int(stamp) > STALE_AFTER:
            try:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception:
                pass


def drop_database(url: str) -> None:
    """Drop the database of ``url`` (disconnecting its sessions first)."""
    name = urllib.parse.urlsplit(url).path.lstrip("/")
    if not name.startswith(PREFIX):
        raise ValueError(f"refusing to drop {name!r}: not a test database")
    conn = _connect(ADMIN_URL)
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


def unavailable_reason() -> str | None:
    """Why the test server cannot be used (None when it can)."""
    global _unavailable
    if _unavailable is None:
        try:
            _connect(ADMIN_URL).close()
            _unavailable = ""
        except Exception as e:
            _unavailable = f"PostgreSQL at {ADMIN_URL} unavailable: {str(e).strip()}"
    return _unavailable or None


def require_pg(testcase: Any) -> None:
    """Skip (EPIO_TEST_SKIP_PG=1) or fail the test when PostgreSQL is unavailable."""
    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get("EPIO_TEST_SKIP_PG") == "1":
        from twisted.trial.unittest import SkipTest

        raise SkipTest(reason)
    testcase.fail(reason + " (set EPIO_TEST_SKIP_PG=1 to skip PostgreSQL tests)")


def run_database() -> str:
    """The URL of this test run's database (created once, dropped at exit)."""
    global _run_db
    if _run_db is None:
        _run_db = create_database()
        atexit.register(_drop_run_database, _run_db)
    return _run_db


def _drop_run_database(url: str) -> None:
    try:
        drop_database(url)
    except Exception:
        pass


def pg_url_for_test(testcase: Any) -> str:
    """A URL with a fresh, empty schema in the run database, dropped at cleanup."""
    require_pg(testcase)
    db = run_database()
    schema = "t_" + secrets.token_hex(6)
    conn = _connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        conn.close()

    def drop() -> None:
        drop_schema(db, schema)

    testcase.addCleanup(drop)
    return with_search_path(db, schema)


def drop_schema(db: str, schema: str) -> None:
    """Drop ``schema`` in ``db``.  Sessions still holding locks in it (a failed test
    can leave a transaction open while this runs, blocking the reactor) are
    terminated, so cleanup never hangs."""
    import psycopg2

    conn = _connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute("SET lock_timeout = '2s'")
            try:
                cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                return
            except psycopg2.errors.LockNotAvailable:
                pass
            cur.execute(
                "SELECT pg_terminate_backend(l.pid) FROM pg_locks l "
                "JOIN pg_class c ON c.oid = l.relation "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND l.pid <> pg_backend_pid()", (schema,))
            cur.execute("SET lock_timeout = '10s'")
            cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        conn.close()


def fresh_database_for_test(testcase: Any) -> str:
    """A whole new database for one test, dropped at cleanup (slower than a schema)."""
    require_pg(testcase)
    url = create_database()
    testcase.addCleanup(drop_database, url)
    return url
