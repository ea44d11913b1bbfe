"""The certificate endpoints (GET/POST /apps/{app}/certs) through the real api on a
SQLite store: owner-scoped, validated, no key in any answer, in the OpenAPI document."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from epio.certs import records
from epio.certs.api import Certs
from epio.certs.crypto import unseal
from tests.api.support import Harness
from tests.certs.test_certs import CA, SECRET


class CertApiTests(TestCase):
    timeout = 30

    def setUp(self) -> Any:
        self.h = Harness()
        self.addCleanup(lambda: ensureDeferred(self.h.stop()))
        return ensureDeferred(self.start())

    async def start(self) -> None:
        await self.h.start()
        self.h.api.certs = Certs(self.h.store, SECRET, False, reactor)
        alice = self.h.alice_token
        await self.h.call("POST", "apps", token=alice, body={"name": "shop"})
        await self.h.call("POST", "apps/shop/domains", token=alice,
                          body={"hostname": "www.shop.test"})
        await self.h.call("POST", "apps/shop/collaborators", token=alice,
                          body={"user": "bob"})

    def call(self, *args: Any, **kw: Any) -> Any:
        return ensureDeferred(self.h.call(*args, **kw))

    async def test_owner_certificate(self) -> None:
        """The owner's valid certificate is kept (key sealed) and listed as serving; a
        mismatched key, a certificate for other names or a domain not the app's is a
        clear 400/404; a collaborator may list but not add (403); a stranger sees 404;
        no answer carries the key."""
        ca = CA()
        cert, key = ca.leaf(["www.shop.test"])
        _, other_key = ca.leaf(["www.shop.test"])
        wrong, wrong_key = ca.leaf(["api.shop.test"])
        body = {"hostname": "www.shop.test", "certificate": cert.decode(), "key": key.decode()}
        status, listed, _ = await self.call("GET", "apps/shop/certs", token=self.h.alice_token)
        self.assertEqual((status, listed[0]["state"], listed[0]["serving"]),
                         (200, "none", False))
        self.assertIn("acme.directory", listed[0]["last_error"])
        status, err, _ = await self.call("POST", "apps/shop/certs", token=self.h.alice_token,
                                         body={**body, "key": other_key.decode()})
        self.assertEqual(status, 400)
        self.assertIn("the key does not match the certificate", err["error"]["message"])
        status, err, _ = await self.call("POST", "apps/shop/certs", token=self.h.alice_token,
                                         body={**body, "certificate": wrong.decode(),
                                               "key": wrong_key.decode()})
        self.assertEqual(status, 400)
        self.assertIn("api.shop.test, not www.shop.test", err["error"]["message"])
        status, err, _ = await self.call("POST", "apps/shop/certs", token=self.h.alice_token,
                                         body={**body, "hostname": "other.test"})
        self.assertEqual(status, 404)
        status, _, _ = await self.call("POST", "apps/shop/certs", token=self.h.bob_token,
                                       body=body)
        self.assertEqual(status, 403)
        status, _, _ = await self.call("GET", "apps/shop/certs", token=self.h.admin_token)
        self.assertEqual(status, 200)
        stranger = (await self.h.store.create_token(
            (await self.h.store.create_user("carol")).id)).token
        status, _, _ = await self.call("GET", "apps/shop/certs", token=stranger)
        self.assertEqual(status, 404)
        status, added, _ = await self.call("POST", "apps/shop/certs", token=self.h.alice_token,
                                           body=body)
        self.assertEqual((status, added["source"], added["state"]), (201, "owner", "issued"))
        self.assertNotIn("PRIVATE", str(added))
        status, listed, _ = await self.call("GET", "apps/shop/certs", token=self.h.bob_token)
        self.assertEqual((listed[0]["source"], listed[0]["serving"]), ("owner", True))
        self.assertNotIn("PRIVATE", str(listed))
        (rec,) = await records.list_certs(self.h.store, "shop")
        self.assertNotIn(b"PRIVATE", (rec.key_sealed or "").encode())
        self.assertEqual(unseal(SECRET, rec.key_sealed or "", "www.shop.test"), key)

    async def test_in_openapi(self) -> None:
        """Both operations are in the OpenAPI document."""
        status, doc, _ = await self.call("GET", "/api/v1/openapi.json")
        ops = {op["operationId"] for path in doc["paths"].values() for op in path.values()}
        self.assertLessEqual({"listCertificates", "addCertificate"}, ops)
