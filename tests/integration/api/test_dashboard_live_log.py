"""The dashboard's live log in a real headless Chromium against a real node (api and
logger roles): the page shows the app's recent lines, then new ones as they arrive,
over the websocket tail (the token travels as a subprotocol, never in the URL)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from epio.bus import Bus
from epio.pipeline import BusLogSink
from tests.integration.api.test_dashboard_browser import _driver
from tests.integration.cli.test_logs_cli import PastClock
from tests.util import NodeProcess, epio_env, isolated_config, to_toml


class DashboardLiveLogTests(TestCase):
    timeout = 120

    async def test_live_log_follows(self) -> None:
        """Lines logged before the page opened are shown; a line logged after it
        appears without reloading, over the websocket (data-live is set only by the
        tail's "ready" message; polling never sets it)."""
        doc, _ = isolated_config({"logger": {"stats_flush_delay": 0.5,
                                               "maintenance_interval": 0.5}})
        node = NodeProcess(["--role=api,logger"], config=to_toml(doc))
        self.addCleanup(node.cleanup)
        node.wait_for_log("api ready", timeout=60)
        home = Path(self.mktemp()).absolute()
        home.mkdir(parents=True)
        env = epio_env({"EPIO_CONFIG_DIR": str(home / "cli"), "HOME": str(home)})
        port = int(doc["api"]["listen"].split(":")[1])
        token = (node.data_dir / "admin-token").read_text().strip()
        cli = [sys.executable, "-c", "import sys; from epio.cli.main import main; sys.exit(main())"]
        subprocess.run([*cli, "login", "--api", f"http://127.0.0.1:{port}"], input=token,
                       text=True, env=env, check=True, capture_output=True, timeout=60)
        subprocess.run([*cli, "apps", "create", "live", "--no-remember"], text=True, env=env,
                       check=True, capture_output=True, timeout=60, cwd=home)

        secret = bytes.fromhex((node.data_dir / "cluster-secret").read_text())
        bus = Bus(reactor, secret, "test-sender")
        sink = BusLogSink(bus, doc["cluster"]["loggers"], clock=reactor)
        sink.startService()
        self.addCleanup(sink.stopService)
        await deferLater(reactor, 0.5, lambda: None)
        sink.emit("live", "web.1", "before the page opened")
        # router samples of an ended 10 s bucket: the page's request chart shows them
        past = PastClock(reactor, 25.0)
        stats = BusLogSink(bus, doc["cluster"]["loggers"], clock=past)
        stats.startService()
        self.addCleanup(stats.stopService)
        await deferLater(reactor, 0.5, lambda: None)
        stats.emit_stats("live", "router", {"requests": 42, "status_2xx": 42})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = subprocess.run([*cli, "stats", "--app", "live", "--json", "--resolution", "10"],
                                 text=True, env=env, capture_output=True, timeout=60)
            if '"requests"' in got.stdout:
                break
            await deferLater(reactor, 0.5, lambda: None)

        seen: dict[str, Any] = {}
        opened = deferToThread(self.browse, port, token, seen)
        deadline = time.monotonic() + 60
        while "live" not in seen and time.monotonic() < deadline:
            await deferLater(reactor, 0.2, lambda: None)
        sink.emit("live", "worker.1", "after the page opened")
        await opened
        self.assertIn("web.1 before the page opened", seen["first"])
        self.assertIn("worker.1 after the page opened", seen["later"])
        self.assertGreaterEqual(int(seen["chart_points"]), 1)
        self.assertIn("42 requests in the last hour", seen["chart_note"])

    def browse(self, port: int, token: str, seen: dict[str, Any]) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        driver = _driver()
        try:
            wait = WebDriverWait(driver, 30)
            driver.get(f"http://127.0.0.1:{port}/")
            wait.until(ec.visibility_of_element_located((By.ID, "token")))
            driver.find_element(By.ID, "token").send_keys(token)
            driver.find_element(By.ID, "signin").click()
            wait.until(ec.presence_of_element_located(
                (By.CSS_SELECTOR, "#apps tbody tr[data-app='live']")))
            driver.find_element(By.LINK_TEXT, "live").click()
            wait.until(lambda d: d.find_element(By.ID, "log").get_attribute("data-live"))
            wait.until(lambda d: "before the page opened" in d.find_element(By.ID, "log").text)
            seen["first"] = driver.find_element(By.ID, "log").text
            seen["live"] = True
            wait.until(lambda d: "after the page opened" in d.find_element(By.ID, "log").text)
            seen["later"] = driver.find_element(By.ID, "log").text
            wait.until(lambda d: d.find_element(By.ID, "stats-chart").get_attribute(
                "data-points") not in (None, "", "0"))
            seen["chart_points"] = driver.find_element(By.ID, "stats-chart").get_attribute(
                "data-points")
            seen["chart_note"] = driver.find_element(By.ID, "stats-note").text
        finally:
            driver.quit()
