"""The api's gate: the starting api until the store is ready, then the full one, once."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from epio.api.service import ApiGate
from epio.api.spec import PREFIX
from epio.api.web import Api
from tests.api.support import Harness, settle


class GateTests(TestCase):
    timeout = 30

    def setUp(self) -> Any:
        self.h = Harness()
        self.addCleanup(lambda: ensureDeferred(self.h.stop()))
        return ensureDeferred(self.h.start())

    async def _get(self, stub: StubTreq, path: str) -> tuple[int, Any]:
        resp = await settle(stub.get("http://api" + PREFIX + "/" + path,
                                     headers={"Authorization": "Bearer " + self.h.admin_token}),
                            stub)
        return resp.code, json.loads(await settle(stub.content(resp), stub))

    async def test_starting_then_open(self) -> None:
        """Before it opens, the gate serves the starting api: an authenticated endpoint
        answers 503 ``starting`` and the OpenAPI document is served; once open on the
        full api the same request succeeds; it opens only once."""
        gate = ApiGate(Api(None).resource())
        stub = StubTreq(gate)
        status, body = await self._get(stub, "apps")
        self.assertEqual((status, body["error"]["code"]), (503, "starting"))
        status, doc = await self._get(stub, "openapi.json")
        self.assertEqual((status, doc["openapi"]), (200, "3.1.0"))
        self.assertFalse(gate.is_open)

        gate.open(self.h.api.resource())
        self.assertTrue(gate.is_open)
        status, body = await self._get(stub, "apps")
        self.assertEqual((status, body), (200, []))
        with self.assertRaises(RuntimeError):
            gate.open(Api(None).resource())
