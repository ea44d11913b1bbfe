"""A way back in: a real api node refuses to revoke the last admin token, and
``epio-admin token create`` (a real subprocess on the node's data dir) gives a
locked-out operator a token the running node accepts -- on the embedded SQLite
store and on PostgreSQL.  On the same node, ``epio-admin join-token create`` makes
a join token the api lists and a new host's ``epio-admin join`` redeems (PostgreSQL),
or refuses in one sentence (SQLite: not a cluster)."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.store import pg
from tests.util import NodeProcess, epio_env, free_port, to_toml

ADMIN = [sys.executable, "-m", "epio.admin"]


def call(port: int, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
    """One real HTTP request to the api: (status, JSON body)."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class WayBackInMixin:
    """Subclasses say which store the node uses (``store_config``) and how to wipe
    every admin token behind the API's back (``wipe_admin_tokens``), and whether that
    store can be joined (``cluster``)."""

    cluster = False

    def store_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def wipe_admin_tokens(self, node: NodeProcess) -> None:
        raise NotImplementedError

    def test_refused_then_restored(self) -> None:
        """DELETE of the last admin token is 409 last_admin_token and the token still
        works; after the admin's tokens are gone anyway (the lock-out of issue 17,
        made behind the API's back) and the token file deleted, `epio-admin token
        create --data-dir DIR` writes a 0600 token that the running node accepts for
        admin work, prints an audit line without the secret, and the token's
        description names the operator command."""
        port = free_port()
        doc: dict[str, dict[str, object]] = {
            "api": {"listen": f"tcp:{port}:interface=127.0.0.1"},
            "cluster": {"loggers": []},
            **self.store_config(),
        }
        node = NodeProcess(["--role=api"], config=to_toml(doc))
        self.addCleanup(node.cleanup)  # type: ignore[attr-defined]
        node.wait_for_log("api ready", timeout=60)
        token_file = node.data_dir / "admin-token"
        token = token_file.read_text().strip()

        status, tokens = call(port, "GET", "tokens", token)
        self.assertEqual((status, len(tokens)), (200, 1))  # type: ignore[attr-defined]
        status, body = call(port, "DELETE", f"tokens/{tokens[0]['id']}", token)
        self.assertEqual((status, body["error"]["code"]),  # type: ignore[attr-defined]
                         (409, "last_admin_token"))
        self.assertEqual(call(port, "GET", "user", token)[0], 200)  # type: ignore[attr-defined]

        self.wipe_admin_tokens(node)
        token_file.unlink()
        self.assertEqual(call(port, "GET", "user", token)[0], 401)  # type: ignore[attr-defined]

        argv = [*ADMIN, "token", "create", "--data-dir", str(node.data_dir)]
        if node.argv.count("--config"):
            argv += ["--config", node.argv[node.argv.index("--config") + 1]]
        proc = subprocess.run(argv, env=epio_env(), capture_output=True, text=True, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)  # type: ignore[attr-defined]
        new = token_file.read_text().strip()
        self.assertEqual(stat.S_IMODE(os.stat(token_file).st_mode), 0o600)  # type: ignore[attr-defined]
        self.assertIn("epio-admin: audit: admin token", proc.stderr)  # type: ignore[attr-defined]
        # the hint names the routed URL (api.hostname: epio.localhost by default)
        self.assertRegex(proc.stdout, r"epio login --api http://epio\.localhost(:\d+)? <")  # type: ignore[attr-defined]
        self.assertNotIn(new, proc.stdout + proc.stderr)  # type: ignore[attr-defined]
        self.assertNotIn(new[5:12], proc.stdout + proc.stderr)  # type: ignore[attr-defined]

        status, me = call(port, "GET", "user", new)
        self.assertEqual((status, me["name"], me["is_admin"]),  # type: ignore[attr-defined]
                         (200, "admin", True))
        status, users = call(port, "GET", "users", new)  # admin-only
        self.assertEqual(status, 200)  # type: ignore[attr-defined]
        status, tokens = call(port, "GET", "tokens", new)
        self.assertIn("minted by epio-admin", tokens[0]["description"])  # type: ignore[attr-defined]
        self.check_join_token(node, port, new, argv[len(ADMIN) + 2:])
        self.assertNotIn("Traceback", node.output())  # type: ignore[attr-defined]

    def check_join_token(self, node: NodeProcess, port: int, admin: str,
                         where: list[str]) -> None:
        """`epio-admin join-token create` on the node (``where``: its --data-dir and
        --config): on PostgreSQL the token alone on stdout, once (not on stderr: the
        audit line names its id), listed by the running api with the node id, the ttl
        and the operator; a bad ttl refused in one sentence; the real `epio-admin join`
        of a new host redeems it and gets this node's cluster secret.  On SQLite: exit
        1, one sentence saying the store is not PostgreSQL, no token."""
        t: Any = self
        argv = [*ADMIN, "join-token", "create", *where]
        if not self.cluster:
            proc = subprocess.run([*argv, "--node-id", "h21"], env=epio_env(),
                                  capture_output=True, text=True, timeout=60)
            t.assertEqual((proc.returncode, proc.stdout), (1, ""), proc.stderr)
            t.assertIn("is not PostgreSQL (a single-box store cannot be joined)",
                       proc.stderr)
            t.assertNotIn("Traceback", proc.stderr)
            return
        proc = subprocess.run([*argv, "--ttl", "100000"], env=epio_env(),
                              capture_output=True, text=True, timeout=60)
        t.assertEqual((proc.returncode, proc.stdout), (1, ""), proc.stderr)
        t.assertEqual(proc.stderr.strip().splitlines(), [
            "epio-admin: ttl must be above 0 and at most 86400 seconds, not 100000"])
        proc = subprocess.run([*argv, "--node-id", "h21", "--ttl", "600"], env=epio_env(),
                              capture_output=True, text=True, timeout=60)
        t.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        lines = proc.stdout.splitlines()
        t.assertEqual(len(lines), 1, proc.stdout)
        token = lines[0]
        t.assertTrue(token.startswith("epiojoin_"), token)
        t.assertNotIn(token, proc.stderr)
        t.assertNotIn(token[9:20], proc.stderr)
        status, listed = call(port, "GET", "cluster/join-tokens", admin)
        t.assertEqual((status, len(listed)), (200, 1))
        info = listed[0]
        t.assertEqual((info["node_id"], info["used"]), ("h21", None))
        t.assertAlmostEqual(info["expires"] - info["created"], 600, delta=1)
        t.assertIn("epio-admin", info["created_by"])
        t.assertIn(f"epio-admin: audit: join token {info['id']} for node 'h21'", proc.stderr)
        t.assertNotIn(token, json.dumps(listed) + node.output())
        new_host = node.data_dir.parent / "h21"
        proc = subprocess.run(
            [*ADMIN, "join", "--store", self.url, "--token", "-", "--role", "runner",
             "--data-dir", str(new_host), "--address", "127.0.0.1"], input=token + "\n",
            env=epio_env(), capture_output=True, text=True, timeout=60)
        t.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        t.assertIn("joined the cluster as node h21", proc.stdout)
        t.assertEqual((new_host / "cluster-secret").read_text().strip(),
                      (node.data_dir / "cluster-secret").read_text().strip())
        t.assertIsNotNone(call(port, "GET", "cluster/join-tokens", admin)[1][0]["used"])


class SqliteWayBackInTests(WayBackInMixin, SynchronousTestCase):
    def store_config(self) -> dict[str, Any]:
        return {}

    def wipe_admin_tokens(self, node: NodeProcess) -> None:
        db = sqlite3.connect(node.data_dir / "store.sqlite3", timeout=10)
        with db:
            db.execute("DELETE FROM api_tokens WHERE user_id IN "
                       "(SELECT id FROM users WHERE is_admin)")
        db.close()


class PostgresWayBackInTests(WayBackInMixin, SynchronousTestCase):
    cluster = True

    def store_config(self) -> dict[str, Any]:
        self.url = pg.pg_url_for_test(self)
        return {"store": {"url": self.url}}

    def wipe_admin_tokens(self, node: NodeProcess) -> None:
        import psycopg2

        conn = psycopg2.connect(self.url)
        with conn, conn.cursor() as cur:
            cur.execute("DELETE FROM api_tokens WHERE user_id IN "
                        "(SELECT id FROM users WHERE is_admin)")
        conn.close()
