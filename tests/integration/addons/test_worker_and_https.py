"""Two realistic apps deployed unchanged on one node (examples/celery-worker and
examples/django-https), checked through the router:

* a web process hands a task to a Celery worker with the prefork pool (multiprocessing
  in the sandbox: the private /dev/shm) through the app's dedicated Redis, and answers
  the result a forked pool child computed;
* a Django settings package whose production module is chosen with a
  ``DJANGO_SETTINGS_MODULE`` config var (the platform settings still on top: the app's
  hostname is allowed although production.py allows none) redirects plain HTTP to HTTPS
  and serves a request that came in over HTTPS to a proxy in front of the router
  (``X-Forwarded-Proto: https`` from a trusted peer)."""

from __future__ import annotations

import http.client
import json
import secrets

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.addons.helpers import ADMIN_URL, AddonNode
from tests.integration.e2e.test_quickstart import wait_until
from tests.util import CHECKOUT


def get(port: int, host: str, path: str, **headers: str) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=40)
    try:
        conn.request("GET", path, headers={"Host": host, **{k.replace("_", "-"): v
                                                             for k, v in headers.items()}})
        resp = conn.getresponse()
        return (resp.status, {k.lower(): v for k, v in resp.getheaders()},
                resp.read().decode("utf-8", "replace"))
    finally:
        conn.close()


class WorkerAndHttpsTests(SynchronousTestCase):
    def deploy(self, n: AddonNode, example: str, app: str) -> str:
        code, out, err = n.epio("deploy", str(CHECKOUT / "examples" / example), "--app", app,
                                "--poll", "0.5", check=False, timeout=400)
        if code != 0:
            logs = n.epio("logs", "--app", app, "-n", "200", check=False)[1]
            self.fail(f"deploy of {example} failed:\n{out}\n{err}\n--- app log ---\n{logs}")
        return out

    def test_celery_prefork_and_https_settings_package(self) -> None:
        """The Celery task is processed by a prefork pool child and its result answered
        through the router; the Django production settings redirect HTTP to HTTPS and
        serve HTTPS requests, with the platform settings applied on top."""
        n = AddonNode(self, {"addons": {"postgres_admin_url": ADMIN_URL},
                             "lb": {"trusted_proxies": ["127.0.0.1"]}})
        n.start()

        worker = "cw" + secrets.token_hex(3)
        n.create_app(worker)
        self.deploy(n, "celery-worker", worker)
        n.epio("scale", "worker=1", "--app", worker)

        def worker_up() -> bool:
            ps = n.json("ps", "--app", worker)
            return any(i["type"] == "worker" and i["state"] in ("running", "healthy")
                       for i in ps)

        wait_until("the worker runs", worker_up, timeout=60)
        seen: list[tuple[int, dict[str, str], str]] = []

        def added() -> dict | None:
            seen.append(get(n.lb_port, f"{worker}.localhost", "/add?x=2&y=3"))
            return json.loads(seen[-1][2]) if seen[-1][0] == 200 else None

        try:
            result = wait_until("the task's result", added, timeout=90, interval=1.0)
        except AssertionError:
            logs = n.epio("logs", "--app", worker, "-n", "120", check=False)[1]
            self.fail(f"no result: {seen[-1:]!r}\n--- app log ---\n{logs}")
        self.assertEqual(result["sum"], 5)
        self.assertTrue(result["process"].startswith("ForkPoolWorker-"), result)

        shop = "hs" + secrets.token_hex(3)
        n.create_app(shop)
        n.epio("config", "set", "DJANGO_SETTINGS_MODULE=shop.settings.production",
               "--app", shop)
        self.deploy(n, "django-https", shop)
        host = f"{shop}.localhost"
        status, headers, _ = wait_until(
            "the plain-HTTP redirect", lambda: (lambda r: r if r[0] == 301 else None)(
                get(n.lb_port, host, "/orders/?page=2")), timeout=30)
        self.assertEqual(headers["location"], f"https://{host}/orders/?page=2")
        status, headers, body = get(n.lb_port, host, "/", X_Forwarded_Proto="https")
        self.assertEqual((status, body), (200, "settings: production; secure: True"))
        self.assertEqual(headers["strict-transport-security"], "max-age=3600")
