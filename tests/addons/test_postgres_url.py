"""PostgreSQL URLs to libpq: percent-decoded fields, conninfo quoting per libpq's rules."""

from __future__ import annotations

from psycopg2.extensions import parse_dsn
from twisted.trial.unittest import SynchronousTestCase

from epio.addons.postgres import PostgresCredentials, dsn_from_url
from epio.backup.postgres import _pg_env

PASSWORD = "p@ss w'o\\rd%41:/?#"
USER = "app_o'neil\\x"


class PostgresUrlTests(SynchronousTestCase):
    def url(self) -> str:
        return PostgresCredentials("shop", "db.example", 6543, "app_shop", USER, PASSWORD).url

    def test_dsn_decodes_and_escapes(self) -> None:
        """A password and user with @ ' \\ % (percent-encoded in the URL, as the add-on
        code writes it) come out of dsn_from_url exactly, as libpq itself parses it."""
        url = self.url()
        self.assertNotIn("'", url)
        parsed = parse_dsn(dsn_from_url(url))  # libpq's PQconninfoParse
        self.assertEqual(parsed, {"host": "db.example", "port": "6543", "user": USER,
                                  "password": PASSWORD, "dbname": "app_shop"})

    def test_dsn_defaults(self) -> None:
        """A URL without user, password, port or database gets libpq's usual values."""
        self.assertEqual(parse_dsn(dsn_from_url("postgresql://127.0.0.1")),
                         {"host": "127.0.0.1", "port": "5432", "user": "postgres",
                          "dbname": "postgres"})

    def test_pg_env_decodes(self) -> None:
        """The command-line tools' environment holds the decoded user and password."""
        env = _pg_env(self.url())
        self.assertEqual((env["PGUSER"], env["PGPASSWORD"], env["PGHOST"], env["PGPORT"],
                          env["PGDATABASE"]), (USER, PASSWORD, "db.example", "6543", "app_shop"))
        self.assertNotIn("PGPASSWORD", _pg_env("postgresql://postgres@127.0.0.1/x"))
