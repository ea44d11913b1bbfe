"""The OpenAPI document is the server: schemathesis (``st run``) generates requests from
``/api/v1/openapi.json`` and sends them to a live node; every answer must be documented
(status, content type, body schema), none may be a server error, and a method an endpoint
does not serve is 405 with ``Allow``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.util import CHECKOUT, NodeProcess, isolated_config, to_toml, wait_for_port

ST = Path(sys.executable).with_name("st")
START_TIMEOUT = 60.0
RUN_TIMEOUT = 300.0  # seconds the whole schemathesis run may take (about 45 s idle)
MAX_EXAMPLES = 5  # generated cases per operation and phase (examples, coverage, fuzzing)
SEED = 18  # reproducible: the same cases on every run
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,allow_header_conformance,unsupported_method")
# deleteToken could revoke the token the run uses; deleteApp would delete the app every
# app-scoped operation is pointed at (both are covered by tests/api/test_api.py)
EXCLUDED = ("deleteToken", "deleteApp")
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def skip_reason() -> str | None:
    if not ST.exists():
        return "needs schemathesis (pip install '.[test]')"
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
    except OSError:
        return "needs PostgreSQL on 127.0.0.1:5432 (the shared add-on server)"
    return None


class OpenApiFuzzTests(SynchronousTestCase):
    skip = skip_reason()

    def setUp(self) -> None:
        # api with a logger, a backup node and a shared PostgreSQL: no 503 for a role
        # that is simply not there
        doc, ports = isolated_config({"addons": {"postgres_admin_url": ADMIN_URL}})
        self.node = NodeProcess(["--role=api,logger,backup"], config=to_toml(doc))
        self.addCleanup(self.node.cleanup)
        wait_for_port("127.0.0.1", ports[8000], timeout=START_TIMEOUT)
        self.node.wait_for_log("api ready", timeout=START_TIMEOUT)
        self.base = f"http://127.0.0.1:{ports[8000]}"
        self.token = (self.node.data_dir / "admin-token").read_text().strip()
        self.app = f"fuzz-{uuid.uuid4().hex[:8]}"
        self.assertEqual(self.call("POST", "apps", {"name": self.app})[0], 201)
        self.addCleanup(self.call, "DELETE", f"apps/{self.app}")  # drops its database

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base}/api/v1/{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def test_every_answer_is_documented_and_none_is_a_server_error(self) -> None:
        """Coverage and fuzzing phases over every operation but the excluded ones, as
        the admin, with app-scoped paths on a real app: schemathesis exits 0 (no 5xx,
        no undocumented status or content type, every body matches its schema, 405s
        carry Allow) and generated a real number of cases."""
        tmp = Path(self.mktemp()).absolute()
        tmp.mkdir()
        config = tmp / "schemathesis.toml"
        # createAddon may answer its documented 503 addons_unavailable: a dedicated
        # server needs a runner, and this node has none (dedicated servers are made for
        # real in tests/integration/addons/test_dedicated.py); every other 5xx, and a 500
        # there too, still fails the run
        config.write_text(f'[parameters]\n"path.app" = "{self.app}"\n\n'
                          '[[operations]]\ninclude-operation-id = "createAddon"\n'
                          'checks.not_a_server_error.expected-statuses = '
                          '["2xx", "3xx", "4xx", "503"]\n')
        argv = [str(ST), "--config-file", str(config), "run",
                f"{self.base}/api/v1/openapi.json",
                "-H", f"Authorization: Bearer {self.token}",
                "--checks", CHECKS, "--phases", "examples,coverage,fuzzing",
                # one schemathesis worker thread: CPython 3.11.7's AST builder keeps its
                # recursion depth in state the threads share, so hypothesis's lambda
                # descriptions (ast.parse) from two threads at once fail at random with
                # "SystemError: AST constructor recursion depth mismatch" (seen in CI)
                "-n", str(MAX_EXAMPLES), "--seed", str(SEED), "-w", "1",
                "--request-timeout", "20"]
        for op in EXCLUDED:
            argv += ["--exclude-operation-id", op]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.integration.api.st_hooks",
               "PYTHONPATH": str(CHECKOUT), "NO_COLOR": "1"}
        started = time.monotonic()
        r = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                           env=env, cwd=tmp)
        took = time.monotonic() - started
        out = r.stdout + r.stderr
        summary = [line.strip() for line in out.splitlines() if "generated" in line]
        print(f"schemathesis: {summary[-1] if summary else '?'} in {took:.1f}s")
        self.assertEqual(r.returncode, 0, out[-6000:])
        self.assertTrue(summary and "generated" in summary[-1], out[-2000:])
        generated = int(summary[-1].split()[0])
        self.assertGreater(generated, 300, summary)
        self.assertNotIn("Traceback", self.node.output())
        shutil.rmtree(tmp, ignore_errors=True)
