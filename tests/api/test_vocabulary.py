"""One vocabulary (epio.domain): a process type the runner would refuse at placement is
refused where the user names it, by the API and by the store, with the same rule."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from epio.store import InvalidName
from tests.api.support import Harness


class ProcessTypeTests(TestCase):
    timeout = 30

    def setUp(self) -> Any:
        self.h = Harness()
        self.addCleanup(lambda: ensureDeferred(self.h.stop()))
        return ensureDeferred(self.h.start())

    def call(self, *args: Any, **kw: Any) -> Any:
        return ensureDeferred(self.h.call(*args, **kw))

    async def test_scale_refuses_a_name_the_runner_refuses(self) -> None:
        """PATCH formation with "Worker" (upper case), "1st" or a 31-character name is
        400 validation_failed naming the field, and nothing is stored; "worker" is
        accepted (200) and stored."""
        status, _, _ = await self.call("POST", "apps", token=self.h.alice_token,
                                       body={"name": "vocab"})
        self.assertEqual(status, 201)
        for bad in ["Worker", "1st", "_x", "w" * 31]:
            status, body, _ = await self.call(
                "PATCH", "apps/vocab/formation", token=self.h.alice_token,
                body={"processes": {bad: {"quantity": 1}}})
            self.assertEqual((status, body["error"]["code"]), (400, "validation_failed"), bad)
            self.assertIn(f"body.processes.{bad}", body["error"]["message"])
        self.assertEqual(await self.h.store.get_formation("vocab"), {})
        status, _, _ = await self.call("PATCH", "apps/vocab/formation",
                                       token=self.h.alice_token,
                                       body={"processes": {"worker": {"quantity": 1}}})
        self.assertEqual(status, 200)
        self.assertEqual(list(await self.h.store.get_formation("vocab")), ["worker"])

    async def test_store_refuses_a_name_the_runner_refuses(self) -> None:
        """The store, which the scheduler places from, refuses the same names."""
        await self.call("POST", "apps", token=self.h.alice_token, body={"name": "vocab"})
        for bad in ["Worker", "1st", "w" * 31]:
            with self.assertRaises(InvalidName):
                await self.h.store.set_formation("vocab", bad, 1)
