"""Add-on and backup endpoints over a real SQLite store, with fake runners, a fake shared
PostgreSQL and fake backup nodes (every response validated against the OpenAPI document by
the api tests' Harness)."""

from __future__ import annotations

import io
import tarfile
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from epio.addons import db_identifier
from epio.addons.postgres import PostgresCredentials
from epio.addons.services import REDIS_TYPE
from epio.api.addons import Addons, AddonSettings
from epio.bus import RemoteError, RequestTimeout
from tests.api.support import Harness, settle

BACKUP_A, BACKUP_B = "tcp://backup-a:7741", "tcp://backup-b:7741"


def _tarball(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


class FakeShared:
    """The shared PostgreSQL server, in memory."""

    def __init__(self) -> None:
        self.databases: dict[str, str] = {}

    async def provision(self, app: str) -> PostgresCredentials:
        password = f"pw-{app}-{len(self.databases)}"
        self.databases[app] = password
        name = db_identifier(app)
        return PostgresCredentials(app, "127.0.0.1", 5432, name, name, password)

    async def deprovision(self, app: str) -> None:
        self.databases.pop(app, None)

    async def exists(self, app: str) -> bool:
        return app in self.databases


class FakeBackupNodes:
    """Backup nodes answering backup.* (keyed by endpoint); the rest goes to the runners."""

    def __init__(self, runners: Any) -> None:
        self.runners = runners
        self.catalogs: dict[str, list[dict[str, Any]]] = {BACKUP_A: [], BACKUP_B: []}
        self.down: set[str] = set()
        self.fail_next = ""
        self.archived: list[dict[str, Any]] = []  # in the offsite archive only (a wiped node)
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.n = 0

    async def request(self, endpoint: str, type: str, body: dict[str, Any],
                      timeout: float | None = None) -> dict[str, Any]:
        if not type.startswith("backup."):
            return await self.runners.request(endpoint, type, body, timeout)
        self.requests.append((endpoint, type, body))
        if endpoint in self.down:
            raise RequestTimeout(type, endpoint, timeout or 1.0)
        mine = self.catalogs[endpoint]
        if type == "backup.list":
            return {"backups": [r for r in mine if r["app"] == body["app"]]}
        if type == "backup.create":
            self.n += 1
            record = {"id": f"b{self.n}", "app": body["app"], "kind": body.get("kind", "postgres"),
                      "created": float(self.n), "status": "verified", "size": 10,
                      "sha256": "ab" * 32, "source": "db", "counts": {"public.t": 3},
                      "error": "", "finished": float(self.n)}
            if self.fail_next:
                record.update(status="failed", error=self.fail_next)
                self.fail_next = ""
            mine.append(record)
            return {"backups": [record]}
        if type == "backup.restore":
            return {"app": body["app"], "id": body["id"], "kept_as": "app_x_pre_1"}
        if type == "backup.adopt":  # found in the node's offsite archive, or not found
            for r in self.archived:
                if (r["app"], r["id"]) == (body["app"], body["id"]):
                    mine.append(r)
                    return {"backup": r}
            raise RemoteError("backup_not_found", f"no backup {body['id']}")
        if type == "backup.fetch":
            return {"id": body["id"], "offset": body["offset"], "size": 4, "data": b"PGDM",
                    "eof": True, "sha256": "x", "status": "verified"}
        raise RemoteError("unknown_type", type)


class AddonApiTests(TestCase):
    timeout = 30

    def setUp(self) -> Any:
        self.h = Harness()
        self.addCleanup(lambda: ensureDeferred(self.h.stop()))
        return ensureDeferred(self.start())

    async def start(self) -> None:
        await self.h.start()
        self.shared = FakeShared()
        self.backups = FakeBackupNodes(self.h.runners)
        self.probed: list[str] = []

        async def probe(addon: Any) -> None:
            self.probed.append(addon.kind)

        from twisted.internet import reactor

        self.addons = Addons(self.h.store, self.backups, reactor,
                             AddonSettings(backup_endpoints=(BACKUP_A, BACKUP_B),
                                           reach_timeout=1.0),
                             shared=self.shared, scheduler=self.h.scheduler, probe=probe)
        self.h.api.addons = self.h.platform.addons = self.h.deployer.addons = self.addons
        self.h.deployer.control = self.backups
        await self.call("POST", "apps", body={"name": "shop"})

    def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        return self.h.call(method, path, token=token or self.h.alice_token, body=body)

    async def test_create_sets_database_url_in_a_release(self) -> None:
        """POST addons provisions, sets DATABASE_URL in a new release, never answers the
        password; a second one is 409; GET lists and shows it."""
        status, addon, _ = await self.call("POST", "apps/shop/addons", {"kind": "postgres"})
        self.assertEqual(status, 201, addon)
        self.assertEqual((addon["plan"], addon["state"], addon["config_var"]),
                         ("shared", "ready", "DATABASE_URL"))
        password = self.shared.databases["shop"]
        self.assertNotIn(password, str(addon))
        _, config, _ = await self.call("GET", "apps/shop/config")
        self.assertIn(password, config["vars"]["DATABASE_URL"])
        _, releases, _ = await self.call("GET", "apps/shop/releases")
        self.assertEqual(releases[0]["config_keys"], ["DATABASE_URL"])
        status, body, _ = await self.call("POST", "apps/shop/addons", {"kind": "postgres"})
        self.assertEqual((status, body["error"]["code"]), (409, "conflict"))
        _, listed, _ = await self.call("GET", "apps/shop/addons")
        self.assertEqual([a["kind"] for a in listed], ["postgres"])
        _, one, _ = await self.call("GET", "apps/shop/addons/postgres")
        self.assertNotIn(password, str(one))
        status, body, _ = await self.call("GET", "apps/shop/addons/redis")
        self.assertEqual(status, 404)

    async def test_bad_requests(self) -> None:
        """Unknown kinds and plans are refused by the schema; redis cannot be shared."""
        status, body, _ = await self.call("POST", "apps/shop/addons", {"kind": "mysql"})
        self.assertEqual((status, body["error"]["code"]), (400, "validation_failed"))
        status, body, _ = await self.call("POST", "apps/shop/addons",
                                          {"kind": "redis", "plan": "shared"})
        self.assertEqual((status, body["error"]["code"]), (400, "validation_failed"))

    async def test_dedicated_addon_before_the_first_deploy(self) -> None:
        """``epio addons create redis`` before any deploy: the server starts on the
        runner's empty image (image_digest "") and REDIS_URL is set, ready for the
        first build."""
        await self.h.add_runner("r1")
        status, addon, _ = await self.call("POST", "apps/shop/addons", {"kind": "redis"})
        self.assertEqual((status, addon["state"]), (201, "ready"))
        start = next(b for _, t, b in self.h.runners.requests
                     if t == "runner.start" and b["process_type"] == REDIS_TYPE)
        self.assertEqual(start["image_digest"], "")
        _, config, _ = await self.call("GET", "apps/shop/config")
        self.assertTrue(config["vars"]["REDIS_URL"].startswith("redis://"))

    async def test_services_are_provisioned_before_the_build(self) -> None:
        """An upload whose epio.ini asks for postgres and redis: both are provisioned
        before runner.build is sent, and the build's env carries DATABASE_URL and
        REDIS_URL (the same values the release gets); the deploy log says so in order."""
        await self.h.add_runner("r1")
        ini = b"[wsgi]\nentrypoint = app:app\n\n[services]\npostgres = true\nredis = true\n"
        self.h.runners.manifest = {"processes": {"web": "gunicorn app:app"},
                                   "services": {"postgres": "shared", "redis": "dedicated"}}
        d = await self.run_deploy(_tarball({"./epio.ini": ini, "app.py": b"app = None\n"}))
        self.h.scheduler.lose_leadership()
        self.assertEqual(d["status"], "succeeded", d["log"])
        types = [t for _, t, b in self.h.runners.requests
                 if t == "runner.build" or (t == "runner.start"
                                            and b["process_type"] == REDIS_TYPE)]
        self.assertEqual(types[:2], ["runner.start", "runner.build"])
        build = next(b for _, t, b in self.h.runners.requests if t == "runner.build")
        _, release, _ = await self.call("GET", "apps/shop/releases/1")
        self.assertEqual(release["config_keys"], ["DATABASE_URL", "REDIS_URL"])
        _, config, _ = await self.call("GET", "apps/shop/config")
        for var in ("DATABASE_URL", "REDIS_URL"):
            self.assertEqual(build["env"][var], config["vars"][var])
        log = d["log"]
        self.assertLess(log.index("Provisioning dedicated redis"), log.index("Building on"))
        self.assertEqual(log.count("Provisioning"), 2)  # not again after the build

    async def test_destroy_takes_a_final_backup(self) -> None:
        """DELETE: a failed final backup drops nothing (409) unless force; a verified one
        is answered, the database dropped and DATABASE_URL unset in a new release."""
        await self.call("POST", "apps/shop/addons", {"kind": "postgres"})
        self.backups.fail_next = "verification failed: row counts differ in public.t"
        status, body, _ = await self.call("DELETE", "apps/shop/addons/postgres")
        self.assertEqual((status, body["error"]["code"]), (409, "final_backup_failed"))
        self.assertIn("row counts differ", body["error"]["message"])
        self.assertIn("shop", self.shared.databases)
        status, body, _ = await self.call("DELETE", "apps/shop/addons/postgres")
        self.assertEqual(status, 200, body)
        self.assertEqual(body["final_backup"]["status"], "verified")
        self.assertNotIn("shop", self.shared.databases)
        _, config, _ = await self.call("GET", "apps/shop/config")
        self.assertNotIn("DATABASE_URL", config["vars"])
        self.backups.fail_next = "boom"
        await self.call("POST", "apps/shop/addons", {"kind": "postgres"})
        status, body, _ = await self.call("DELETE", "apps/shop/addons/postgres?force=true")
        self.assertEqual(status, 200, body)
        self.assertEqual(body["final_backup"]["status"], "failed")  # reported, not hidden
        self.assertEqual(self.shared.databases, {})

    async def test_destroy_without_backup_node_refuses(self) -> None:
        """Backup nodes configured but none answering: DELETE of the add-on and of the app
        are 409 final_backup_failed and drop nothing; force drops without a final backup;
        with no backup node configured at all the add-on is dropped without one."""
        from attrs import evolve

        await self.call("POST", "apps/shop/addons", {"kind": "postgres"})
        self.backups.down = {BACKUP_A, BACKUP_B}
        status, body, _ = await self.call("DELETE", "apps/shop/addons/postgres")
        self.assertEqual((status, body["error"]["code"]), (409, "final_backup_failed"))
        self.assertIn("no backup node answers", body["error"]["message"])
        self.assertIn("shop", self.shared.databases)
        status, body, _ = await self.call("DELETE", "apps/shop")
        self.assertEqual((status, body["error"]["code"]), (409, "final_backup_failed"))
        self.assertIn("shop", self.shared.databases)
        status, _, _ = await self.call("GET", "apps/shop/addons/postgres")
        self.assertEqual(status, 200)
        status, body, _ = await self.call("DELETE", "apps/shop/addons/postgres?force=true")
        self.assertEqual((status, body["final_backup"]), (200, None))
        self.assertEqual(self.shared.databases, {})
        self.addons.settings = evolve(self.addons.settings, backup_endpoints=())
        await self.call("POST", "apps/shop/addons", {"kind": "postgres"})
        status, body, _ = await self.call("DELETE", "apps/shop/addons/postgres")
        self.assertEqual((status, body["final_backup"]), (200, None))
        self.assertEqual(self.shared.databases, {})

    async def test_backups_across_nodes(self) -> None:
        """list merges every answering node (failed ones shown failed); create answers the
        records; restore of a failed backup is 409; no node answering is 503."""
        await self.call("POST", "apps/shop/addons", {"kind": "postgres"})
        self.backups.catalogs[BACKUP_B].append(
            {"id": "old", "app": "shop", "kind": "postgres", "created": 0.5, "status": "failed",
             "error": "interrupted", "size": 0, "sha256": "", "source": "db", "counts": {}})
        status, made, _ = await self.call("POST", "apps/shop/backups", {})
        self.assertEqual((status, [b["status"] for b in made]), (201, ["verified"]))
        _, listed, _ = await self.call("GET", "apps/shop/backups")
        self.assertEqual([(b["id"], b["status"], b["verified"]) for b in listed],
                         [("b1", "verified", True), ("old", "failed", False)])
        status, body, _ = await self.call("POST", "apps/shop/backups/old/restore", {})
        self.assertEqual((status, body["error"]["code"]), (409, "backup_failed"))
        status, body, _ = await self.call("POST", "apps/shop/backups/nope/restore", {})
        self.assertEqual((status, body["error"]["code"]), (404, "backup_not_found"))
        status, body, _ = await self.call("POST", "apps/shop/backups/b1/restore", {})
        self.assertEqual((status, body["into"], body["kept_as"]), (200, "shop", "app_x_pre_1"))
        self.backups.down = {BACKUP_A}
        _, listed, _ = await self.call("GET", "apps/shop/backups")
        self.assertEqual([b["id"] for b in listed], ["old"])
        self.backups.down = {BACKUP_A, BACKUP_B}
        status, body, _ = await self.call("GET", "apps/shop/backups")
        self.assertEqual((status, body["error"]["code"]), (503, "backups_unavailable"))

    async def test_restore_of_a_backup_only_in_the_archive(self) -> None:
        """A backup no node lists (its disk was wiped) is asked for with backup.adopt:
        found in the archive it is restored (its archive status listed afterwards);
        not found there it is 404 backup_not_found and nothing is restored."""
        await self.call("POST", "apps/shop/addons", {"kind": "postgres"})
        self.backups.archived.append(
            {"id": "arch1", "app": "shop", "kind": "postgres", "created": 0.5,
             "status": "verified", "size": 9, "sha256": "ab" * 32, "source": "db",
             "counts": {"public.t": 3}, "archive": "archived",
             "archive_name": "shop/arch1.epioarc", "local": True})
        status, body, _ = await self.call("POST", "apps/shop/backups/arch1/restore", {})
        self.assertEqual((status, body["kept_as"]), (200, "app_x_pre_1"), body)
        adopted = [t for _, t, b in self.backups.requests if t == "backup.adopt"]
        restored = [b["id"] for _, t, b in self.backups.requests if t == "backup.restore"]
        self.assertEqual((adopted, restored), (["backup.adopt"], ["arch1"]))
        _, listed, _ = await self.call("GET", "apps/shop/backups")
        self.assertEqual([(b["id"], b["archive"], b["local"]) for b in listed],
                         [("arch1", "archived", True)])
        status, body, _ = await self.call("POST", "apps/shop/backups/gone9/restore", {})
        self.assertEqual((status, body["error"]["code"]), (404, "backup_not_found"))
        self.assertEqual([b["id"] for _, t, b in self.backups.requests
                          if t == "backup.restore"], ["arch1"])

    async def test_restore_to_app_needs_access(self) -> None:
        """to_app must be an app the caller may see (404 otherwise, as for a missing one)."""
        await self.call("POST", "apps/shop/addons", {"kind": "postgres"})
        await self.call("POST", "apps", body={"name": "other"}, token=self.h.bob_token)
        await self.call("POST", "apps/shop/backups", {})
        status, body, _ = await self.call("POST", "apps/shop/backups/b1/restore",
                                          {"to_app": "other"})
        self.assertEqual((status, body["error"]["code"]), (404, "not_found"))
        await self.call("POST", "apps", body={"name": "mine"})
        status, body, _ = await self.call("POST", "apps/shop/backups/b1/restore",
                                          {"to_app": "mine"})
        self.assertEqual((status, body["error"]["code"]), (409, "no_addon"))

    async def run_deploy(self, tarball: bytes = b"tarball-bytes") -> dict[str, Any]:
        status, body, _ = await self.h.call("POST", "apps/shop/deploys", token=self.h.alice_token,
                                            raw=tarball, content_type="application/gzip")
        self.assertEqual(status, 202, body)
        self.h.scheduler.become_leader()
        await settle(ensureDeferred(self.h.deployer.wait(body["id"])), timeout=20)
        _, body, _ = await self.call("GET", f"apps/shop/deploys/{body['id']}")
        return dict(body)

    async def test_deploy_provisions_services_before_the_release(self) -> None:
        """[services] postgres/redis: provisioned during the deploy, the release and its
        instances get DATABASE_URL and REDIS_URL; the dedicated Redis is a runner instance
        the scheduler leaves alone; destroying the app takes final backups and stops
        them, keeping their data; restoring starts the Redis again on its data; purging
        drops them."""
        await self.h.add_runner("r1")
        self.h.runners.manifest = {"processes": {"web": "gunicorn app:app"},
                                   "services": {"postgres": "shared", "redis": "dedicated"},
                                   "redis_memory_mb": 8}
        d = await self.run_deploy()
        self.h.scheduler.lose_leadership()
        self.assertEqual(d["status"], "succeeded", d["log"])
        self.assertIn("Provisioning shared postgres", d["log"])
        self.assertIn("Provisioning dedicated redis", d["log"])
        _, release, _ = await self.call("GET", "apps/shop/releases/1")
        self.assertEqual(release["config_keys"], ["DATABASE_URL", "REDIS_URL"])
        redis = [i for i in self.h.runners.running("shop") if i["process_type"] == REDIS_TYPE]
        self.assertEqual(len(redis), 1)
        self.assertEqual(redis[0]["release"], 0)
        start = next(b for _, t, b in self.h.runners.requests
                     if t == "runner.start" and b["process_type"] == REDIS_TYPE)
        password = (await self.addons.get(
            await self.h.store.get_app("shop"), "redis")).password
        self.assertNotIn(password, " ".join(start["command"]))
        self.assertIn("maxmemory 8mb", start["env"]["EPIO_SERVICE_CONFIG"])
        web = [i for i in self.h.runners.running("shop") if i["process_type"] == "web"]
        self.assertIn(password, web[0]["env"]["REDIS_URL"])
        # the scheduler does not take the Redis for an orphan or an extra
        self.h.scheduler.become_leader()
        for _ in range(3):
            await settle(ensureDeferred(self.h.scheduler.reconcile()))
        self.h.scheduler.lose_leadership()
        self.assertEqual(len([i for i in self.h.runners.running("shop")
                              if i["process_type"] == REDIS_TYPE]), 1)
        _, ps, _ = await self.call("GET", "apps/shop/ps")
        self.assertIn(("epio-redis", "healthy"), [(p["type"], p["state"]) for p in ps])
        # a second deploy keeps the same servers
        d = await self.run_deploy()
        self.h.scheduler.lose_leadership()
        self.assertEqual(d["status"], "succeeded", d["log"])
        self.assertEqual(len([i for i in self.h.runners.running("shop")
                              if i["process_type"] == REDIS_TYPE]), 1)
        # destroying the app: a final backup of each add-on, every server stopped, the
        # data kept (shared database, the Redis's data key) for the grace period
        status, _, _ = await self.call("DELETE", "apps/shop")
        self.assertEqual(status, 200)
        self.assertEqual(self.h.runners.running("shop"), [])
        finals = [b["kind"] for e, t, b in self.backups.requests if t == "backup.create"]
        self.assertEqual(sorted(finals), ["postgres", "redis"])
        self.assertIn("shop", self.shared.databases)
        _, listed, _ = await self.call("GET", "destroyed-apps")
        self.assertEqual(listed[0]["addons"], ["postgres", "redis"])
        self.h.scheduler.leader = True  # the keeper leaves a destroyed app's server alone
        self.assertEqual(await self.addons.keep_running(), 0)
        self.h.scheduler.leader = False
        # restored: the keeper starts the Redis again on its own data, same password
        before = (await self.addons.addons_of(await self.h.store.get_app("shop", True)))[1]
        status, _, _ = await self.call("POST", "destroyed-apps/shop/restore")
        self.assertEqual(status, 200)
        self.h.scheduler.leader = True
        self.assertEqual(await self.addons.keep_running(), 1)
        self.h.scheduler.leader = False
        app = await self.h.store.get_app("shop")
        after = await self.addons.get(app, "redis")
        self.assertEqual((after.password, after.options["data_key"]),
                         (before.password, before.options["data_key"]))
        start = [b for _, t, b in self.h.runners.requests
                 if t == "runner.start" and b["process_type"] == REDIS_TYPE][-1]
        self.assertIn(before.options["data_key"], start["env"]["EPIO_SERVICE_DIR"])
        # purged: the shared database dropped, the data dirs deleted, nothing left
        await self.call("DELETE", "apps/shop")
        status, _, _ = await self.call("DELETE", "destroyed-apps/shop")
        self.assertEqual(status, 200)
        self.assertEqual(self.shared.databases, {})
        self.assertEqual([a for _, a, _ in self.h.runners.purged], ["shop"])
        self.assertEqual(await self.addons.addons_of(app), [])

    async def test_keeper_restarts_a_lost_server(self) -> None:
        """A dedicated server whose instance the scheduler forgot (runner dead) is started
        again on its own node by the leader, and REDIS_URL follows its new port in a new
        release; a non-leader does nothing; a dead node is reported, not replaced."""
        await self.h.add_runner("r1")
        self.h.runners.manifest = {"processes": {"web": "gunicorn app:app"},
                                   "services": {"redis": "dedicated"}}
        d = await self.run_deploy()
        self.h.scheduler.lose_leadership()
        self.assertEqual(d["status"], "succeeded", d["log"])
        app = await self.h.store.get_app("shop")
        before = await self.addons.get(app, "redis")
        await self.h.store.delete_instance(str(before.instance))
        for endpoint in self.h.runners.instances:
            self.h.runners.instances[endpoint].pop(str(before.instance), None)
        self.assertEqual(await self.addons.keep_running(), 0)  # not the leader
        self.h.scheduler.leader = True
        self.assertEqual(await self.addons.keep_running(), 1)
        self.h.scheduler.leader = False
        after = await self.addons.get(app, "redis")
        self.assertNotEqual(after.instance, before.instance)
        self.assertEqual((after.node, after.password), ("r1", before.password))
        _, config, _ = await self.call("GET", "apps/shop/config")
        self.assertIn(f":{after.port}/0", config["vars"]["REDIS_URL"])
        _, releases, _ = await self.call("GET", "apps/shop/releases")
        self.assertEqual(releases[0]["description"], f"Dedicated redis moved to "
                                                     f"127.0.0.1:{after.port}")
        await self.h.store.delete_instance(str(after.instance))
        self.h.runners.down.add("tcp://r1:7731")
        await self.h.store.upsert_node("r1", ["runner"], "tcp://r1:7731", "boot")
        self.h.scheduler.leader = True
        self.assertEqual(await self.addons.keep_running(), 0)
        self.h.scheduler.leader = False
        self.assertEqual((await self.addons.get(app, "redis")).state, "failed")
        self.h.runners.down.clear()  # the runner is back: the next check starts it
        self.h.scheduler.leader = True
        self.assertEqual(await self.addons.keep_running(), 1)
        self.h.scheduler.leader = False
        self.assertEqual((await self.addons.get(app, "redis")).state, "ready")

    async def test_deploy_without_shared_server_warns(self) -> None:
        """postgres = true on a platform without a shared server: the deploy goes on and
        its log says DATABASE_URL is NOT set; creating the add-on by hand is a 503."""
        self.addons.shared = None
        await self.h.add_runner("r1")
        self.h.runners.manifest = {"processes": {"web": "gunicorn app:app"},
                                   "services": {"postgres": "shared"}}
        d = await self.run_deploy()
        self.h.scheduler.lose_leadership()
        self.assertEqual(d["status"], "succeeded", d["log"])
        self.assertIn("DATABASE_URL is NOT set", d["log"])
        self.assertIn("`postgres = dedicated` in [services]", d["log"])
        status, body, _ = await self.call("POST", "apps/shop/addons", {"kind": "postgres"})
        self.assertEqual((status, body["error"]["code"]), (503, "no_shared_postgres"))

    async def test_rollback_keeps_addon_urls(self) -> None:
        """Rolling back to a release made before the add-on keeps DATABASE_URL (the code
        and config roll back, the database does not)."""
        await self.h.add_runner("r1")
        d = await self.run_deploy()
        self.assertEqual(d["status"], "succeeded", d["log"])
        await self.call("PATCH", "apps/shop/config", {"GREETING": "hi"})
        await self.call("POST", "apps/shop/addons", {"kind": "postgres"})
        _, before, _ = await self.call("GET", "apps/shop/config")
        status, rel, _ = await self.call("POST", "apps/shop/rollback", {"version": 1})
        self.h.scheduler.lose_leadership()
        self.assertEqual(status, 201, rel)
        _, after, _ = await self.call("GET", "apps/shop/config")
        self.assertEqual(after["vars"], {"DATABASE_URL": before["vars"]["DATABASE_URL"]})
        self.assertEqual(rel["config_keys"], ["DATABASE_URL"])

    async def test_deploy_reports_a_dedicated_server_that_does_not_answer(self) -> None:
        """A deploy that finds its dedicated server running but not answering within
        service_boot_timeout fails with that reason in its log (an AddonError), not as an
        internal error with a traceback."""
        from attrs import evolve

        from epio.store.addons import put_addon

        await self.h.add_runner("r1")
        self.h.runners.manifest = {"processes": {"web": "gunicorn app:app"},
                                   "services": {"redis": "dedicated"}}
        d = await self.run_deploy()
        self.h.scheduler.lose_leadership()
        self.assertEqual(d["status"], "succeeded", d["log"])
        app = await self.h.store.get_app("shop")
        addon = await self.addons.get(app, "redis")
        await put_addon(self.h.store, evolve(addon, state="failed"))  # slow last time

        async def refused(addon: Any) -> None:
            raise ConnectionRefusedError()

        self.addons.probe = refused
        self.addons.settings = evolve(self.addons.settings, service_boot_timeout=0.5)
        d = await self.run_deploy()
        self.h.scheduler.lose_leadership()
        self.assertEqual(d["status"], "failed", d["log"])
        self.assertIn("redis add-on: the dedicated redis server on r1 is not accepting "
                      "connections after 0.5s (ConnectionRefusedError)", d["log"])
        self.assertNotIn("internal error", d["log"].lower())
        self.assertNotIn("Traceback", d["log"])

    async def test_recreated_dedicated_postgres_gets_a_new_data_dir(self) -> None:
        """Destroying a dedicated PostgreSQL and creating another starts the new server in
        a data directory of its own (not the old cluster, whose role has the old
        password); the keeper restarting the same add-on keeps its directory."""
        import re

        from epio.addons.services import POSTGRES_TYPE

        await self.h.add_runner("r1")
        self.h.runners.manifest = {"processes": {"web": "gunicorn app:app"},
                                   "services": {"postgres": "dedicated"}}
        d = await self.run_deploy()
        self.h.scheduler.lose_leadership()
        self.assertEqual(d["status"], "succeeded", d["log"])

        def data_dirs() -> list[str]:
            return [re.search(r'd="\$EPIO_DATA_DIR/([^"]+)"', b["command"][2]).group(1)
                    for _, t, b in self.h.runners.requests
                    if t == "runner.start" and b["process_type"] == POSTGRES_TYPE]

        first = data_dirs()
        self.assertEqual(len(first), 1)
        self.assertRegex(first[0], r"^\.epio-postgres-[0-9a-f]{16}$")
        app = await self.h.store.get_app("shop")
        old = await self.addons.get(app, "postgres")
        await self.h.store.delete_instance(str(old.instance))  # runner lost: keeper restarts
        for endpoint in self.h.runners.instances:
            self.h.runners.instances[endpoint].pop(str(old.instance), None)
        self.h.scheduler.leader = True
        self.assertEqual(await self.addons.keep_running(), 1)
        self.h.scheduler.leader = False
        self.assertEqual(data_dirs(), first * 2)
        status, body, _ = await self.call("DELETE", "apps/shop/addons/postgres")
        self.assertEqual(status, 200, body)
        status, body, _ = await self.call("POST", "apps/shop/addons",
                                          {"kind": "postgres", "plan": "dedicated"})
        self.assertEqual(status, 201, body)
        dirs = data_dirs()
        self.assertEqual(len(dirs), 3)
        self.assertNotEqual(dirs[2], first[0])
        self.assertRegex(dirs[2], r"^\.epio-postgres-[0-9a-f]{16}$")

    async def test_service_stop_timeout_is_the_servers_grace(self) -> None:
        """``addons.service_stop_timeout`` from the config is the grace (seconds between
        the stop signal and SIGKILL) in the start body of both dedicated servers."""
        from epio.api.addons import AddonSettings
        from epio.config import validate

        settings = AddonSettings.from_config(validate({"addons": {"service_stop_timeout": 45}}))
        self.assertEqual(settings.service_stop_timeout, 45.0)
        self.addons.settings = settings
        await self.h.add_runner("r1")
        self.h.runners.manifest = {"processes": {"web": "gunicorn app:app"},
                                   "services": {"postgres": "dedicated", "redis": "dedicated"}}
        d = await self.run_deploy()
        self.h.scheduler.lose_leadership()
        self.assertEqual(d["status"], "succeeded", d["log"])
        graces = {b["process_type"]: b["grace"] for _, t, b in self.h.runners.requests
                  if t == "runner.start" and b["process_type"].startswith("epio-")}
        self.assertEqual(graces, {"epio-postgres": 45.0, "epio-redis": 45.0})
        with self.assertRaises(Exception) as cm:
            validate({"addons": {"service_stop_timeout": 0}})
        self.assertIn("service_stop_timeout", str(cm.exception))

    async def test_flagged_backups_are_listed_with_the_reason(self) -> None:
        """A backup node's flagged (verified but suspicious) backup is listed with its
        reason in ``suspicious``; an unflagged or failed one has ""; the CLI's table
        shows it in its FLAGGED column."""
        from epio.cli.backups import COLUMNS, _rows

        await self.call("POST", "apps/shop/addons", {"kind": "postgres"})
        why = "empty: the last good backup good1 held 30 rows"
        self.backups.catalogs[BACKUP_B] += [
            {"id": "good1", "app": "shop", "kind": "postgres", "created": 0.5,
             "status": "verified", "size": 9, "sha256": "ab" * 32, "source": "db",
             "counts": {"public.t": 30}},
            {"id": "empty2", "app": "shop", "kind": "postgres", "created": 0.7,
             "status": "verified", "size": 1, "sha256": "ab" * 32, "source": "db",
             "counts": {}, "suspicious": why},
            {"id": "bad3", "app": "shop", "kind": "postgres", "created": 0.8,
             "status": "failed", "error": "x", "size": 0, "sha256": "", "source": "db",
             "counts": {}, "suspicious": "stale"}]
        status, listed, _ = await self.call("GET", "apps/shop/backups")
        self.assertEqual(status, 200)
        self.assertEqual([(b["id"], b["suspicious"]) for b in listed],
                         [("bad3", ""), ("empty2", why), ("good1", "")])
        self.assertEqual(COLUMNS[-1], "FLAGGED")
        self.assertEqual([r[-1] for r in _rows(listed)], ["-", f"FLAGGED: {why}", "-"])

    async def test_snapshots_of_a_shared_database_are_refused(self) -> None:
        """A shared PostgreSQL has no btrfs snapshots: listing or restoring them is 409
        no_snapshots, nothing is asked of a runner; an add-on the app does not have is 404."""
        await self.call("POST", "apps/shop/addons", {"kind": "postgres"})
        before = len(self.h.runners.requests)
        status, body, _ = await self.call("GET", "apps/shop/addons/postgres/snapshots")
        self.assertEqual((status, body["error"]["code"]), (409, "no_snapshots"))
        status, body, _ = await self.call(
            "POST", "apps/shop/addons/postgres/snapshots/20260101T000000Z/restore", {})
        self.assertEqual((status, body["error"]["code"]), (409, "no_snapshots"))
        self.assertEqual(len(self.h.runners.requests), before)
        status, body, _ = await self.call("GET", "apps/shop/addons/redis/snapshots")
        self.assertEqual(status, 404, body)

    async def test_snapshots_when_the_runner_does_not_answer(self) -> None:
        """The dedicated server's runner is alive in the store but does not answer: the
        listing is 503 addons_unavailable (asked of that runner, with the add-on's own
        data dir), never a 500."""
        await self.h.add_runner("r1")
        self.h.runners.manifest = {"processes": {"web": "gunicorn app:app"},
                                   "services": {"redis": "dedicated"}}
        d = await self.run_deploy()
        self.h.scheduler.lose_leadership()
        self.assertEqual(d["status"], "succeeded", d["log"])
        self.h.runners.down = set(self.h.runners.instances)
        status, body, _ = await self.call("GET", "apps/shop/addons/redis/snapshots")
        self.assertEqual((status, body["error"]["code"]), (503, "addons_unavailable"))
        [asked] = [b for _, t, b in self.h.runners.requests if t == "runner.snapshots"]
        key = (await self.addons.get(await self.h.store.get_app("shop"), "redis")).options[
            "data_key"]
        self.assertEqual(asked, {"app": "shop", "addon_dir": f".epio-redis-{key}"})


    async def test_standby_needs_a_second_runner(self) -> None:
        """A standby is refused clearly with one runner alive (nothing provisioned, no
        server started) and for a shared database."""
        await self.h.add_runner("r1")
        status, body, _ = await self.call("POST", "apps/shop/addons",
                                          {"kind": "redis", "standby": True})
        self.assertEqual(status, 409, body)
        self.assertEqual(body["error"]["code"], "no_standby_runner")
        self.assertIn("addons.standby_same_runner", body["error"]["message"])
        _, listed, _ = await self.call("GET", "apps/shop/addons")
        self.assertEqual(listed, [])
        self.assertEqual([r for r in self.h.runners.requests if r[1] == "runner.start"], [])
        status, body, _ = await self.call("POST", "apps/shop/addons",
                                          {"kind": "postgres", "plan": "shared",
                                           "standby": True})
        self.assertEqual(status, 400, body)
        self.assertIn("standby: true to dedicated servers only", body["error"]["message"])

    async def test_fence_rule(self) -> None:
        """The record's primary starts as the primary, its standby as a standby of that
        primary's address; any other server of the add-on is fenced."""
        from epio.addons.standby import Fenced, role_of, server_role
        from epio.store.addons import Addon, put_addon

        addon = Addon("shop", "redis", "dedicated", "ready", 1.0, 1.0, host="10.0.0.2",
                      port=20001, password="pw", node="r2", instance="shop-new",
                      options={"standby": True, "epoch": 3, "standby_instance": "shop-sb"})
        self.assertEqual(role_of(addon, "shop-new"), {"EPIO_SERVER_ROLE": "primary"})
        self.assertEqual(role_of(addon, "shop-sb"),
                         {"EPIO_SERVER_ROLE": "standby", "EPIO_PRIMARY_HOST": "10.0.0.2",
                          "EPIO_PRIMARY_PORT": "20001"})
        with self.assertRaises(Fenced) as e:
            role_of(addon, "shop-old-primary")
        self.assertIn("epoch 3", str(e.exception))
        await put_addon(self.h.store, addon)
        self.assertEqual(await server_role(self.h.store, "shop", "redis", "shop-new"),
                         {"EPIO_SERVER_ROLE": "primary"})
        with self.assertRaises(Fenced):
            await server_role(self.h.store, "shop", "postgres", "shop-new")  # no such add-on

    async def test_standby_same_runner_key(self) -> None:
        """addons.standby_same_runner = true places a standby on the primary's runner
        when it is the only one (testing); off, a second runner is needed, and taken
        when there is one."""
        import attrs

        from epio.api import errors

        await self.h.add_runner("r1")
        with self.assertRaises(errors.Conflict):
            await self.addons._standby_runner("r1")
        self.addons.settings = attrs.evolve(self.addons.settings, standby_same_runner=True)
        self.assertEqual((await self.addons._standby_runner("r1")).id, "r1")
        await self.h.add_runner("r2")
        self.assertEqual((await self.addons._standby_runner("r1")).id, "r2")

    async def test_another_user_cannot_fail_over_or_read_lag(self) -> None:
        """Bob (neither owner nor collaborator of shop) gets 404 -- as for a missing app
        -- from the failover route and from the add-on's description (its replication
        lag); the record is untouched (same epoch, same primary)."""
        from epio.store.addons import Addon, find_addon, put_addon

        addon = Addon("shop", "redis", "dedicated", "ready", 1.0, 1.0, host="10.0.0.2",
                      port=20001, password="pw", node="r2", instance="shop-new",
                      options={"standby": True, "epoch": 3, "standby_instance": "shop-sb"})
        await put_addon(self.h.store, addon)
        for method, path in (("POST", "apps/shop/addons/redis/failover"),
                             ("GET", "apps/shop/addons/redis"), ("GET", "apps/shop/addons")):
            status, body, _ = await self.call(method, path, token=self.h.bob_token)
            self.assertEqual((status, body["error"]["code"]), (404, "not_found"), path)
            self.assertNotIn("pw", str(body))
        after = await find_addon(self.h.store, "shop", "redis")
        assert after is not None
        self.assertEqual((after.options["epoch"], after.instance), (3, "shop-new"))
