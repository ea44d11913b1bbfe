"""Shared PostgreSQL add-ons and backups through the real API and CLI of a real node:
provisioning for two apps (each cannot reach the other's database), backup -> damage ->
restore, restore into another app, download with checksum, a tampered backup refused,
the 404 rule for other users, and removal with a final backup."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.addons.helpers import ADMIN_URL, AddonNode, db_exists


def connect(url: str, dbname: str | None = None) -> psycopg2.extensions.connection:
    u = urlsplit(url)
    return psycopg2.connect(host=u.hostname, port=u.port, user=u.username,
                            password=u.password, dbname=dbname or u.path.lstrip("/"))


def rows(url: str, sql: str) -> list[tuple]:
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


class SharedPostgresFlowTests(SynchronousTestCase):
    def test_addons_and_backups_through_api_and_cli(self) -> None:
        """The whole add-on/backup flow a user sees, on the machine's PostgreSQL."""
        n = AddonNode(self)
        n.start()
        a, b = "pa" + secrets.token_hex(3), "pb" + secrets.token_hex(3)
        n.create_app(a)
        n.create_app(b)

        # provisioning: DATABASE_URL in a new release; each app only reaches its own db
        _, out, _ = n.epio("addons", "create", "postgres", "--app", a)
        self.assertIn("DATABASE_URL is set", out)
        n.epio("addons", "create", "postgres", "--app", b)
        url_a, url_b = n.config(a)["DATABASE_URL"], n.config(b)["DATABASE_URL"]
        self.assertNotIn(urlsplit(url_a).password, n.node.output())
        [info] = n.json("addons", "list", "--app", a)
        self.assertEqual((info["kind"], info["plan"], info["state"]),
                         ("postgres", "shared", "ready"))
        self.assertNotIn(urlsplit(url_a).password, str(info))
        releases = n.json("releases", "--app", a)
        self.assertIn("DATABASE_URL", releases[0]["config_keys"])
        with connect(url_a) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE notes (id serial primary key, body text)")
            cur.executemany("INSERT INTO notes (body) VALUES (%s)",
                            [(f"note {i}",) for i in range(200)])
        with self.assertRaises(psycopg2.OperationalError) as cm:
            connect(url_a, dbname=urlsplit(url_b).path.lstrip("/"))
        self.assertIn("permission denied", str(cm.exception))
        with self.assertRaises(psycopg2.OperationalError):
            connect(url_b, dbname=urlsplit(url_a).path.lstrip("/"))
        code, _, err = n.epio("addons", "create", "postgres", "--app", a, check=False)
        self.assertEqual(code, 1)
        self.assertIn("already has", err)

        # another user: every add-on/backup path of the app is a 404
        _, made, _ = n.api("POST", "users", body={"name": "mallory"})
        other = made["token"]
        for method, path, body in [
                ("GET", f"apps/{a}/addons", None), ("GET", f"apps/{a}/addons/postgres", None),
                ("DELETE", f"apps/{a}/addons/postgres", None), ("GET", f"apps/{a}/backups", None),
                ("POST", f"apps/{a}/backups", {}),
                ("POST", f"apps/{a}/backups/x/restore", {}),
                ("GET", f"apps/{a}/backups/x/download", None)]:
            status, answer, _ = n.api(method, path, token=other, body=body)
            self.assertEqual((status, answer["error"]["code"]), (404, "not_found"), path)

        # backup -> damage -> restore: identical data; the previous data kept aside
        [made] = n.json("backups", "create", "--app", a)
        self.assertEqual(made["status"], "verified")
        self.assertEqual(made["counts"], {"public.notes": 200})
        before = rows(url_a, "SELECT id, body FROM notes ORDER BY id")
        with connect(url_a) as conn, conn.cursor() as cur:
            cur.execute("DROP TABLE notes")
        _, out, _ = n.epio("backups", "list", "--app", a)
        self.assertIn(made["id"], out)
        self.assertIn("verified", out)
        _, out, _ = n.epio("backups", "restore", made["id"], "--app", a, "--confirm", a)
        self.assertIn("previous data is kept as", out)
        self.assertEqual(rows(url_a, "SELECT id, body FROM notes ORDER BY id"), before)

        # restore into the other app (the user owns both)
        n.epio("backups", "restore", made["id"], "--app", a, "--to-app", b, "--confirm", b)
        self.assertEqual(len(rows(url_b, "SELECT id FROM notes")), 200)

        # download (in 1 KiB bus chunks): the file's sha256 is the recorded one
        self.assertGreater(made["size"], 2048, "the download should span several chunks")
        target = n.tmp / "a.dump"
        _, out, _ = n.epio("backups", "download", made["id"], "--app", a, "-o", str(target))
        self.assertEqual(hashlib.sha256(target.read_bytes()).hexdigest(), made["sha256"])
        self.assertTrue(target.read_bytes().startswith(b"PGDMP"))

        # a tampered backup file is refused at restore, live data untouched
        data = Path(n.node.data_dir) / "backups" / a / "postgres" / made["id"] / "data"
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
        code, _, err = n.epio("backups", "restore", made["id"], "--app", a, "--confirm", a,
                              check=False)
        self.assertEqual(code, 1)
        self.assertIn("checksum mismatch", err)
        self.assertEqual(len(rows(url_a, "SELECT id FROM notes")), 200)

        # removing the add-on: final backup (verified), database and role dropped, var unset
        ident = "app_" + a
        _, out, _ = n.epio("addons", "destroy", "postgres", "--app", a, "--confirm", a)
        self.assertIn("Final backup", out)
        self.assertIn("verified", out)
        self.assertFalse(db_exists(ident))
        self.assertNotIn("DATABASE_URL", n.config(a))
        listing = n.json("backups", "list", "--app", a)
        # the final backup is in the history (retention keeps the newest of each hour)
        self.assertEqual(listing[0]["status"], "verified")
        self.assertIn(f"Final backup {listing[0]['id']} verified", out)

        # deleting an app takes a verified final backup and keeps its database for the
        # grace period (docs/apps.md); purging it drops the database for good
        n.epio("apps", "destroy", b, "--confirm", b)
        self.assertIn(f"of {b} verified", n.node.output())
        self.assertTrue(db_exists("app_" + b), "a destroyed app keeps its data until purged")
        n.epio("apps", "purge", b, "--confirm", b)
        self.assertFalse(db_exists("app_" + b))

    def test_failed_backups_are_never_success(self) -> None:
        """A database gone behind epio's back: `epio backups create` exits 1 and lists the
        backup as FAILED; deleting the app is refused (its final backup failed, nothing
        dropped) until the add-on is destroyed with --force."""
        n = AddonNode(self)
        n.start()
        app = "pf" + secrets.token_hex(3)
        n.create_app(app)
        n.epio("addons", "create", "postgres", "--app", app)
        ident = "app_" + app
        conn = psycopg2.connect(ADMIN_URL)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE "{ident}"')
        conn.close()
        code, out, err = n.epio("backups", "create", "--app", app, check=False)
        self.assertEqual(code, 1, out + err)
        self.assertIn("FAILED", out)
        self.assertIn("FAILED verification", err)
        _, out, _ = n.epio("backups", "list", "--app", app)
        self.assertIn("FAILED", out)
        self.assertNotIn("verified", out)
        [listed] = n.json("backups", "list", "--app", app)
        self.assertEqual((listed["status"], listed["verified"]), ("failed", False))
        self.assertIn(f"of {app} FAILED", n.node.output())  # and in the log
        code, _, err = n.epio("apps", "destroy", app, "--confirm", app, check=False)
        self.assertEqual(code, 1)
        self.assertIn("final backup", err)
        self.assertIn("nothing was dropped", err)
        _, out, _ = n.epio("addons", "destroy", "postgres", "--app", app, "--confirm", app,
                           "--force")
        self.assertIn("FAILED", out)
        n.epio("apps", "destroy", app, "--confirm", app)
