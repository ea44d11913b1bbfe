"""A real single-box node (``--role=all``) with the machine's PostgreSQL as the shared
add-on server, driven through the real CLI and HTTP API (as the e2e quick start)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psycopg2

from tests.integration.build.helpers import shared_cache
from tests.integration.e2e.test_quickstart import _unmount_under
from tests.util import NodeProcess, epio_env, isolated_config, to_toml

ADMIN_URL = os.environ.get("EPIO_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


class AddonNode:
    """One node and a logged-in CLI; ``cleanup`` removes databases it provisioned."""

    def __init__(self, test: Any, overrides: dict[str, dict[str, object]] | None = None,
                 root: Path | None = None) -> None:
        self.test = test
        self.tmp = Path(tempfile.mkdtemp(prefix="epio-addons-", dir=root))
        os.chmod(self.tmp, 0o711)
        test.addCleanup(shutil.rmtree, self.tmp, True)
        test.addCleanup(_unmount_under, self.tmp)
        test.addCleanup(self.drop_leftovers)
        doc, _ = isolated_config({
            "api": {"reconcile_interval": 0.5, "drain_seconds": 0.5, "stop_grace": 3.0,
                    "runner_dead_after": 10.0, "rollout_timeout": 60.0},
            # the node row is refreshed well within api.runner_dead_after (10 s here): a
            # loaded machine does not make the runner look dead to the api
            "runner": {"backoff_initial": 0.2, "register_interval": 2.0},
            "addons": {"postgres_admin_url": ADMIN_URL},
            "backup": {"interval": 3600.0, "chunk_kb": 1},  # downloads in many chunks
            **(overrides or {}),
        })
        self.api_port = int(str(doc["api"]["listen"]).split(":")[1])
        self.lb_port = int(str(doc["lb"]["listen"]).split(":")[1])
        data = self.tmp / "data"
        data.mkdir(mode=0o711)
        (data / "cache").symlink_to(shared_cache())  # the build tests' session wheel cache
        self.node_config = to_toml(doc)
        self.node = NodeProcess(["--role=all"], data_dir=data, config=self.node_config)
        test.addCleanup(lambda: self.node.cleanup())
        keep = os.environ.get("EPIO_TEST_KEEP_LOG")  # a directory to copy the node log to
        if keep:
            test.addCleanup(lambda: shutil.copy(self.node.log_path, Path(keep)))
        self.work = self.tmp / "work"
        self.work.mkdir()
        self.apps: list[str] = []

    def start(self) -> None:
        self.node.wait_for_log("api ready", timeout=60)
        self.token = (self.tmp / "data" / "admin-token").read_text().strip()
        self.epio("login", "--api", f"http://127.0.0.1:{self.api_port}", stdin=self.token)

    def restart(self) -> None:
        """Start the node again on the same data dir and config (after a stop or kill)."""
        old = self.node
        old.cleanup()
        self.node = NodeProcess(["--role=all"], data_dir=old.data_dir, config=self.node_config)
        self.node.wait_for_log("api ready", timeout=60)

    def epio(self, *args: str, stdin: str | None = None, check: bool = True,
             timeout: float = 240.0) -> tuple[int, str, str]:
        env = epio_env({"EPIO_CONFIG_DIR": str(self.tmp / "cli"), "HOME": str(self.tmp)})
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from epio.cli.main import main; sys.exit(main())",
             *args], input=stdin, capture_output=True, text=True, env=env, cwd=self.work,
            timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"epio {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}\n--- node log ---\n"
                                 f"{self.node.output()[-5000:]}")
        return proc.returncode, proc.stdout, proc.stderr

    def json(self, *args: str) -> Any:
        return json.loads(self.epio(*args, "--json")[1])

    def create_app(self, name: str) -> None:
        self.epio("apps", "create", name, "--no-remember")
        self.apps.append(name)

    def api(self, method: str, path: str, token: str | None = None,
            body: Any = None) -> tuple[int, Any, dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=120)
        headers = {"Authorization": f"Bearer {token or self.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, "/api/v1/" + path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            hdrs = {k.lower(): v for k, v in resp.getheaders()}
            if hdrs.get("content-type", "").startswith("application/json"):
                return resp.status, json.loads(raw) if raw.strip() else None, hdrs
            return resp.status, raw, hdrs
        finally:
            conn.close()

    def config(self, app: str) -> dict[str, str]:
        return dict(self.json("config", "--app", app)["vars"])

    def drop_leftovers(self) -> None:
        """Databases/roles of this test's apps (a failed test may leave them)."""
        try:
            conn = psycopg2.connect(ADMIN_URL)
        except psycopg2.Error:
            return
        conn.autocommit = True
        with conn.cursor() as cur:
            for app in self.apps:
                ident = "app_" + app.replace("-", "_")
                cur.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                            (ident + "%",))
                for (db,) in cur.fetchall():
                    cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = %s", (db,))
                    cur.execute(f'DROP DATABASE IF EXISTS "{db}"')
                cur.execute(f'DROP ROLE IF EXISTS "{ident}"')
        conn.close()


def db_exists(name: str) -> bool:
    with psycopg2.connect(ADMIN_URL) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        return cur.fetchone() is not None
