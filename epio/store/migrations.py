"""Versioned schema migrations, shared by SQLite and PostgreSQL.

Rules (see docs/store.md):

* Migrations are applied in version order at start, each in its own
  transaction, and recorded in ``schema_version``.  Running them again changes
  nothing.
* NEVER edit or reorder a migration that has landed: add a new one at the end.
* A statement list is either shared (``statements``) or per dialect
  (``sqlite`` / ``postgresql``).  Shared SQL uses only types both understand:
  TEXT, INTEGER, BIGINT, DOUBLE PRECISION (epoch seconds), BOOLEAN, and JSON
  kept in TEXT columns.
* Several nodes starting at once on PostgreSQL serialise on an advisory
  transaction lock; on SQLite ``BEGIN IMMEDIATE`` does the same.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen
from twisted.logger import Logger

from epio.store.backend import Backend, Transaction
from epio.store.errors import MigrationError

log = Logger()


@frozen
class Migration:
    """One schema step: ``version`` (1, 2, ...), a name, and its statements."""

    version: int
    name: str
    statements: tuple[str, ...] = ()
    sqlite: tuple[str, ...] | None = None
    postgresql: tuple[str, ...] | None = None

    def for_dialect(self, dialect: str) -> tuple[str, ...]:
        specific = getattr(self, dialect, None)
        return self.statements + (specific or ())


FIRST_APP_UID = 20000  # migration 1's counter only: UIDs come from runner.uid_min/uid_max

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", statements=(
        """CREATE TABLE counters (
            name TEXT PRIMARY KEY,
            value BIGINT NOT NULL
        )""",
        f"INSERT INTO counters (name, value) VALUES ('app_uid', {FIRST_APP_UID - 1})",
        """CREATE TABLE users (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            email TEXT,
            is_admin BOOLEAN NOT NULL DEFAULT FALSE,
            created DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE api_tokens (
            id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            token_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            created DOUBLE PRECISION NOT NULL,
            last_used DOUBLE PRECISION
        )""",
        "CREATE INDEX api_tokens_user ON api_tokens (user_id)",
        """CREATE TABLE apps (
            name TEXT PRIMARY KEY,
            owner_id TEXT NOT NULL REFERENCES users(id),
            uid INTEGER NOT NULL UNIQUE,
            maintenance BOOLEAN NOT NULL DEFAULT FALSE,
            release_seq INTEGER NOT NULL DEFAULT 0,
            created DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX apps_owner ON apps (owner_id)",
        """CREATE TABLE app_collaborators (
            app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            created DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (app, user_id)
        )""",
        "CREATE INDEX app_collaborators_user ON app_collaborators (user_id)",
        """CREATE TABLE releases (
            app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
            version INTEGER NOT NULL,
            image TEXT,
            config TEXT NOT NULL,
            processes TEXT NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            created DOUBLE PRECISION NOT NULL,
            created_by TEXT,
            meta TEXT NOT NULL DEFAULT '{}',
            PRIMARY KEY (app, version)
        )""",
        """CREATE TABLE config_vars (
            app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (app, key)
        )""",
        """CREATE TABLE formation (
            app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
            process_type TEXT NOT NULL,
            quantity INTEGER NOT NULL,
            size TEXT NOT NULL DEFAULT 'standard',
            limits TEXT NOT NULL DEFAULT '{}',
            PRIMARY KEY (app, process_type)
        )""",
        """CREATE TABLE nodes (
            id TEXT PRIMARY KEY,
            roles TEXT NOT NULL,
            control_endpoint TEXT,
            boot_id TEXT,
            last_seen DOUBLE PRECISION NOT NULL,
            status TEXT NOT NULL DEFAULT '{}'
        )""",
        """CREATE TABLE instances (
            id TEXT PRIMARY KEY,
            app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
            release INTEGER NOT NULL,
            process_type TEXT NOT NULL,
            number INTEGER NOT NULL,
            node TEXT,
            host TEXT,
            port INTEGER,
            state TEXT NOT NULL,
            since DOUBLE PRECISION NOT NULL,
            restarts INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX instances_app ON instances (app)",
        "CREATE INDEX instances_node ON instances (node)",
        """CREATE TABLE domains (
            hostname TEXT PRIMARY KEY,
            app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
            wildcard BOOLEAN NOT NULL DEFAULT FALSE,
            created DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX domains_app ON domains (app)",
        """CREATE TABLE deploys (
            id TEXT PRIMARY KEY,
            app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
            status TEXT NOT NULL,
            image TEXT,
            release INTEGER,
            log TEXT NOT NULL DEFAULT '',
            reason TEXT,
            created DOUBLE PRECISION NOT NULL,
            finished DOUBLE PRECISION,
            created_by TEXT,
            meta TEXT NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX deploys_app ON deploys (app, created)",
    )),
    Migration(
        2, "releases are immutable (refuse UPDATE)",
        sqlite=(
            """CREATE TRIGGER releases_immutable BEFORE UPDATE ON releases
            BEGIN
                SELECT RAISE(ABORT, 'releases are immutable');
            END""",
        ),
        postgresql=(
            """CREATE FUNCTION epio_releases_immutable() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'releases are immutable';
            END
            $$""",
            """CREATE TRIGGER releases_immutable BEFORE UPDATE ON releases
            FOR EACH ROW EXECUTE FUNCTION epio_releases_immutable()""",
        ),
    ),
    Migration(3, "add-on databases of apps (epio.store.addons)", statements=(
        """CREATE TABLE addons (
            app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
            kind TEXT NOT NULL,
            plan TEXT NOT NULL,
            state TEXT NOT NULL,
            host TEXT,
            port INTEGER,
            database TEXT,
            username TEXT,
            password TEXT,
            node TEXT,
            instance TEXT,
            options TEXT NOT NULL DEFAULT '{}',
            created DOUBLE PRECISION NOT NULL,
            updated DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (app, kind)
        )""",
    )),
    Migration(4, "audit of `epio run` sessions (epio.store.runs)", statements=(
        """CREATE TABLE run_sessions (
            id TEXT PRIMARY KEY,
            app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
            number INTEGER NOT NULL,
            user_name TEXT,
            command TEXT NOT NULL,
            kind TEXT NOT NULL,
            tty BOOLEAN NOT NULL,
            node TEXT,
            release INTEGER,
            state TEXT NOT NULL,
            started DOUBLE PRECISION NOT NULL,
            ended DOUBLE PRECISION,
            exit_status INTEGER,
            exit_signal TEXT,
            reason TEXT,
            UNIQUE (app, number)
        )""",
        "CREATE INDEX run_sessions_app ON run_sessions (app, started)",
    )),
    Migration(5, "app UID reuse, per-user app limits, destroyed apps", statements=(
        # creations and deletions per user, for the rate limit
        """CREATE TABLE app_changes (
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            app TEXT NOT NULL,
            kind TEXT NOT NULL,
            at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX app_changes_user ON app_changes (user_id, at)",
        # every (uid, app name) pair ever allocated: an app is never given a UID an
        # earlier app of its name had (a runner would take that app's files for its own)
        """CREATE TABLE app_uid_names (
            uid INTEGER NOT NULL,
            app TEXT NOT NULL,
            PRIMARY KEY (uid, app)
        )""",
        "INSERT INTO app_uid_names (uid, app) SELECT uid, name FROM apps",
        # a destroyed app keeps its rows (and UID) until purged
        "ALTER TABLE apps ADD COLUMN destroyed DOUBLE PRECISION",
        "ALTER TABLE apps ADD COLUMN purge_after DOUBLE PRECISION",
    )),
    Migration(6, "state of the apps' [cron] entries (epio.store.cron)", statements=(
        """CREATE TABLE cron_jobs (
            app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
            name TEXT NOT NULL,
            last_slot DOUBLE PRECISION NOT NULL,
            session_id TEXT,
            outcome TEXT NOT NULL,
            reason TEXT,
            updated DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (app, name)
        )""",
    )),
    Migration(7, "TLS certificates, ACME challenges and account (epio.certs.records)",
              statements=(
        # one row per hostname: an ACME-issued or an owner's certificate; the private key
        # sealed with a key derived from the cluster secret (epio.certs.crypto)
        """CREATE TABLE certificates (
            hostname TEXT PRIMARY KEY,
            app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
            source TEXT NOT NULL,
            state TEXT NOT NULL,
            cert_pem TEXT,
            key_sealed TEXT,
            not_after DOUBLE PRECISION,
            last_error TEXT,
            failures INTEGER NOT NULL DEFAULT 0,
            next_attempt DOUBLE PRECISION NOT NULL DEFAULT 0,
            updated DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX certificates_app ON certificates (app)",
        # HTTP-01 answers every router serves while an order is pending
        """CREATE TABLE acme_challenges (
            token TEXT PRIMARY KEY,
            hostname TEXT NOT NULL,
            key_authorization TEXT NOT NULL,
            expires DOUBLE PRECISION NOT NULL
        )""",
        # one ACME account per cluster and directory URL
        """CREATE TABLE acme_accounts (
            directory TEXT PRIMARY KEY,
            key_sealed TEXT NOT NULL,
            uri TEXT,
            created DOUBLE PRECISION NOT NULL
        )""",
    )),
    Migration(8, "stats points (epio.store.stats)", statements=(
        # IF NOT EXISTS: before this migration the logger created the table itself in
        # the store's PostgreSQL database; its rows stay where they are.  (With an
        # SQLite store it used a file of its own: epio.store.stats imports that.)
        """CREATE TABLE IF NOT EXISTS epio_stats (
            app TEXT NOT NULL,
            metric TEXT NOT NULL,
            instance TEXT NOT NULL DEFAULT '',
            resolution INTEGER NOT NULL,
            ts BIGINT NOT NULL,
            value DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (app, metric, instance, resolution, ts)
        )""",
        "CREATE INDEX IF NOT EXISTS epio_stats_expiry ON epio_stats (resolution, ts)",
    )),
    Migration(9, "one-time dashboard sign-in codes (epio.store.logins)", statements=(
        """CREATE TABLE login_codes (
            code_hash TEXT PRIMARY KEY,
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            created DOUBLE PRECISION NOT NULL,
            expires DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX login_codes_expires ON login_codes (expires)",
    )),
    Migration(10, "DNS-01 labels and TXT answers, the platform hostname's certificate "
              "(epio.certs.records, epio.certs.dns01)",
              statements=(
        # the name under acme.dns01_zone an app's owner points _acme-challenge.BASE at
        # (a CNAME); random, so a later holder of BASE needs a CNAME of its own
        """CREATE TABLE acme_dns_labels (
            app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
            base TEXT NOT NULL,
            label TEXT NOT NULL UNIQUE,
            created DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (app, base)
        )""",
        # the TXT values every api node's DNS server answers while an order is pending
        """CREATE TABLE acme_dns_txt (
            label TEXT NOT NULL,
            value TEXT NOT NULL,
            expires DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (label, value)
        )""",
        # the platform hostname's certificate (api.hostname, app 'epio', which has no
        # row in apps): the columns of certificates, without its reference to apps
        """CREATE TABLE platform_certificates (
            hostname TEXT PRIMARY KEY,
            app TEXT NOT NULL,
            source TEXT NOT NULL,
            state TEXT NOT NULL,
            cert_pem TEXT,
            key_sealed TEXT,
            not_after DOUBLE PRECISION,
            last_error TEXT,
            failures INTEGER NOT NULL DEFAULT 0,
            next_attempt DOUBLE PRECISION NOT NULL DEFAULT 0,
            updated DOUBLE PRECISION NOT NULL
        )""",
    )),
    Migration(11, "join tokens and the nexus/logger endpoint lists (epio.store.cluster)",
              statements=(
        """CREATE TABLE join_tokens (
            id TEXT PRIMARY KEY,
            token_hash TEXT NOT NULL UNIQUE,
            node_id TEXT NOT NULL,
            sealed TEXT NOT NULL,
            shared TEXT NOT NULL,
            created_by TEXT NOT NULL,
            created DOUBLE PRECISION NOT NULL,
            expires DOUBLE PRECISION NOT NULL,
            used DOUBLE PRECISION,
            used_by TEXT
        )""",
        "CREATE INDEX join_tokens_expires ON join_tokens (expires)",
        """CREATE TABLE cluster_endpoints (
            node_id TEXT NOT NULL,
            role TEXT NOT NULL,
            endpoints TEXT NOT NULL,
            updated DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (node_id, role)
        )""",
    )),
)

SCHEMA_VERSION_DDL = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied DOUBLE PRECISION NOT NULL
)"""

MIGRATION_LOCK = "epio.store.migrations"


def check_migrations(migrations: tuple[Migration, ...]) -> None:
    """Versions must be 1, 2, 3, ... in order (a programming error otherwise)."""
    for i, m in enumerate(migrations, start=1):
        if m.version != i:
            raise MigrationError(f"migration {m.name!r} has version {m.version}, expected {i}")


async def migrate(backend: Backend, now: Any,
                  migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Apply every pending migration; return the versions applied (empty if none).

    ``now`` is a zero-argument callable giving the time (``reactor.seconds``).
    """
    check_migrations(migrations)
    known = {m.version for m in migrations}
    applied: list[int] = []
    while True:

        async def step(tx: Transaction) -> int | None:
            await tx.exclusive(MIGRATION_LOCK)
            await tx.execute(SCHEMA_VERSION_DDL)
            done = {row[0] for row in (await tx.execute("SELECT version FROM schema_version")).rows}
            newer = done - known
            if newer:
                raise MigrationError(
                    f"the database has schema version {max(newer)}, newer than this epio "
                    f"knows ({max(known) if known else 0}); upgrade epio"
                )
            pending = [m for m in migrations if m.version not in done]
            if not pending:
                return None
            m = pending[0]
            for statement in m.for_dialect(tx.dialect):
                await tx.execute(statement)
            await tx.execute("INSERT INTO schema_version (version, name, applied) VALUES (?, ?, ?)",
                             (m.version, m.name, now()))
            return m.version

        version = await backend.transaction(step)
        if version is None:
            return applied
        log.info("store schema migrated to version {version}", version=version)
        applied.append(version)


async def current_version(backend: Backend) -> int:
    """The highest applied schema version (0 for an empty database)."""

    async def read(tx: Transaction) -> int:
        await tx.execute(SCHEMA_VERSION_DDL)
        return int((await tx.execute("SELECT max(version) FROM schema_version")).scalar() or 0)

    return await backend.transaction(read)
