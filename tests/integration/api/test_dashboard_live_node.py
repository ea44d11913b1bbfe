"""The dashboard's actions in a real headless Chromium against one real node
(``twistd -n epio --role=all``: api, builder, runner, router, logger, backup, with the
machine's PostgreSQL as the shared add-on server), shared by the class:

* deploy by uploading a tarball, then a directory (packed into a tar in the page,
  ``.epioignore`` honoured), roll back; the ``epio run`` history; charts of the real
  router's and runner's stats (requests, p50/p99 latency, 5xx, memory) with axes and
  units over a chosen window; the log view wraps, filters by source and text, pauses;
* add-ons: create, destroy with the app's name typed; backups: create, download (the
  file's sha256 checked), restore with the app's name typed (the data comes back).

Screenshots go to ``$EPIO_TEST_ARTIFACTS`` when it is set.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg2
from twisted.trial.unittest import SynchronousTestCase

from epio.appdir import DEFAULT_IGNORES, IgnoreRules
from tests.integration.api.test_dashboard_browser import _driver
from tests.integration.build.helpers import shared_cache
from tests.integration.e2e.test_quickstart import _unmount_under, http_get, wait_until
from tests.util import NodeProcess, isolated_config, to_toml

ADMIN_URL = os.environ.get("EPIO_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")

SERVER = """\
import http.server, os

LONG = "wrap-" + "x" * 400  # one long unbroken word: the log view must wrap it


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 500 if self.path.startswith("/fail") else 200
        body = ("release " + os.environ["EPIO_RELEASE"] + "\\n").encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        print("served " + self.path, flush=True)


print("starting release " + os.environ["EPIO_RELEASE"] + " " + LONG, flush=True)
http.server.ThreadingHTTPServer(("", int(os.environ["PORT"])), Handler).serve_forever()
"""


def shot(driver: Any, name: str, show: str | None = None) -> None:
    """A screenshot under $EPIO_TEST_ARTIFACTS (when set), ``show`` (CSS) scrolled to."""
    where = os.environ.get("EPIO_TEST_ARTIFACTS")
    if where:
        if show:
            driver.execute_script("document.querySelector(arguments[0]).scrollIntoView()", show)
        os.makedirs(where, exist_ok=True)
        driver.save_screenshot(os.path.join(where, f"dashboard-live-{name}.png"))


class DashboardLiveNodeTests(SynchronousTestCase):
    """One node and one signed-in browser for the class; each test uses its own app."""

    tmp: Path
    node: NodeProcess
    driver: Any
    token: str
    token_help: str
    api_port: int
    lb_port: int
    downloads: Path
    apps: list[str]
    current: str

    @classmethod
    def setUpClass(cls) -> None:
        cls.driver = _driver()  # first: without a browser, no node is started for nothing
        cls.tmp = Path(tempfile.mkdtemp(prefix="epio-dash-"))
        os.chmod(cls.tmp, 0o711)
        cls.apps = []
        # web instances' ports away from runner.port_min's default (20000): other nodes
        # on this host (other test runs) allocate from there, and an app can lose the
        # port it was given to one of theirs between the allocation and its bind
        port_min = 21000 + (os.getpid() % 200) * 50
        doc, _ = isolated_config({
            "api": {"reconcile_interval": 0.5, "drain_seconds": 0.5, "stop_grace": 3.0,
                    "runner_dead_after": 10.0, "rollout_timeout": 60.0},
            "runner": {"backoff_initial": 0.2, "register_interval": 2.0,
                       "stats_interval": 2.0, "port_min": port_min,
                       "port_max": port_min + 49},
            "lb": {"stats_interval": 1.0},
            "logger": {"stats_flush_delay": 0.5, "maintenance_interval": 0.5},
            "addons": {"postgres_admin_url": ADMIN_URL},
            "backup": {"interval": 3600.0},
        })
        cls.api_port = int(str(doc["api"]["listen"]).split(":")[1])
        cls.lb_port = int(str(doc["lb"]["listen"]).split(":")[1])
        data = cls.tmp / "data"
        data.mkdir(mode=0o711)
        (data / "cache").symlink_to(shared_cache())
        try:
            cls.node = NodeProcess(["--role=all"], data_dir=data, config=to_toml(doc))
            cls.node.wait_for_log("api ready", timeout=60)
            cls.node.wait_for_log("sandbox=", timeout=30)
            cls.token = (data / "admin-token").read_text().strip()
            cls.downloads = cls.tmp / "downloads"
            cls.downloads.mkdir()
            cls.driver.execute_cdp_cmd("Browser.setDownloadBehavior", {
                "behavior": "allow", "downloadPath": str(cls.downloads)})
            cls.sign_in()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        cls.driver.quit()
        if hasattr(cls, "node"):
            cls.node.stop(timeout=20)
            cls.node.cleanup()
        _unmount_under(cls.tmp)
        shutil.rmtree(cls.tmp, ignore_errors=True)
        drop_databases(cls.apps)

    @classmethod
    def sign_in(cls) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        d = cls.driver
        d.get(f"http://127.0.0.1:{cls.api_port}/")
        wait = WebDriverWait(d, 30)
        wait.until(ec.visibility_of_element_located((By.ID, "token")))
        cls.token_help = d.find_element(By.ID, "token-help").text
        d.find_element(By.ID, "token").send_keys(cls.token)
        d.find_element(By.ID, "signin").click()
        wait.until(lambda d: d.find_element(By.ID, "whoami").text)

    # --- helpers ---------------------------------------------------------------------

    def api(self, method: str, path: str, body: Any = None) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=120)
        headers = {"Authorization": f"Bearer {self.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, "/api/v1/" + path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        self.assertLess(resp.status, 300, raw[:500])
        return json.loads(raw) if raw.strip() else None

    def create_app(self, prefix: str) -> str:
        name = prefix + os.urandom(3).hex()
        self.api("POST", "apps", {"name": name})
        self.apps.append(name)
        return name

    def open_app(self, name: str) -> None:
        from selenium.webdriver.common.by import By

        self.current = name
        self.driver.get(f"http://127.0.0.1:{self.api_port}/dashboard/apps/{name}")
        self.wait(lambda d: d.find_element(By.ID, "app-name").text == name)

    def wait(self, check: Any, timeout: float = 30.0) -> Any:
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(check)
        except Exception:
            shot(self.driver, "failure-" + self._testMethodName)
            raise AssertionError(
                f"page: error={self.text('#error')!r} notice={self.text('#notice')!r}\n"
                f"deploy log: {self.text('#deploy-log')[-2000:]}\n"
                f"--- node log (end) ---\n{self.node.output()[-4000:]}") from None

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def finds(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def text(self, css: str) -> str:
        try:
            return str(self.find(css).text)
        except Exception:
            return ""

    def notice(self, starts: str, timeout: float = 60.0) -> str:
        self.wait(lambda d: self.text("#notice").startswith(starts) or self.text("#error"),
                  timeout)
        if self.text("#error"):
            shot(self.driver, "failure-" + self._testMethodName)
            lines = self.api("GET", f"apps/{self.current}/logs?n=60")
            raise AssertionError(f"the page says: {self.text('#error')}\n--- app log ---\n"
                                 + json.dumps(lines, indent=1)[-5000:])
        return self.text("#notice")

    def typed_confirm(self, row_css: str, label: str, name: str, keyboard: bool = False) -> bool:
        """Open the typed confirmation of a row; a wrong name leaves the confirm button
        disabled; the app's name enables it; click it (or, ``keyboard``, press Enter in
        the field). Returns whether the wrong name had left it disabled."""
        from selenium.webdriver.common.keys import Keys

        row = self.find(row_css)
        [opener] = [b for b in row.find_elements("css selector", "button") if b.text == label]
        opener.click()
        field = row.find_element("css selector", "input.confirm-name")
        confirm = row.find_element("css selector", "button.danger")
        self.assertEqual(self.driver.switch_to.active_element, field)  # focus moved there
        field.send_keys(name + "x")
        refused = not confirm.is_enabled()
        if keyboard:  # Enter with a wrong name does nothing
            before = self.text("#notice")
            field.send_keys(Keys.ENTER)
            refused = refused and field.is_enabled() and self.text("#notice") == before
        field.clear()
        field.send_keys(name)
        self.wait(lambda d: confirm.is_enabled())
        shot(self.driver, f"confirm-{label.split()[0].lower()}")
        if keyboard:
            field.send_keys(Keys.ENTER)
        else:
            confirm.click()
        return refused

    # --- tests -----------------------------------------------------------------------

    def test_deploy_upload_rollback_runs_charts_log(self) -> None:
        """A tarball and then a directory uploaded from the page become v1 and v2 (the
        directory's .epioignore honoured); a rollback makes v3; restarting web makes v4, served
        by new processes; a detached run shows in
        the run history; the charts show the real requests, latency, 5xx, memory and CPU
        with axes and units; the log wraps, filters and pauses."""
        from selenium.webdriver.support.ui import Select

        self.assertIn("epio login", self.token_help)
        self.assertIn("admin-token", self.token_help)
        name = self.create_app("dep")
        self.open_app(name)

        # deploy a tarball
        src = self.tmp / name
        src.mkdir()
        (src / "server.py").write_text(SERVER)
        (src / "Procfile").write_text("web: python server.py\n")
        (src / "requirements.txt").write_text("")
        tarball = self.tmp / f"{name}.tar.gz"
        with tarfile.open(tarball, "w:gz") as tar:
            for f in sorted(src.iterdir()):
                tar.add(f, arcname=f.name)
        self.find("#deploy-file").send_keys(str(tarball))
        self.find("#deploy").click()
        self.assertTrue(self.notice("Deployed v1", 180).startswith("Deployed v1 at http"))
        shot(self.driver, "deployed-tarball", "#deploy-log")
        url = self.api("GET", f"apps/{name}")["url"]
        host = urlsplit(url).hostname or ""
        self.assertEqual(wait_until("v1 serves", lambda: http_get(self.lb_port, host)[1]
                                    == "release 1\n", 30), True)
        # traffic for the charts (now: their 10 s buckets end while the rest goes on):
        # 2xx and 5xx through the real router
        for i in range(12):
            http_get(self.lb_port, host, "/fail" if i % 4 == 0 else "/")

        # deploy a directory: .epioignore keeps junk.txt out; a nested file goes in
        (src / "junk.txt").write_text("not uploaded\n")
        (src / ".epioignore").write_text("junk.txt\n")
        (src / "pkg").mkdir()
        (src / "pkg" / "data.txt").write_text("nested\n")
        (src / "server.py").write_text(SERVER.replace('"release "', '"release two "'))
        self.find("#deploy-dir").send_keys(str(src))
        self.find("#deploy").click()
        self.notice("Deployed v2", 180)
        self.assertIn(f"Uploading {name}/ (5 files, 1 ignored)", self.text("#deploy-log"))
        self.assertEqual(wait_until("v2 serves", lambda: http_get(self.lb_port, host)[1]
                                    == "release two 2\n", 30), True)

        # roll back to v1: a confirmed button in the releases table
        button = "#releases tbody tr[data-version='1'] button"
        self.find(button).click()
        self.wait(lambda d: self.text(button).startswith("Confirm"))
        self.find(button).click()
        self.notice("Rolled back to v1", 120)
        self.assertEqual(self.text("#releases tbody tr:first-child td:nth-child(4)"),
                         "Rollback to v1")
        self.assertEqual(wait_until("v3 (v1's code) serves", lambda: http_get(
            self.lb_port, host)[1] == "release 3\n", 60), True)
        shot(self.driver, "rolled-back", "#releases")

        # restart web from its row: v4 runs v3's code and config on new processes
        [restart] = [b for b in self.finds("#formation tbody tr[data-type='web'] button")
                     if b.text == "Restart web"]
        restart.click()
        self.notice("Restarting web processes: v4", 60)
        self.assertEqual(self.text("#releases tbody tr:first-child td:nth-child(4)"),
                         "Restart web")
        self.assertEqual(wait_until("v4 (new processes) serves", lambda: http_get(
            self.lb_port, host)[1] == "release 4\n", 60), True)
        shot(self.driver, "restarted", "#formation")

        # a run session: it shows in the history
        run = self.api("POST", f"apps/{name}/runs", {"command": ["echo", "hello-from-run"],
                                                     "detach": True})
        wait_until("the run ends", lambda: self.api(
            "GET", f"apps/{name}/runs/{run['number']}")["state"] not in ("starting",
                                                                          "running"), 60)
        self.open_app(name)
        row = f"#runs tbody tr[data-run='{run['number']}']"
        self.wait(lambda d: self.finds(row))
        cells = [c.text for c in self.find(row).find_elements("css selector", "td")]
        self.assertEqual(cells[0], f"run.{run['number']}")
        self.assertEqual(cells[5], "exit 0")
        self.assertEqual(cells[6], "echo hello-from-run")

        # charts: each has data, axes in its unit and time, a legend
        charts = ("stats-chart", "errors-chart", "latency-chart", "memory-chart", "cpu-chart")
        for chart in charts:
            self.wait(lambda d, c=chart: self.find(f"#{c}").get_attribute("data-points")
                      not in (None, "", "0"), 90)
        labels = {c: [t.text for t in self.finds(f"#{c} text.label")] for c in charts}
        self.assertEqual(labels["stats-chart"], ["time (UTC)", "req/s"])
        self.assertEqual(labels["errors-chart"], ["time (UTC)", "req/s"])
        self.assertEqual(labels["latency-chart"], ["time (UTC)", "ms"])
        self.assertEqual(labels["memory-chart"], ["time (UTC)", "MiB"])
        self.assertEqual([t.text for t in self.finds("#latency-chart text.legend")],
                         ["p50", "p99"])
        self.assertEqual([t.text for t in self.finds("#memory-chart text.legend")], ["web"])
        self.assertEqual(labels["cpu-chart"], ["time (UTC)", "% of a core"])
        self.assertEqual([t.text for t in self.finds("#cpu-chart text.legend")], ["web"])
        self.assertEqual(len(self.finds("#stats-chart text.tick")), 10)  # 5 values, 5 times
        self.assertIn("5xx", self.find("#errors-chart").get_attribute("aria-label"))
        Select(self.find("#stats-window")).select_by_value("15m")
        self.wait(lambda d: "last 15 minutes" in self.text("#stats-chart-figure figcaption"))
        self.assertRegex(self.text("#stats-note"), r"^\d+ requests? in the last 15 minutes")
        shot(self.driver, "charts", "#charts")

        # the log: wrapped (no horizontal scroll), filtered by source and text, paused
        self.wait(lambda d: "starting release 4" in self.text("#log"), 60)
        log = self.find("#log")
        self.assertEqual(log.value_of_css_property("white-space"), "pre-wrap")
        self.assertLessEqual(int(log.get_attribute("scrollWidth")),
                             int(log.get_attribute("clientWidth")))
        self.wait(lambda d: self.finds("#log-source option[value='type:web']"))
        Select(self.find("#log-source")).select_by_value("type:web")
        self.wait(lambda d: "lines shown" in self.text("#log-status"))
        shown = self.text("#log").splitlines()
        self.assertTrue(shown)
        self.assertTrue(all(" web." in line for line in shown), shown)
        Select(self.find("#log-source")).select_by_value("")
        self.find("#log-text").send_keys("hello-from-run")
        self.wait(lambda d: self.text("#log").splitlines()
                  and all("hello-from-run" in x for x in self.text("#log").splitlines()))
        self.find("#log-text").clear()
        self.find("#log-text").send_keys("served /paused")
        self.find("#log-pause").click()
        self.assertEqual(self.find("#log-pause").get_attribute("aria-pressed"), "true")
        before = self.text("#log")
        http_get(self.lb_port, host, "/paused")
        self.wait(lambda d: "paused, " in self.text("#log-status"), 30)
        self.assertEqual(self.text("#log"), before)
        self.assertNotIn("served /paused", before)
        shot(self.driver, "log-paused", "#log-form")
        self.find("#log-pause").click()
        self.wait(lambda d: "served /paused" in self.text("#log"))
        self.assertNotIn(self.token, self.driver.current_url)

    def test_directory_upload_ignores_as_the_cli(self) -> None:
        """The page's .epioignore rules (used to pack a directory) leave out exactly
        what the CLI's epio.appdir leaves out, default ignores included."""
        cases = [[list(DEFAULT_IGNORES) + p, path] for p in IGNORE_PATTERNS
                 for path in IGNORE_PATHS]
        got = self.driver.execute_script(
            "return arguments[0].map(([lines, path]) => ignoreRules(lines)(path));", cases)
        want = [cli_ignores(lines, path) for lines, path in cases]
        self.assertEqual([c for c, g, w in zip(cases, got, want, strict=True) if g != w], [])
        self.assertIn(True, want)
        self.assertIn(False, want)

    def test_addons_and_backups(self) -> None:
        """Create a postgres add-on; back up; download the backup (sha256 as listed);
        damage the data; restore with the app's name typed (a wrong name cannot
        confirm); the data is back; destroy the add-on the same way."""
        from selenium.webdriver.support.ui import Select

        name = self.create_app("adb")
        self.open_app(name)
        self.wait(lambda d: self.text("#addons-empty") == "No add-ons.")
        Select(self.find("#addon-kind")).select_by_value("postgres")
        self.find("#addon-create").click()
        self.assertEqual(self.notice("Created"),
                         "Created postgres (shared); DATABASE_URL is set in a new release")
        self.wait(lambda d: self.finds("#addons tbody tr[data-kind='postgres']"))
        db = self.api("GET", f"apps/{name}/config")["vars"]["DATABASE_URL"]
        run_sql(db, "CREATE TABLE notes AS SELECT generate_series(1, 50) AS n")

        self.find("#backup-create").click()
        made = self.notice("Backed up:", 120)
        self.assertTrue(made.startswith("Backed up: postgres ") and made.endswith(" (verified)"),
                        made)
        made_id = made.split()[3]
        [backup] = [b for b in self.api("GET", f"apps/{name}/backups") if b["id"] == made_id]
        row = f"#backups tbody tr[data-backup='{backup['id']}']"
        self.wait(lambda d: self.finds(row))
        self.assertEqual(self.text(row + " td:nth-child(3)"), "verified")
        shot(self.driver, "backups", "#backups")

        self.find(row + " button.download").click()
        self.notice("Downloaded")
        target = self.downloads / f"{name}-{backup['id']}.dump"
        wait_until("the download is saved", target.exists, 30)
        self.assertEqual(hashlib.sha256(target.read_bytes()).hexdigest(), backup["sha256"])

        run_sql(db, "DELETE FROM notes")
        refused = self.typed_confirm(row, "Restore", name)
        self.assertTrue(refused, "a wrong name enabled the restore")
        restored = self.notice("Restored backup", 180)
        self.assertIn(f"Restored backup {backup['id']} into {name}", restored)
        db = self.api("GET", f"apps/{name}/config")["vars"]["DATABASE_URL"]
        self.assertEqual(run_sql(db, "SELECT count(*) FROM notes"), [(50,)])

        refused = self.typed_confirm("#addons tbody tr[data-kind='postgres']",
                                     "Destroy postgres", name, keyboard=True)
        self.assertTrue(refused, "a wrong name enabled the destroy")
        self.notice("Destroyed postgres", 180)
        self.wait(lambda d: self.text("#addons-empty") == "No add-ons.")
        shot(self.driver, "addon-destroyed", "#addons")
        self.assertEqual(self.api("GET", f"apps/{name}/addons"), [])
        self.assertNotIn("DATABASE_URL", self.api("GET", f"apps/{name}/config")["vars"])


IGNORE_PATTERNS = [["*.log"], ["build/"], ["/top.txt"], ["docs/**/*.md"], ["secret?.txt"],
                   ["data/", "!data/keep.txt"], ["*.txt", "!keep.txt"], ["a/**"], ["**/tmp"],
                   ["\\#hash", "[!x]y.cfg", "# a comment", "", "trailing.txt  "]]
IGNORE_PATHS = ["x.log", "sub/x.log", "build/a.py", "src/build/a.py", "top.txt", "sub/top.txt",
                "docs/a/b/c.md", "docs/c.md", "m.pyc", "secret1.txt", "secret12.txt",
                "data/keep.txt", "keep.txt", "sub/keep.txt", "other.txt", "a/b/c", "tmp",
                "x/tmp", "x/tmp/y", ".git/config", "__pycache__/m.pyc", "app.py", "#hash",
                "ay.cfg", "xy.cfg", "trailing.txt", ".epio-app"]


def cli_ignores(lines: list[str], path: str) -> bool:
    """Whether `epio deploy` leaves ``path`` out (epio.appdir: an ignored directory
    takes its whole subtree)."""
    rules = IgnoreRules(lines)
    parts = path.split("/")
    return any(rules.ignored("/".join(parts[:i]), True) for i in range(1, len(parts))) \
        or rules.ignored(path, False)


def run_sql(url: str, sql: str) -> list[tuple[Any, ...]]:
    u = urlsplit(url)
    with psycopg2.connect(host=u.hostname, port=u.port, user=u.username, password=u.password,
                          dbname=u.path.lstrip("/")) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall() if cur.description else []


def drop_databases(apps: list[str]) -> None:
    """Databases and roles of the class's apps a failed test may leave."""
    try:
        conn = psycopg2.connect(ADMIN_URL)
    except psycopg2.Error:
        return
    conn.autocommit = True
    with conn.cursor() as cur:
        for app in apps:
            ident = "app_" + app.replace("-", "_")
            cur.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (ident + "%",))
            for (db,) in cur.fetchall():
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = %s", (db,))
                cur.execute(f'DROP DATABASE IF EXISTS "{db}"')
            cur.execute(f'DROP ROLE IF EXISTS "{ident}"')
    conn.close()

