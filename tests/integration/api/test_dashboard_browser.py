"""The dashboard in a real headless Chromium (Debian's chromium + chromedriver,
driven by Selenium): sign in with a token, see the app, see its processes,
reveal a masked config var; another user's app is not listed.

Needs ``chromium``, ``chromium-driver`` (apt) and ``selenium`` (PyPI).  When
they are missing the test FAILS saying so, unless ``EPIO_TEST_SKIP_BROWSER=1``.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from epio.api.service import make_site
from tests.api.support import DIGEST, Harness

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage", "--window-size=1200,900"]


def _driver() -> Any:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        why = "browser test needs " + ", ".join(missing)
        if os.environ.get("EPIO_TEST_SKIP_BROWSER") == "1":
            raise SkipTest(why)
        raise AssertionError(why + " (set EPIO_TEST_SKIP_BROWSER=1 to skip)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


class DashboardBrowserTests(TestCase):
    timeout = 90

    async def _setup(self) -> None:
        self.h = Harness()
        await self.h.start()
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            make_site(self.h.api, 1 << 20))
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        store = self.h.store
        alice = await store.get_user_by_name("alice")
        bob = await store.get_user_by_name("bob")
        await store.create_app("shop", alice.id)
        await store.create_app("bobs", bob.id)
        await store.set_config("shop", {"SECRET_KEY": "hunter2"})
        await store.create_release("shop", DIGEST, processes={"web": "gunicorn app:app"})
        await store.set_formation("shop", "web", 2)
        await self.h.add_runner("r1")
        for _ in range(3):
            await self.h.scheduler.reconcile()

    async def _teardown(self) -> None:
        await self.port.stopListening()
        await self.h.stop()

    def setUp(self) -> Any:
        self.addCleanup(lambda: ensureDeferred(self._teardown()))
        return ensureDeferred(self._setup())

    def browse(self) -> dict[str, Any]:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        driver = _driver()
        seen: dict[str, Any] = {}
        try:
            wait = WebDriverWait(driver, 20)
            driver.get(self.base + "/")
            wait.until(ec.visibility_of_element_located((By.ID, "token")))
            driver.find_element(By.ID, "token").send_keys("epio_wrong")
            driver.find_element(By.ID, "signin").click()
            wait.until(lambda d: d.find_element(By.ID, "signin-error").text)
            seen["bad_token_error"] = driver.find_element(By.ID, "signin-error").text
            driver.find_element(By.ID, "token").clear()
            driver.find_element(By.ID, "token").send_keys(self.h.alice_token)
            driver.find_element(By.ID, "signin").click()
            wait.until(ec.presence_of_element_located(
                (By.CSS_SELECTOR, "#apps tbody tr[data-app='shop']")))
            seen["apps"] = [r.get_attribute("data-app") for r in
                            driver.find_elements(By.CSS_SELECTOR, "#apps tbody tr")]
            seen["whoami"] = driver.find_element(By.ID, "whoami").text
            driver.find_element(By.LINK_TEXT, "shop").click()
            wait.until(ec.presence_of_element_located(
                (By.CSS_SELECTOR, "#processes tbody tr[data-process='web.2']")))
            seen["processes"] = [
                [c.text for c in r.find_elements(By.TAG_NAME, "td")][:3]
                for r in driver.find_elements(By.CSS_SELECTOR, "#processes tbody tr")]
            seen["url"] = driver.current_url
            row = driver.find_element(By.CSS_SELECTOR, "#config tbody tr[data-key='SECRET_KEY']")
            seen["masked"] = row.find_elements(By.TAG_NAME, "td")[1].text
            row.find_element(By.TAG_NAME, "button").click()
            seen["revealed"] = row.find_elements(By.TAG_NAME, "td")[1].text
            driver.get(self.base + "/dashboard/apps/bobs")
            wait.until(lambda d: d.find_element(By.ID, "error").text)
            seen["other_app_error"] = driver.find_element(By.ID, "error").text
        finally:
            driver.quit()
        return seen

    async def test_sign_in_see_app_and_processes(self) -> None:
        """Sign in with a token, see the app listed, open it and see its processes."""
        seen = await deferToThread(self.browse)
        self.assertIn("not valid", seen["bad_token_error"])
        self.assertEqual(seen["apps"], ["shop"])
        self.assertEqual(seen["whoami"], "alice")
        self.assertTrue(seen["url"].endswith("/dashboard/apps/shop"))
        self.assertEqual(seen["processes"], [["web.1", "v1", "healthy"],
                                             ["web.2", "v1", "healthy"]])
        self.assertNotIn("hunter2", seen["masked"])
        self.assertEqual(seen["revealed"], "hunter2")
        self.assertIn("no app named", seen["other_app_error"])
