"""The API over a real SQLite store: resources, auth, access rules, errors, OpenAPI.

Every response of every call here is validated against the OpenAPI document
(``Harness.call`` does it), so the document and the server cannot drift apart.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from epio.api.spec import PREFIX
from epio.api.web import OPERATIONS
from tests.api.support import Harness


class ApiTestCase(TestCase):
    timeout = 30

    def setUp(self) -> Any:
        self.h = Harness()
        self.addCleanup(lambda: ensureDeferred(self.h.stop()))
        return ensureDeferred(self.h.start())

    def call(self, *args: Any, **kw: Any) -> Any:
        return ensureDeferred(self.h.call(*args, **kw))


class AuthTests(ApiTestCase):
    async def test_no_token(self) -> None:
        """A request without a token is refused with 401 unauthorized and a Bearer challenge."""
        status, body, headers = await self.call("GET", "apps")
        self.assertEqual(status, 401)
        self.assertEqual(body["error"]["code"], "unauthorized")
        self.assertIn("Bearer", headers["www-authenticate"][0])

    async def test_bad_token(self) -> None:
        """A wrong token and a non-bearer scheme are both 401, never 500."""
        status, body, _ = await self.call("GET", "apps", token="epio_nope")
        self.assertEqual((status, body["error"]["code"]), (401, "unauthorized"))
        status, body, _ = await self.call("GET", "apps", raw=None,
                                          token=None, content_type=None)
        self.assertEqual(status, 401)

    async def test_whoami(self) -> None:
        """GET /user answers the token's owner, without any secret."""
        status, body, _ = await self.call("GET", "user", token=self.h.alice_token)
        self.assertEqual(status, 200)
        self.assertEqual(body["name"], "alice")
        self.assertNotIn(self.h.alice_token, str(body))

    async def test_one_time_login_code(self) -> None:
        """POST /login-codes (signed in) gives a code valid for 2 minutes; exchanging it
        (no token needed) gives a new token of its user, once: a second exchange, an
        expired code and a made-up one are all 400 invalid_login_code with the same
        sentence.  Only its sha256 is stored.  Without a token no code is made (401)."""
        status, _, _ = await self.call("POST", "login-codes", body={})
        self.assertEqual(status, 401)
        status, made, _ = await self.call("POST", "login-codes", token=self.h.alice_token,
                                          body={})
        self.assertEqual(status, 201)
        code = made["code"]
        self.assertTrue(code.startswith("epiolink_"))
        self.assertLess(abs(made["expires"] - self.h.store.now() - 120.0), 5.0)
        stored = await self.h.store.fetch_all("SELECT * FROM login_codes")
        self.assertEqual(len(stored), 1)
        self.assertNotIn(code, str(stored))
        status, body, _ = await self.call("POST", "login-codes/exchange", body={"code": code})
        self.assertEqual(status, 200, body)
        self.assertEqual(body["user"]["name"], "alice")
        self.assertNotEqual(body["token"], self.h.alice_token)
        status, me, _ = await self.call("GET", "user", token=body["token"])
        self.assertEqual((status, me["name"]), (200, "alice"))
        _, tokens, _ = await self.call("GET", "tokens", token=self.h.alice_token)
        self.assertIn("dashboard sign-in (epio login --web)",
                      [t["description"] for t in tokens])
        answers = []
        status, body, _ = await self.call("POST", "login-codes/exchange", body={"code": code})
        answers.append((status, body))
        _, old, _ = await self.call("POST", "login-codes", token=self.h.bob_token, body={})

        async def expire(tx: Any) -> None:
            await tx.execute("UPDATE login_codes SET expires = ?", (self.h.store.now() - 1,))

        await self.h.store.transaction(expire)
        status, body, _ = await self.call("POST", "login-codes/exchange",
                                          body={"code": old["code"]})
        answers.append((status, body))
        status, body, _ = await self.call("POST", "login-codes/exchange",
                                          body={"code": "epiolink_madeup"})
        answers.append((status, body))
        for status, body in answers:
            self.assertEqual((status, body["error"]["code"]), (400, "invalid_login_code"))
            self.assertIn("run `epio login --web` again", body["error"]["message"])
        self.assertEqual(await self.h.store.fetch_all("SELECT * FROM login_codes"), [])

    async def test_tokens(self) -> None:
        """A user can create a token, use it, list it (prefix only) and revoke it."""
        status, body, _ = await self.call("POST", "tokens", token=self.h.alice_token,
                                          body={"description": "laptop"})
        self.assertEqual(status, 201)
        new = body["token"]
        status, me, _ = await self.call("GET", "user", token=new)
        self.assertEqual(me["name"], "alice")
        status, tokens, _ = await self.call("GET", "tokens", token=self.h.alice_token)
        self.assertEqual(len(tokens), 2)
        self.assertNotIn(new, str(tokens))
        status, _, _ = await self.call("DELETE", f"tokens/{body['info']['id']}",
                                       token=self.h.alice_token)
        self.assertEqual(status, 200)
        status, _, _ = await self.call("GET", "user", token=new)
        self.assertEqual(status, 401)

    async def test_last_admin_token_refused(self) -> None:
        """An admin revoking the last admin token gets 409 last_admin_token and keeps
        access; with a second admin token, the first can be revoked."""
        status, tokens, _ = await self.call("GET", "tokens", token=self.h.admin_token)
        self.assertEqual(len(tokens), 1)
        status, body, _ = await self.call("DELETE", f"tokens/{tokens[0]['id']}",
                                          token=self.h.admin_token)
        self.assertEqual((status, body["error"]["code"]), (409, "last_admin_token"))
        self.assertIn("last admin token", body["error"]["message"])
        status, me, _ = await self.call("GET", "user", token=self.h.admin_token)
        self.assertEqual((status, me["name"]), (200, "admin"))
        status, new, _ = await self.call("POST", "tokens", token=self.h.admin_token,
                                         body={"description": "spare"})
        self.assertEqual(status, 201)
        status, _, _ = await self.call("DELETE", f"tokens/{tokens[0]['id']}",
                                       token=new["token"])
        self.assertEqual(status, 200)
        status, body, _ = await self.call("DELETE", f"tokens/{new['info']['id']}",
                                          token=new["token"])
        self.assertEqual((status, body["error"]["code"]), (409, "last_admin_token"))

    async def test_users_admin_only(self) -> None:
        """Only admins list and create users; a created user gets a working token."""
        status, body, _ = await self.call("GET", "users", token=self.h.alice_token)
        self.assertEqual((status, body["error"]["code"]), (403, "forbidden"))
        status, body, _ = await self.call("POST", "users", token=self.h.admin_token,
                                          body={"name": "carol"})
        self.assertEqual(status, 201)
        status, me, _ = await self.call("GET", "user", token=body["token"])
        self.assertEqual(me["name"], "carol")


class AppTests(ApiTestCase):
    async def test_create_list_show_delete(self) -> None:
        """An app is created, listed for its owner only, shown with its URL, deleted."""
        status, app, _ = await self.call("POST", "apps", token=self.h.alice_token,
                                         body={"name": "hello"})
        self.assertEqual(status, 201)
        self.assertEqual(app["owner"], "alice")
        self.assertEqual(app["url"], "http://hello.localhost:8080/")
        _, apps, _ = await self.call("GET", "apps", token=self.h.alice_token)
        self.assertEqual([a["name"] for a in apps], ["hello"])
        _, apps, _ = await self.call("GET", "apps", token=self.h.bob_token)
        self.assertEqual(apps, [])
        status, body, _ = await self.call("POST", "apps", token=self.h.bob_token,
                                          body={"name": "hello"})
        self.assertEqual((status, body["error"]["code"]), (409, "conflict"))
        status, _, _ = await self.call("DELETE", "apps/hello", token=self.h.alice_token)
        self.assertEqual(status, 200)
        status, _, _ = await self.call("GET", "apps/hello", token=self.h.alice_token)
        self.assertEqual(status, 404)

    async def test_list_matches_each_app(self) -> None:
        """GET /apps (every app read at once) says of each app what GET /apps/{app}
        says: its serving release (not a newer failed one), collaborators and healthy
        processes."""
        from epio.store import Instance

        store = self.h.store
        for name in ("one", "two", "three"):
            status, _, _ = await self.call("POST", "apps", token=self.h.alice_token,
                                           body={"name": name})
            self.assertEqual(status, 201)
        for version, outcome in ((1, "succeeded"), (2, "failed")):
            await store.create_release("one", "a" * 64, processes={"web": "gunicorn x"})
            d = await store.create_deploy("one", status="deploying")
            await store.update_deploy(d.id, status=outcome, release=version)
        await store.create_release("two", "b" * 64, processes={"web": "gunicorn x"})
        await store.add_collaborator("two", (await store.get_user_by_name("bob")).id)
        await store.upsert_instance(Instance("two-w1", "two", 1, "web", 1, "n1", "127.0.0.1",
                                             5000, "healthy", 1.0))
        _, apps, _ = await self.call("GET", "apps", token=self.h.alice_token)
        self.assertEqual([a["name"] for a in apps], ["one", "three", "two"])
        for listed in apps:
            _, alone, _ = await self.call("GET", f"apps/{listed['name']}",
                                          token=self.h.alice_token)
            self.assertEqual(listed, alone)
        by_name = {a["name"]: a for a in apps}
        self.assertEqual(by_name["one"]["release"], 1)
        self.assertEqual((by_name["two"]["release"], by_name["two"]["collaborators"],
                          by_name["two"]["processes"]), (1, ["bob"], {"web": 1}))
        self.assertEqual((by_name["three"]["release"], by_name["three"]["processes"]),
                         (None, {}))

    async def test_bad_name(self) -> None:
        """A malformed app name is a 400 invalid_app_name saying the rule in words."""
        status, body, _ = await self.call("POST", "apps", token=self.h.alice_token,
                                          body={"name": "Not_OK"})
        self.assertEqual((status, body["error"]["code"]), (400, "invalid_app_name"))
        self.assertEqual(body["error"]["message"], "'Not_OK' is not a valid app name: use "
                         "1-30 lowercase letters, digits and '-', starting with a letter and "
                         "not ending with '-' (like my-app)")

    async def test_collaborator(self) -> None:
        """A collaborator sees the app; they cannot delete it (403); removed, it is 404."""
        await self.call("POST", "apps", token=self.h.alice_token, body={"name": "team"})
        status, _, _ = await self.call("POST", "apps/team/collaborators",
                                       token=self.h.alice_token, body={"user": "bob"})
        self.assertEqual(status, 201)
        status, _, _ = await self.call("GET", "apps/team", token=self.h.bob_token)
        self.assertEqual(status, 200)
        status, body, _ = await self.call("DELETE", "apps/team", token=self.h.bob_token)
        self.assertEqual((status, body["error"]["code"]), (403, "forbidden"))
        await self.call("DELETE", "apps/team/collaborators/bob", token=self.h.alice_token)
        status, _, _ = await self.call("GET", "apps/team", token=self.h.bob_token)
        self.assertEqual(status, 404)

    async def test_config_makes_releases(self) -> None:
        """Setting and unsetting config vars each make a new release."""
        await self.call("POST", "apps", token=self.h.alice_token, body={"name": "cfg"})
        status, body, _ = await self.call("PATCH", "apps/cfg/config", token=self.h.alice_token,
                                          body={"GREETING": "hi", "DEBUG": "1"})
        self.assertEqual(status, 200)
        self.assertEqual(body["vars"], {"DEBUG": "1", "GREETING": "hi"})
        status, body, _ = await self.call("PATCH", "apps/cfg/config", token=self.h.alice_token,
                                          body={"DEBUG": None})
        self.assertEqual(body["vars"], {"GREETING": "hi"})
        _, releases, _ = await self.call("GET", "apps/cfg/releases", token=self.h.alice_token)
        self.assertEqual([r["version"] for r in releases], [2, 1])
        self.assertEqual(releases[0]["description"], "Unset DEBUG")
        self.assertTrue(releases[0]["current"])
        status, body, _ = await self.call("PATCH", "apps/cfg/config", token=self.h.alice_token,
                                          body={"1BAD": "x"})
        self.assertEqual(status, 400)

    async def test_domains(self) -> None:
        """Custom and wildcard domains are added; another account's hostname and the
        platform's names are refused with the answer of a malformed name (400
        validation_failed, one message); the app's built-in name is 409."""
        await self.call("POST", "apps", token=self.h.alice_token, body={"name": "one"})
        await self.call("POST", "apps", token=self.h.bob_token, body={"name": "two"})
        status, d, _ = await self.call("POST", "apps/one/domains", token=self.h.alice_token,
                                       body={"hostname": "www.example.com"})
        self.assertEqual(status, 201)
        status, d, _ = await self.call("POST", "apps/one/domains", token=self.h.alice_token,
                                       body={"hostname": "*.example.org"})
        self.assertEqual((status, d["wildcard"]), (201, True))
        _, malformed, _ = await self.call("POST", "apps/two/domains", token=self.h.bob_token,
                                          body={"hostname": "bad_name.example"})
        self.assertEqual(malformed["error"]["code"], "validation_failed")
        for host in ["www.example.com", "one.localhost", "a.example.org", "example.org"]:
            status, body, _ = await self.call("POST", "apps/two/domains",
                                              token=self.h.bob_token, body={"hostname": host})
            self.assertEqual((status, body), (400, malformed), host)
        status, body, _ = await self.call("POST", "apps/one/domains", token=self.h.alice_token,
                                          body={"hostname": "one.localhost"})
        self.assertEqual((status, body["error"]["code"]), (409, "conflict"))
        _, domains, _ = await self.call("GET", "apps/one/domains", token=self.h.alice_token)
        self.assertEqual([x["hostname"] for x in domains],
                         ["one.localhost", "*.example.org", "www.example.com"])
        status, _, _ = await self.call("DELETE", "apps/one/domains/www.example.com",
                                       token=self.h.alice_token)
        self.assertEqual(status, 200)

    async def test_nodes(self) -> None:
        """GET /nodes lists registered nodes (the api process and a runner) and whether they are alive, to admins only:
        control endpoints and which protections are off are not every user's business."""
        await self.h.add_runner("r1")
        status, nodes, _ = await self.call("GET", "nodes", token=self.h.admin_token)
        self.assertEqual(status, 200)
        self.assertEqual([(n["id"], n["alive"]) for n in nodes], [("api1", True), ("r1", True)])
        status, body, _ = await self.call("GET", "nodes", token=self.h.alice_token)
        self.assertEqual((status, body["error"]["code"]), (403, "forbidden"))


class PlatformDomainTests(TestCase):
    timeout = 30

    def setUp(self) -> Any:
        from epio.api.settings import ApiSettings

        self.h = Harness(ApiSettings(domain="apps.example.com", route_settle=0.0))
        self.addCleanup(lambda: ensureDeferred(self.h.stop()))
        return ensureDeferred(self.h.start())

    async def test_wildcard_cannot_cover_the_platform_domain(self) -> None:
        """*.example.com above apps.example.com would catch every unclaimed app name;
        it, the platform domain and names under it (but under the app's own name) are
        refused with the malformed-name answer; elsewhere wildcards work."""
        await self.h.call("POST", "apps", token=self.h.alice_token, body={"name": "one"})
        for host in ["*.example.com", "*.com", "x.apps.example.com", "*.apps.example.com",
                     "apps.example.com", "two.apps.example.com", "www.two.apps.example.com"]:
            status, body, _ = await self.h.call("POST", "apps/one/domains",
                                                token=self.h.alice_token, body={"hostname": host})
            self.assertEqual((status, body["error"]["code"]), (400, "validation_failed"), host)
        for host in ["*.example.org", "www.one.apps.example.com", "*.one.apps.example.com"]:
            status, _, _ = await self.h.call("POST", "apps/one/domains",
                                             token=self.h.alice_token, body={"hostname": host})
            self.assertEqual(status, 201, host)


class ErrorLayerTests(ApiTestCase):
    async def test_bad_json(self) -> None:
        """A body that is not JSON is 400 invalid_json."""
        status, body, _ = await self.call("POST", "apps", token=self.h.alice_token,
                                          raw=b"{nope", content_type="application/json")
        self.assertEqual((status, body["error"]["code"]), (400, "invalid_json"))

    async def test_wrong_content_type(self) -> None:
        """A JSON endpoint refuses another content type with 415."""
        status, body, _ = await self.call("POST", "apps", token=self.h.alice_token,
                                          raw=b"name=x", content_type="text/plain")
        self.assertEqual((status, body["error"]["code"]), (415, "unsupported_media_type"))

    async def test_oversize_json(self) -> None:
        """A JSON body over api.max_body_kb is 413."""
        status, body, _ = await self.call("PATCH", "apps/x/config", token=self.h.alice_token,
                                          body={"K": "v" * 5000})
        # the app does not exist: 404 comes first (no existence leak through size errors)
        self.assertEqual(status, 404)
        await self.call("POST", "apps", token=self.h.alice_token, body={"name": "x"})
        status, body, _ = await self.call("PATCH", "apps/x/config", token=self.h.alice_token,
                                          body={"K": "v" * 5000})
        self.assertEqual((status, body["error"]["code"]), (413, "payload_too_large"))

    async def test_oversize_upload(self) -> None:
        """A tarball over api.max_upload_mb is 413 and no deploy starts."""
        await self.call("POST", "apps", token=self.h.alice_token, body={"name": "big"})
        status, body, _ = await self.call("POST", "apps/big/deploys", token=self.h.alice_token,
                                          raw=b"x" * (65 * 1024),
                                          content_type="application/gzip")
        self.assertEqual((status, body["error"]["code"]), (413, "payload_too_large"))
        _, deploys, _ = await self.call("GET", "apps/big/deploys", token=self.h.alice_token)
        self.assertEqual(deploys, [])

    async def test_unknown_endpoint_and_method(self) -> None:
        """Unknown paths are JSON 404s; a wrong method is a JSON 405."""
        status, body, _ = await self.call("GET", "nothing/here", token=self.h.alice_token)
        self.assertEqual((status, body["error"]["code"]), (404, "not_found"))
        status, body, _ = await self.call("PUT", "apps", token=self.h.alice_token)
        self.assertEqual((status, body["error"]["code"]), (405, "method_not_allowed"))

    async def test_unknown_exception(self) -> None:
        """A bug becomes a generic 500 internal_error, logged, with no traceback."""

        async def broken(user: Any) -> Any:
            raise ZeroDivisionError("secret detail")

        self.h.platform.list_apps = broken  # type: ignore[method-assign]
        status, body, _ = await self.call("GET", "apps", token=self.h.alice_token)
        self.assertEqual((status, body["error"]["code"]), (500, "internal_error"))
        self.assertNotIn("secret detail", str(body))
        self.assertNotIn("Traceback", str(body))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class OpenApiTests(ApiTestCase):
    async def test_document(self) -> None:
        """The document is served without auth and lists every operation."""
        status, doc, _ = await self.call("GET", "openapi.json")
        self.assertEqual(status, 200)
        self.assertEqual(doc["openapi"], "3.1.0")
        count = sum(len(v) for v in doc["paths"].values())
        self.assertEqual(count, len(OPERATIONS))
        self.assertIn(PREFIX + "/apps/{app}/deploys/{deploy_id}", doc["paths"])

    async def test_every_app_path_is_404_for_others(self) -> None:
        """Walking every path of the document with a second user's token: every
        app-scoped endpoint answers 404 not_found, exactly as for a missing app."""
        await self.call("POST", "apps", token=self.h.alice_token, body={"name": "private"})
        await self.call("PATCH", "apps/private/config", token=self.h.alice_token,
                        body={"SECRET": "s3cret"})
        _, doc, _ = await self.call("GET", "openapi.json")
        checked = 0
        for path, methods in doc["paths"].items():
            if "{app}" not in path:
                continue
            for method, entry in methods.items():
                for app, token in [("private", self.h.bob_token), ("missing", self.h.alice_token)]:
                    url = path.replace("{app}", app).replace("{deploy_id}", "x").replace(
                        "{version}", "1").replace("{hostname}", "h.example.com").replace(
                        "{name}", "bob")
                    url = re.sub(r"\{\w+\}", "1", url)  # any other path parameter
                    kw: dict[str, Any] = {}
                    if "requestBody" in entry:
                        ctype = next(iter(entry["requestBody"]["content"]))
                        kw = {"raw": b"{}", "content_type": ctype}
                    status, body, _ = await self.call(method.upper(), url, token=token, **kw)
                    self.assertEqual((status, body["error"]["code"]), (404, "not_found"),
                                     f"{method} {url}")
                    self.assertNotIn("s3cret", str(body))
                checked += 1
        self.assertGreaterEqual(checked, 20)


class AppLimitsTests(TestCase):
    timeout = 30

    def setUp(self) -> Any:
        from epio.api.settings import ApiSettings
        from epio.store import AppLimits

        self.h = Harness(ApiSettings(app_limits=AppLimits(max_apps=2, changes=3, window=90.0),
                                     uids=(47000, 47001), destroyed_grace=1000.0))
        self.addCleanup(lambda: ensureDeferred(self.h.stop()))
        return ensureDeferred(self.h.start())

    async def test_limits_answer_429_with_retry_after(self) -> None:
        """Over the app quota: 429 app_quota_exceeded with Retry-After (the window, or
        the time until the user's first destroyed app is purged: destroyed apps count);
        over the change rate: 429 rate_limited with Retry-After within the window; an
        exhausted UID
        range: 503 app_uids_exhausted naming the range (all valid per the OpenAPI
        document); the app is not created in any case."""
        alice = self.h.alice_token
        for name in ("a1", "a2"):
            self.assertEqual((await self.h.call("POST", "apps", token=alice,
                                                body={"name": name}))[0], 201)
        status, body, headers = await self.h.call("POST", "apps", token=alice,
                                                  body={"name": "a3"})
        self.assertEqual((status, body["error"]["code"]), (429, "app_quota_exceeded"))
        self.assertEqual(headers["retry-after"], ["90"])
        status, body, headers = await self.h.call("POST", "apps", token=self.h.admin_token,
                                                  body={"name": "b1"})
        self.assertEqual((status, body["error"]["code"]), (503, "app_uids_exhausted"))
        self.assertIn("47000 to 47001", body["error"]["message"])
        await self.h.call("DELETE", "apps/a1", token=alice)  # destroyed: still counts
        status, body, headers = await self.h.call("POST", "apps", token=alice,
                                                  body={"name": "a3"})
        self.assertEqual((status, body["error"]["code"]), (429, "app_quota_exceeded"))
        self.assertTrue(990 <= int(headers["retry-after"][0]) <= 1000, headers)  # its purge
        status, _, _ = await self.h.call("DELETE", "destroyed-apps/a1", token=alice)
        self.assertEqual(status, 200)
        status, body, headers = await self.h.call("POST", "apps", token=alice,
                                                  body={"name": "a3"})
        self.assertEqual((status, body["error"]["code"]), (429, "rate_limited"))
        self.assertTrue(0 < int(headers["retry-after"][0]) <= 90, headers)
        status, _, _ = await self.h.call("GET", "apps/a3", token=alice)
        self.assertEqual(status, 404)


class OneSourceTests(ApiTestCase):
    """The OpenAPI document and the server agree: a body the document refuses is 400
    before any handler runs, one the document accepts is not refused for its form."""

    async def test_names_follow_the_store(self) -> None:
        """App and user names use the store's patterns: "ab-" (a trailing hyphen) and
        "ab\\n" (a trailing newline, which Python's "$" alone would let through) are
        400 invalid_app_name (the rule in words); "ab" is 201."""
        for name in ["ab-", "ab\n", "Ab"]:
            status, body, _ = await self.call("POST", "apps", token=self.h.alice_token,
                                              body={"name": name})
            self.assertEqual((status, body["error"]["code"]), (400, "invalid_app_name"),
                             name)
        status, _, _ = await self.call("POST", "apps", token=self.h.alice_token,
                                       body={"name": "ab"})
        self.assertEqual(status, 201)
        status, body, _ = await self.call("POST", "users", token=self.h.admin_token,
                                          body={"name": "carol", "email": "no-at-sign"})
        self.assertEqual((status, body["error"]["code"]), (400, "validation_failed"))
        self.assertIn("body.email", body["error"]["message"])
        status, _, _ = await self.call("POST", "users", token=self.h.admin_token,
                                       body={"name": "Carol.B", "email": "c@example.org"})
        self.assertEqual(status, 201)

    async def test_integral_numbers_are_integers(self) -> None:
        """JSON Schema counts 1.0 as an integer: {"version": 1.0} passes validation and
        reaches the rollback (404: the app has no release 1), while 1.5 is 400."""
        await self.call("POST", "apps", token=self.h.alice_token, body={"name": "rb"})
        status, body, _ = await self.call("POST", "apps/rb/rollback", token=self.h.alice_token,
                                          raw=b'{"version": 1.0}',
                                          content_type="application/json")
        self.assertEqual((status, body["error"]["code"]), (404, "not_found"), body)
        status, body, _ = await self.call("POST", "apps/rb/rollback", token=self.h.alice_token,
                                          raw=b'{"version": 1.5}',
                                          content_type="application/json")
        self.assertEqual((status, body["error"]["code"]), (400, "validation_failed"))

    async def test_run_commands_and_addons(self) -> None:
        """A command of [""] or ["", " "] and memory_mb on a postgres add-on are refused
        by the document's schemas (400 validation_failed, the schema's message)."""
        await self.call("POST", "apps", token=self.h.alice_token, body={"name": "cmd"})
        for command in [[""], ["", " "], ["ls", ""], []]:
            status, body, _ = await self.call("POST", "apps/cmd/runs", token=self.h.alice_token,
                                              body={"command": command, "detach": True})
            self.assertEqual((status, body["error"]["code"]), (400, "validation_failed"),
                             command)
            self.assertIn("non-empty strings", body["error"]["message"])
        status, body, _ = await self.call("POST", "apps/cmd/addons", token=self.h.alice_token,
                                          body={"kind": "postgres", "memory_mb": 64})
        self.assertEqual((status, body["error"]["code"]), (400, "validation_failed"))
        self.assertIn("memory_mb applies to redis add-ons only", body["error"]["message"])

    async def test_405_lists_the_allowed_methods(self) -> None:
        """A method an endpoint does not serve is 405 with an Allow header naming the
        ones it does."""
        status, body, headers = await self.call("PUT", "apps", token=self.h.alice_token)
        self.assertEqual((status, body["error"]["code"]), (405, "method_not_allowed"))
        self.assertEqual(headers["allow"], ["GET, HEAD, POST"])
