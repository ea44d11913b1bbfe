"""The network fence: what it derives from the config, the exact nftables text, and
how the service keeps the table in step (a fake nft on a task.Clock)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
from attrs import define, field
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from epio.config import validate
from epio.runner.cgroups import CgroupSupport
from epio.runner.fence import (
    FENCE_TRANSITIONS,
    FencedIsolation,
    FenceError,
    FenceNotApplied,
    FencePlan,
    FenceState,
    INft,
    NetworkFence,
    Nft,
    Target,
    app_reach,
    app_uids,
    detect,
    make_fence,
    owner_comment,
    owner_gone,
    pid_namespace,
    plan_from_config,
    postgres_endpoint,
    postgres_endpoints,
    proc_start,
    render,
    table_for,
    twisted_endpoint,
    zmq_endpoint,
)
from epio.runner.sandbox import detect_isolation
from epio.runner.supervisor import InvalidTransition, State
from epio.runner.users import uids_with_processes
from epio.services import OrderedMultiService


@implementer(INft)
class FakeNft:
    """Records what would have been given to nft; ``fail`` makes the next calls fail."""

    def __init__(self) -> None:
        self.applied: list[str] = []
        self.checked: list[str] = []
        self.deleted: list[str] = []
        self.installed: set[str] = set()
        self.comments: dict[str, str] = {}
        self.handles: dict[str, int] = {}
        self.fail: str | None = None

    def check(self, text: str) -> None:
        if self.fail:
            raise FenceError(self.fail)
        self.checked.append(text)

    def apply(self, text: str) -> None:
        if self.fail:
            raise FenceError(self.fail)
        self.applied.append(text)
        self.installed.add(text.splitlines()[1].split()[-1])

    def exists(self, table: str) -> bool:
        return table in self.installed

    def delete(self, table: str, handle: int | None = None) -> None:
        if handle is not None and handle != self.handles.get(table):
            return  # replaced meanwhile: not this incarnation
        self.deleted.append(table)
        self.installed.discard(table)
        self.comments.pop(table, None)

    def tables(self) -> dict[str, tuple[int, str]]:
        return {t: (self.handles.get(t, 0), self.comments.get(t, "")) for t in self.installed}


def now(f: Any, *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args)


NO_PROC = Path("/nonexistent/proc")  # uids_with_processes finds nothing there

PLAN = FencePlan(table="t", uid_min=20000, uid_max=59999, control_ports=(7711, 7712, 8000),
                 hosts4=("10.0.0.5",), hosts6=("fd00::/64",), open_ports=(53, 5432, 8080),
                 instance_range=(21000, 21999))


class NftAcceptsTests(SynchronousTestCase):
    def test_network_and_an_address_inside_it(self) -> None:
        """fence_hosts naming a network that holds one of the listed addresses (the
        cluster's subnet beside this host's own address) is accepted by the real nft
        (check mode: nothing installed), not refused as conflicting intervals."""
        import shutil
        import subprocess

        nft = shutil.which("nft")
        if nft is None or os.geteuid() != 0:
            raise SkipTest("needs root and nft (.ci/apt-packages)")
        plan = attrs.evolve(PLAN, table="epio_test_automerge",
                            hosts4=("10.231.0.0/24", "10.231.0.5", "127.0.0.1"))
        out = subprocess.run([nft, "-c", "-f", "-"], input=render(plan), text=True,
                             capture_output=True, timeout=30)
        self.assertEqual(out.returncode, 0, out.stderr)


class EndpointTests(SynchronousTestCase):
    def test_twisted_endpoints(self) -> None:
        """Twisted server endpoint strings give their TCP port and interface; unix
        sockets and junk give None."""
        self.assertEqual(twisted_endpoint("tcp:8000:interface=127.0.0.1"),
                         Target("127.0.0.1", 8000))
        self.assertEqual(twisted_endpoint(r"tcp6:port=8001:interface=\:\:1"), Target("::1", 8001))
        self.assertEqual(twisted_endpoint("ssl:8443:privateKey=k.pem"), Target("", 8443))
        self.assertEqual(twisted_endpoint("9100"), Target("", 9100))
        self.assertIsNone(twisted_endpoint("unix:/run/epio/api.sock"))
        self.assertIsNone(twisted_endpoint("tcp:0"))
        self.assertIsNone(twisted_endpoint(""))

    def test_zmq_and_postgres_endpoints(self) -> None:
        """ZeroMQ tcp:// URLs (wildcards, bracketed IPv6) and PostgreSQL URLs give host
        and port; ipc://, a wildcard port and a unix-socket PostgreSQL give None."""
        self.assertEqual(zmq_endpoint("tcp://*:7711"), Target("*", 7711))
        self.assertEqual(zmq_endpoint("tcp://[::1]:7712"), Target("::1", 7712))
        self.assertEqual(zmq_endpoint("tcp://10.0.0.1;10.0.0.2:7713"), Target("10.0.0.2", 7713))
        self.assertIsNone(zmq_endpoint("ipc:///run/epio/bus"))
        self.assertIsNone(zmq_endpoint("tcp://*:*"))
        self.assertEqual(postgres_endpoint("postgresql://u:p@db.example:6543/epio"),
                         Target("db.example", 6543))
        self.assertEqual(postgres_endpoint("postgres://127.0.0.1/epio"), Target("127.0.0.1", 5432))
        self.assertIsNone(postgres_endpoint("postgresql:///epio?host=/run/postgresql"))
        self.assertIsNone(postgres_endpoint("sqlite:///x.db"))
        # a store URL listing a primary and its standby: both are the store
        self.assertEqual(
            postgres_endpoints("postgresql://u@10.0.0.8:5432,10.0.0.10:5433/epio"
                               "?target_session_attrs=read-write"),
            [Target("10.0.0.8", 5432), Target("10.0.0.10", 5433)])
        self.assertEqual(postgres_endpoints("postgresql://u@db:6543/epio"), [Target("db", 6543)])
        self.assertEqual(postgres_endpoints("postgresql:///epio?host=/run/postgresql"), [])


class PlanTests(SynchronousTestCase):
    def test_single_box_defaults(self) -> None:
        """With the defaults and --role=all: every bus bind, the api and the backup
        control port are control ports for UIDs 20000-59999; only the router port
        is open; the instance range is runner.port_min-port_max; no remote hosts, no
        notes (the store is SQLite)."""
        plan = plan_from_config(validate({}).settings, ["all"])
        self.assertEqual(plan, FencePlan(
            table="epio_fence", uid_min=20000, uid_max=59999,
            control_ports=(7711, 7712, 7713, 7721, 7722, 7723, 7731, 7741, 8000),
            hosts4=(), hosts6=(), open_ports=(8080,), notes=(),
            instance_range=(20000, 29999)))

    def test_open_ports_are_the_router_and_the_allowed(self) -> None:
        """open_ports (open to every app UID): the router's ports and
        runner.fence_allow_ports; an allowed port that is also a control port stays
        open with a note; nothing else is open (deny by default) -- the add-ons'
        shared PostgreSQL port neither (only apps with a shared database reach it,
        through their (uid, port) pairs), but it is never a control port."""
        cfg = validate({"addons": {"postgres_admin_url":
                                   "postgresql://postgres@127.0.0.1:5433/postgres"},
                        "runner": {"fence_allow_ports": [53, 7731]}})
        plan = plan_from_config(cfg.settings, ["all"])
        self.assertEqual(plan.open_ports, (53, 7731, 8080))
        self.assertNotIn(5433, plan.control_ports)
        self.assertNotIn(7731, plan.control_ports)
        self.assertEqual(plan.notes, ("port 7731 (runner.control_bind) is in "
                                      "runner.fence_allow_ports: it stays open",))
        self.assertEqual(plan_from_config(validate({}).settings, ["runner"]).open_ports, (8080,))
        local_index = validate({"build": {"index_url": "http://127.0.0.1:3141/root/simple"}})
        self.assertEqual(plan_from_config(local_index.settings, ["runner"]).notes, (
            "build.index_url is on this host (port 3141): builds cannot reach it unless "
            "the port is in runner.fence_allow_ports",))
        allowed = validate({"build": {"index_url": "http://127.0.0.1:3141/root/simple"},
                            "runner": {"fence_allow_ports": [3141]}})
        self.assertEqual(plan_from_config(allowed.settings, ["runner"]).notes, ())

    def test_only_the_roles_run_here_plus_what_the_node_connects_to(self) -> None:
        """A runner-only node fences its control port, the endpoints it connects to
        (nexus heartbeat, loggers, logger peers, backup endpoints), metrics, the
        store and the extra ports, but not the api's or a nexus's own binds that it
        does not run; cluster hosts given as addresses and fence_hosts are fenced
        remotely, loopback is not listed (it is local)."""
        cfg = validate({
            "cluster": {"nexus": [{"heartbeat": "tcp://10.0.0.2:9711",
                                   "router": "tcp://[fd00::2]:9712",
                                   "publish": "tcp://127.0.0.1:9713"}],
                        "loggers": ["tcp://10.0.0.3:9721"]},
            "logger": {"peers": []},
            "backup": {"endpoints": ["tcp://backup.example:9741"]},
            "runner": {"control_bind": "tcp://*:9731", "fence_extra_ports": [6000],
                       "fence_hosts": ["10.0.1.0/24", "10.0.0.2", "fd00::9"]},
            "metrics": {"listen": "tcp:9100:interface=127.0.0.1"},
            "store": {"url": "postgresql://epio:pw@10.0.0.4:5433/epio"},
            "api": {"listen": "tcp:9000"},
        })
        plan = plan_from_config(cfg.settings, ["runner"])
        self.assertEqual(plan.control_ports, (5433, 6000, 9100, 9711, 9712, 9713, 9721, 9731, 9741))
        self.assertEqual(plan.hosts4, ("10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.1.0/24"))
        self.assertEqual(plan.hosts6, ("fd00::2", "fd00::9"))
        self.assertEqual(plan.notes, (
            "cluster host 'backup.example' is a name, not an address: its ports are fenced "
            "only on this host's own addresses (list its addresses in runner.fence_hosts)",))

    def test_every_host_of_a_replicated_store_is_fenced(self) -> None:
        """A store.url listing the primary and its standby (store failover) makes both
        hosts' PostgreSQL ports control ports: an app reaches neither."""
        cfg = validate({"store": {"url": "postgresql://epio@10.0.0.8:5432,10.0.0.10:5433/"
                                         "epio?target_session_attrs=read-write"}})
        plan = plan_from_config(cfg.settings, ["runner"])
        self.assertIn(5432, plan.control_ports)
        self.assertIn(5433, plan.control_ports)
        self.assertTrue({"10.0.0.8", "10.0.0.10"} <= set(plan.hosts4), plan.hosts4)
        self.assertFalse(any("unix socket" in n for n in plan.notes), plan.notes)

    def test_store_sharing_the_addon_postgres_port_stays_open(self) -> None:
        """When the store's PostgreSQL is the add-ons' server (same port), the port
        stays open (apps need their databases) and a note says the operator must keep
        the store in a database and role apps cannot log into; a store on another
        port is fenced."""
        same = validate({"store": {"url": "postgresql://epio@127.0.0.1:5432/epio"},
                         "addons": {"postgres_admin_url": "postgresql://postgres@127.0.0.1/postgres"}})
        plan = plan_from_config(same.settings, ["all"])
        self.assertNotIn(5432, plan.control_ports)
        self.assertEqual(len(plan.notes), 1)
        self.assertIn("also the add-ons' PostgreSQL port", plan.notes[0])
        self.assertIn("database and role apps cannot log into", plan.notes[0])
        other = validate({"store": {"url": "postgresql://epio@127.0.0.1:5433/epio"},
                          "addons": {"postgres_admin_url": "postgresql://postgres@127.0.0.1/postgres"}})
        plan = plan_from_config(other.settings, ["all"])
        self.assertIn(5433, plan.control_ports)
        self.assertNotIn(5432, plan.control_ports)
        self.assertEqual(plan.notes, ())

    def test_router_ports_and_unix_listeners(self) -> None:
        """A control port equal to a router port (lb.listen, lb.tls_listen) stays open
        with a note; a unix-socket api is not a port and is noted."""
        cfg = validate({"lb": {"listen": "tcp:7731", "tls_listen": "tcp:8443"},
                        "api": {"listen": "unix:/run/epio/api.sock"},
                        "runner": {"fence_extra_ports": [8443]}})
        plan = plan_from_config(cfg.settings, ["all"])
        self.assertEqual(plan.open_ports, (7731, 8443))  # the router's
        self.assertNotIn(7731, plan.control_ports)
        self.assertNotIn(8443, plan.control_ports)
        self.assertNotIn(8000, plan.control_ports)
        self.assertEqual(len(plan.notes), 3, plan.notes)
        self.assertIn("api.listen = 'unix:/run/epio/api.sock' is not a TCP port", plan.notes[0])

    def test_bad_fence_host_is_refused(self) -> None:
        """A fence_hosts entry that is not an address or network is a clear error."""
        cfg = validate({"runner": {"fence_hosts": ["db.example"]}})
        with self.assertRaises(ValueError) as e:
            plan_from_config(cfg.settings, ["runner"])
        self.assertIn("'db.example' is not an IP address or network", str(e.exception))

    def test_table_names(self) -> None:
        """Each data dir gets its own table name (runners sharing a host never touch
        each other's); runner.fence_table overrides it; a name nft cannot take is a
        clear error."""
        a, b = table_for("/var/lib/epio"), table_for("/srv/epio2")
        self.assertRegex(a, r"^epio_fence_[0-9a-f]{8}$")
        self.assertNotEqual(a, b)
        self.assertEqual(plan_from_config(validate({}).settings, ["runner"], a).table, a)
        cfg = validate({"runner": {"fence_table": "my_fence"}})
        self.assertEqual(plan_from_config(cfg.settings, ["runner"]).table, "my_fence")
        with self.assertRaises(ValueError) as e:
            plan_from_config(validate({"runner": {"fence_table": "x; flush ruleset"}}).settings,
                             ["runner"])
        self.assertIn("not a valid nftables table name", str(e.exception))

    def test_bad_extra_port_is_a_config_error(self) -> None:
        """fence_extra_ports outside 1-65535 fails config validation."""
        from epio.config import ConfigError

        with self.assertRaises(ConfigError):
            validate({"runner": {"fence_extra_ports": [0]}})


class RenderTests(SynchronousTestCase):
    def test_exact_ruleset(self) -> None:
        """The generated nft text replaces the table in one transaction and holds
        exactly: the control ports (merged into ranges), the open ports, this
        runner's instance ports and their owners, the UIDs it fences (those of its
        instances and sessions, also one without ports, and the build user -- never
        the whole app UID range, where another runner's apps may live), the remote
        hosts, one output hook matching connection attempts of those UIDs, and the
        rules: control ports of remote hosts reset, other remote traffic accepted;
        on this host control ports reset, open ports and the UID's own instances
        accepted, other instances of this runner reset, the rest of the instance
        range accepted, everything else reset (deny by default).  And one input hook
        matching connection attempts to the instance range and the static server's
        port: this host's own sources and the routers' addresses (sorted, deduplicated,
        anything that is not an address left out) accepted, other sources too on a
        dedicated add-on server's port, every other one reset."""
        text = render(PLAN, [(20002, 21001), (20001, 21000), (20001, 21002)], [999],
                      app_uids=[20001, 20002, 20005],
                      routers=["10.0.0.9", "fd00::9", "10.0.0.8", "10.0.0.9", "lb.example",
                               "0.0.0.0", "10.0.0.0/24"],
                      addon_servers=[21003], inbound=[7735])
        self.assertEqual(text, """\
# epio network fence (generated by epio.runner.fence; see docs/security.md)
table inet t
delete table inet t
table inet t {
\tset control_ports {
\t\ttype inet_service
\t\tflags interval
\t\tauto-merge
\t\telements = { 7711-7712, 8000 }
\t}
\tset open_ports {
\t\ttype inet_service
\t\tflags interval
\t\tauto-merge
\t\telements = { 53, 5432, 8080 }
\t}
\tset instance_ports {
\t\ttype inet_service
\t\telements = { 21000, 21001, 21002 }
\t}
\tset owned {
\t\ttype uid . inet_service
\t\telements = { 20001 . 21000, 20001 . 21002, 20002 . 21001 }
\t}
\tset app_uids {
\t\ttype uid
\t\telements = { 999, 20001, 20002, 20005 }
\t}
\tset hosts4 {
\t\ttype ipv4_addr
\t\tflags interval
\t\tauto-merge
\t\telements = { 10.0.0.5 }
\t}
\tset hosts6 {
\t\ttype ipv6_addr
\t\tflags interval
\t\tauto-merge
\t\telements = { fd00::/64 }
\t}
\tset inbound_ports {
\t\ttype inet_service
\t\tflags interval
\t\tauto-merge
\t\telements = { 7735, 21000-21999 }
\t}
\tset addon_servers {
\t\ttype inet_service
\t\telements = { 21003 }
\t}
\tset routers4 {
\t\ttype ipv4_addr
\t\telements = { 10.0.0.8, 10.0.0.9 }
\t}
\tset routers6 {
\t\ttype ipv6_addr
\t\telements = { fd00::9 }
\t}
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\ttcp dport @inbound_ports tcp flags & (syn | ack) == syn jump inbound
\t}
\tchain inbound {
\t\tfib saddr type local accept
\t\tip saddr @routers4 accept
\t\tip6 saddr @routers6 accept
\t\ttcp dport @addon_servers accept
\t\treject with tcp reset
\t}
\tchain output {
\t\ttype filter hook output priority filter; policy accept;
\t\tmeta skuid @app_uids tcp flags & (syn | ack) == syn jump app
\t}
\tchain app {
\t\tip daddr @hosts4 tcp dport @control_ports reject with tcp reset
\t\tip6 daddr @hosts6 tcp dport @control_ports reject with tcp reset
\t\tfib daddr type != local accept
\t\ttcp dport @control_ports reject with tcp reset
\t\ttcp dport @open_ports accept
\t\tmeta skuid . tcp dport @owned accept
\t\ttcp dport @instance_ports reject with tcp reset
\t\ttcp dport 21000-21999 accept
\t\tmeta l4proto tcp reject with tcp reset
\t}
}
""")

    def test_empty_sets_have_no_elements_line(self) -> None:
        """With no instances, no hosts and no control ports the sets are declared
        empty (nft refuses ``elements = { }``): no UID is fenced, none of the range."""
        plan = FencePlan(table="t", uid_min=1000, uid_max=2000, control_ports=(), hosts4=(),
                         hosts6=(), open_ports=())
        text = render(plan)
        self.assertNotIn("elements", text)
        self.assertIn("meta skuid @app_uids tcp flags", text)
        self.assertNotIn("1000", text)

    def test_owned_uids_are_always_fenced(self) -> None:
        """A UID that may reach a port (``owned``) is fenced even when the caller
        forgot it in ``app_uids``: reach without a fence cannot be expressed."""
        text = render(PLAN, [(20003, 21000)])
        self.assertIn("\tset app_uids {\n\t\ttype uid\n\t\telements = { 20003 }\n", text)


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.nft = FakeNft()
        self.owned: list[tuple[int, int]] = []

    def fence(self, **kw: Any) -> NetworkFence:
        kw.setdefault("in_thread", now)
        return NetworkFence(self.clock, PLAN, self.nft, lambda: list(self.owned), lambda: (),
                            **kw)

    def test_fakes_provide_the_interface(self) -> None:
        """The fake and the real nft both provide INft."""
        verifyObject(INft, self.nft)
        verifyObject(INft, Nft())

    def test_installed_at_start_and_follows_the_instances(self) -> None:
        """startService installs the table at once (synchronously); an instance
        change re-renders and applies only when the text differs."""
        f = self.fence()
        f.startService()
        self.assertEqual(self.nft.applied, [render(PLAN)])
        f.changed()
        self.assertEqual(len(self.nft.applied), 1)  # nothing changed: nft not run
        self.owned.append((20001, 21000))
        f.changed()
        self.assertEqual(self.nft.applied[-1], render(PLAN, [(20001, 21000)]))
        self.assertEqual(f.report()["state"], "on")
        self.assertEqual(f.report()["control_ports"], [7711, 7712, 8000])

    def test_changes_while_applying_are_coalesced(self) -> None:
        """While one nft run is in flight, further changes wait and are applied once,
        with the newest state."""
        pending: list[defer.Deferred[Any]] = []

        def slow(fn: Any, *args: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            d.addCallback(lambda _: fn(*args))
            pending.append(d)
            return d

        f = self.fence(in_thread=slow)
        f.startService()
        self.owned.append((20001, 21000))
        f.changed()
        self.owned.append((20002, 21001))
        f.changed()
        f.changed()
        self.assertEqual(len(pending), 1)
        pending.pop().callback(None)
        self.assertEqual(len(pending), 1)
        pending.pop().callback(None)
        self.assertEqual(pending, [])
        self.assertEqual(self.nft.applied[1:], [
            render(PLAN, [(20001, 21000)]), render(PLAN, [(20001, 21000), (20002, 21001)])])

    def test_flushed_table_is_put_back(self) -> None:
        """Every check_interval the fence checks the table is there; when something
        flushed it, it is installed again and counted."""
        f = self.fence(check_interval=30)
        f.startService()
        self.nft.installed.clear()  # nft flush ruleset
        self.clock.advance(30)
        self.assertEqual(f.reinstalls, 1)
        self.assertEqual(len(self.nft.applied), 2)
        self.assertIn("t", self.nft.installed)
        self.clock.advance(30)
        self.assertEqual(len(self.nft.applied), 2)

    def test_first_apply_failing_refuses_to_start(self) -> None:
        """When the dry run passed but the real install at start fails, startService
        exits (SystemExit with the refusal naming runner.fence = "off") instead of
        running every app unfenced; the fence reports 'failed'."""
        self.nft.fail = "Error: Could not process rule: Operation not permitted"
        f = self.fence()
        with self.assertRaises(SystemExit) as e:
            f.startService()
        self.assertIn("the runner cannot install its network fence: nft refused to install "
                      "the fence table: Error: Could not process rule", str(e.exception))
        self.assertIn('runner.fence = "off"', str(e.exception))
        self.assertEqual(f.report()["state"], "failed")
        self.assertEqual(self.nft.applied, [])

    def test_ready_refuses_spawns_while_no_table_is_in_place(self) -> None:
        """ready() (the spawn gate) passes while a table that fences every UID it
        must is in place, even when the latest update failed (a port it lacks is
        refused); it fails when the UID about to start is not in the table yet
        (fail-closed: the UID enters the set before its first process); once the
        table is gone and cannot be put back it fails with 'network fence not
        applied'; when nft works again the next ready() installs it and passes."""
        f = self.fence(check_interval=30)
        f.startService()
        self.successResultOf(f.ready())
        self.owned.append((20001, 21000))
        self.successResultOf(f.ready())
        self.assertEqual(f.applied_uids, {20001})
        self.nft.fail = "Error: Could not process rule"
        self.owned.append((20001, 21002))
        self.successResultOf(f.ready())  # the update failed; the old table fences 20001
        self.assertEqual(f.report()["state"], "failed")
        self.owned.append((20002, 21001))
        failure = self.failureResultOf(f.ready(), FenceNotApplied)
        self.assertEqual(str(failure.value), "network fence (nft table inet t) does not "
                                             "fence UID 20002 yet: Error: Could not "
                                             "process rule")
        self.nft.installed.clear()  # nft flush ruleset, and reinstalling fails
        self.clock.advance(30)
        failure = self.failureResultOf(f.ready(), FenceNotApplied)
        self.assertEqual(str(failure.value), "network fence not applied (nft table inet t): "
                                             "Error: Could not process rule")
        self.nft.fail = None
        self.successResultOf(f.ready())
        self.assertIn("t", self.nft.installed)
        self.assertEqual(f.report()["state"], "on")
        f.stopService()
        self.successResultOf(f.ready())  # a stopped fence holds nothing back

    def test_nft_failure_is_reported_and_recovers(self) -> None:
        """A ruleset nft refuses leaves the fence 'failed' with the error in the
        report (and the runner's isolation facts); the next good apply clears it."""
        f = self.fence()
        f.startService()
        self.nft.fail = "Error: Could not process rule"
        self.owned.append((20002, 21001))
        f.changed()
        self.assertEqual(f.report()["state"], "failed")
        self.assertEqual(f.report()["error"], "Error: Could not process rule")
        self.nft.fail = None
        self.owned.append((20001, 21000))
        f.changed()
        self.assertEqual(f.report()["state"], "on")
        self.assertNotIn("error", f.report())

    def test_a_fence_turned_off_never_comes_on(self) -> None:
        """A fence the operator turned off (runner.fence = off) stays OFF: starting it
        and telling it of changes installs nothing, and moving it to ON or FAILED is
        a bug that raises (FENCE_TRANSITIONS); ON and FAILED move between each other."""
        f = self.fence(enabled=False, why_off="disabled by runner.fence = off")
        f.startService()
        f.changed()
        self.assertEqual((f.state, self.nft.applied), (FenceState.OFF, []))
        for new in (FenceState.ON, FenceState.FAILED):
            with self.assertRaises(InvalidTransition):
                f._move(new)
        self.assertIs(f.state, FenceState.OFF)
        self.assertEqual(FENCE_TRANSITIONS[FenceState.FAILED],
                         {FenceState.ON, FenceState.FAILED})
        f.stopService()

    def test_removed_on_clean_stop_unless_kept(self) -> None:
        """A clean stop removes the table; with keep_on_stop it stays."""
        f = self.fence()
        f.startService()
        self.successResultOf(f.stopService())
        self.assertEqual(self.nft.deleted, ["t"])
        self.nft.deleted.clear()
        g = self.fence(keep_on_stop=True)
        g.startService()
        self.successResultOf(g.stopService())
        self.assertEqual(self.nft.deleted, [])

    def test_stop_waits_for_an_apply_in_flight(self) -> None:
        """The table is removed only after an apply in flight finished (so the apply
        cannot put it back after the removal)."""
        pending: list[defer.Deferred[Any]] = []

        def slow(fn: Any, *args: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            d.addCallback(lambda _: fn(*args))
            pending.append(d)
            return d

        f = self.fence(in_thread=slow)
        f.startService()
        self.owned.append((20001, 21000))
        f.changed()
        stopped = f.stopService()
        self.assertNoResult(stopped)
        self.assertEqual(self.nft.deleted, [])
        pending.pop().callback(None)
        self.successResultOf(stopped)
        self.assertEqual(self.nft.deleted, ["t"])
        self.assertNotIn("t", self.nft.installed)

    def test_disabled_fence_touches_nothing(self) -> None:
        """A fence that is off runs no nft at all and reports why."""
        f = self.fence(enabled=False, why_off="nft (nftables) is not installed")
        f.startService()
        f.changed()
        self.successResultOf(f.stopService())
        self.assertEqual((self.nft.applied, self.nft.deleted), ([], []))
        self.assertEqual(f.report(), {"state": "off", "why": "nft (nftables) is not installed"})


class OwnerTests(SynchronousTestCase):
    def fake_proc(self, pids: dict[int, int], ns: int = 77) -> Path:
        root = Path(self.mktemp())
        (root / "self" / "ns").mkdir(parents=True)
        (root / "self" / "ns" / "pid").symlink_to(f"pid:[{ns}]")
        for pid, start in pids.items():
            (root / str(pid)).mkdir(parents=True)
            fields = ["S"] + ["0"] * 18 + [str(start)] + ["0"] * 10
            (root / str(pid) / "stat").write_text(f"{pid} (twistd x) " + " ".join(fields))
        return root

    def test_owner_comment(self) -> None:
        """The owner comment names pid, start time, pid namespace and data dir, or is
        empty when it cannot be written whole (too long, a quote, unknown start or
        namespace)."""
        self.assertEqual(owner_comment(12, 345, 77, "/var/lib/epio"),
                         "epio runner pid=12 start=345 ns=77 data=/var/lib/epio")
        self.assertEqual(owner_comment(12, 345, 77, "/x" * 80), "")
        self.assertEqual(owner_comment(12, 345, 77, '/tmp/a"b'), "")
        self.assertEqual(owner_comment(12, None, 77, "/var/lib/epio"), "")
        self.assertEqual(owner_comment(12, 345, None, "/var/lib/epio"), "")
        self.assertIn('\tcomment "epio runner pid=12 start=345 ns=77 data=/d"\n',
                      render(PLAN, owner="epio runner pid=12 start=345 ns=77 data=/d"))
        self.assertEqual(pid_namespace(self.fake_proc({}, ns=4026531836)), 4026531836)

    def test_owner_gone_only_when_its_process_is_in_our_namespace_and_dead(self) -> None:
        """A table's owner is gone when, in our own pid namespace, its pid no longer
        exists or was reused (another start time).  Owners in another pid namespace
        (a runner in another container on the same network) and tables without an
        owner comment are never judged gone."""
        proc = self.fake_proc({100: 5000})
        self.assertFalse(owner_gone("epio runner pid=100 start=5000 ns=77 data=/x", 77, proc))
        self.assertTrue(owner_gone("epio runner pid=100 start=4999 ns=77 data=/x", 77, proc))
        self.assertTrue(owner_gone("epio runner pid=101 start=5000 ns=77 data=/x", 77, proc))
        self.assertFalse(owner_gone("epio runner pid=101 start=5000 ns=78 data=/x", 77, proc))
        self.assertFalse(owner_gone("epio runner pid=101 start=5000 ns=77 data=/x", None, proc))
        self.assertFalse(owner_gone("", 77, proc))
        self.assertFalse(owner_gone("hand-made table", 77, proc))

    def test_start_collects_tables_of_dead_runners(self) -> None:
        """At start the fence removes (by handle) other runners' tables whose owner is
        dead, and keeps live runners' tables, tables without an owner and its own."""
        proc = self.fake_proc({100: 5000})
        nft = FakeNft()
        nft.installed = {"epio_fence_00000001", "epio_fence_00000002", "epio_fence_00000003", "t"}
        nft.handles = {"epio_fence_00000001": 11, "epio_fence_00000002": 12,
                       "epio_fence_00000003": 13, "t": 14}
        nft.comments = {
            "epio_fence_00000001": "epio runner pid=100 start=5000 ns=77 data=/a",
            "epio_fence_00000002": "epio runner pid=200 start=5000 ns=77 data=/b",
            "t": "epio runner pid=300 start=5000 ns=77 data=/c",
        }
        f = NetworkFence(task.Clock(), PLAN, nft, proc=proc, in_thread=now,
                         owner="epio runner pid=1 start=2 ns=77 data=/d")
        f.startService()
        self.assertEqual(nft.deleted, ["epio_fence_00000002"])
        self.assertEqual(nft.installed, {"epio_fence_00000001", "epio_fence_00000003", "t"})
        self.assertIn('comment "epio runner pid=1 start=2 ns=77 data=/d"', nft.applied[0])


class DetectTests(SynchronousTestCase):
    def test_detect(self) -> None:
        """The fence is on only as root, with nft, when nft accepts the ruleset."""
        ok = lambda: None  # noqa: E731

        def refuse() -> None:
            raise FenceError("Error: No such file or directory (fib)")

        self.assertEqual(detect("on", 0, "/usr/sbin/nft", ok), (True, ""))
        self.assertEqual(detect("off", 0, "/usr/sbin/nft", ok),
                         (False, "disabled by runner.fence = off"))
        self.assertEqual(detect("on", 1000, "/usr/sbin/nft", ok),
                         (False, "the runner is not root: it cannot install nftables rules"))
        self.assertEqual(detect("on", 0, None, ok), (False, "nft (nftables) is not installed"))
        self.assertEqual(detect("on", 0, "/usr/sbin/nft", refuse),
                         (False, "nft refused the fence: Error: No such file or directory (fib)"))


# -- wiring into a runner ---------------------------------------------------------


@define
class FakeSpec:
    uid: int
    addon_ports: tuple[int, ...] = ()


@define
class FakeSessions:
    """Stands for the SessionManager: live (uid, port) pairs and its observers."""

    live: list[tuple[int, int]] = field(factory=list)
    observers: list[Any] = field(factory=list)

    def reach(self) -> list[tuple[int, int]]:
        return list(self.live)

    def uids(self) -> set[int]:
        return {u for u, _ in self.live}


@define
class FakeInstance:
    spec: FakeSpec
    port: int | None
    state: State


@define
class FakeSupervisor:
    instances: dict[str, FakeInstance] = field(factory=dict)


@define
class FakeNode:
    config: Any
    roles: tuple[str, ...]
    reactor: Any
    data_dir: Path = Path("/var/lib/epio")


def fence_of(node: FakeNode, supervisor: Any, sessions: Any = None, **kw: Any) -> Any:
    """The fence :func:`make_fence` makes for ``node``, following ``supervisor``'s
    instances and ``sessions``' reach (as the runner's composition root wires it)."""
    kw.setdefault("proc", NO_PROC)  # no process of this host joins the fenced UIDs
    return make_fence(node.reactor, node.config.settings, node.roles, node.data_dir,
                      app_reach(supervisor, sessions), uids=app_uids(supervisor, sessions),
                      **kw)


def runner_with(fence: Any) -> Any:
    """A runner tree as make_service orders it: the fence first, then the others."""
    svc = OrderedMultiService()
    fence.setServiceParent(svc)
    Service().setServiceParent(svc)  # the runner's other children
    return svc


def fenced(fence: Any) -> FencedIsolation:
    iso = detect_isolation("auto", 0, "/usr/bin/bwrap", "/usr/bin/setpriv",
                           CgroupSupport({}, {}), True)
    return FencedIsolation(**attrs.asdict(iso, recurse=False), fence=fence)


class WiringTests(SynchronousTestCase):
    def test_fence_with_nft(self) -> None:
        """make_fence tries the ruleset once, names its owner, installs the table when
        it starts, re-renders the live instances' (uid, port) when told of a change
        (app_reach: stopped and failed instances reach nothing) and fences exactly
        the UIDs of its live instances (app_uids: one without ports too), reports
        itself in the isolation facts and removes its table when it stops."""
        clock = task.Clock()
        sup = FakeSupervisor()
        nft = FakeNft()
        node = FakeNode(validate({"build": {"user": "no-such-epio-user"}}), ("all",), clock)
        fence = fence_of(node, sup, nft_binary="/usr/sbin/nft", euid=0, nft=nft,
                         in_thread=now)
        svc = runner_with(fence)
        self.assertEqual(len(nft.checked), 1)  # the trial run
        self.assertEqual(fence.owner, f"epio runner pid={os.getpid()} "
                         f"start={proc_start(os.getpid())} ns={pid_namespace()} "
                         "data=/var/lib/epio")
        svc.startService()
        self.assertEqual(nft.applied, [render(fence.plan, owner=fence.owner)])
        sup.instances["a"] = FakeInstance(FakeSpec(20001), 21000, State.HEALTHY)
        sup.instances["b"] = FakeInstance(FakeSpec(20002), 21001, State.STOPPED)
        sup.instances["c"] = FakeInstance(FakeSpec(20003), None, State.HEALTHY)
        sup.instances["d"] = FakeInstance(FakeSpec(20004, (5432,)), None, State.HEALTHY)
        sup.instances["e"] = FakeInstance(FakeSpec(20005, (5432,)), None, State.FAILED)
        fence.changed()
        self.assertEqual(nft.applied[-1], render(fence.plan, [(20001, 21000), (20004, 5432)],
                                                 owner=fence.owner,
                                                 app_uids=[20001, 20003, 20004]))
        self.assertEqual(fence.applied_uids, {20001, 20003, 20004})
        iso = fenced(fence).as_dict()
        self.assertEqual(iso["fence"]["state"], "on")
        self.assertEqual(iso["fence"]["table"], "inet " + table_for("/var/lib/epio"))
        self.assertNotIn("network", iso["off"])
        self.assertEqual(iso["sandbox"], "bwrap")
        svc.stopService()
        self.assertEqual(nft.deleted, [table_for("/var/lib/epio")])

    def test_runner_whose_real_install_fails_refuses_to_start(self) -> None:
        """nft accepts the dry run (nft -c) but refuses the real install: starting
        the runner raises SystemExit with the refusal before any other child of the
        runner started, and the fence's spawn gate fails closed."""
        nft = FakeNft()
        node = FakeNode(validate({"build": {"user": "no-such-epio-user"}}), ("runner",),
                        task.Clock())
        fence = fence_of(node, FakeSupervisor(), nft_binary="/usr/sbin/nft", euid=0,
                         nft=nft, in_thread=now)
        svc = runner_with(fence)
        others = list(svc)[1:]
        nft.fail = "Error: cannot create table: Operation not permitted"
        with self.assertRaises(SystemExit) as e:
            svc.startService()
        self.assertIn("the runner cannot install its network fence: nft refused to install "
                      "the fence table: Error: cannot create table", str(e.exception))
        self.assertFalse(others[0].running)
        self.failureResultOf(fence.ready(), FenceNotApplied)

    def test_without_a_working_fence_the_runner_refuses_to_start(self) -> None:
        """By default (runner.fence = on) a runner without nft, without root, or whose
        ruleset nft refuses does not start: make_fence exits with a message that
        says why and names runner.fence = "off"; "auto" is no longer a value."""
        from epio.config import ConfigError

        node = FakeNode(validate({}), ("runner",), task.Clock())
        for kw in ({"nft_binary": None, "euid": 0}, {"nft_binary": "/usr/sbin/nft", "euid": 1000}):
            with self.assertRaises(SystemExit) as e:
                fence_of(node, FakeSupervisor(), nft=FakeNft(), **kw)
            self.assertIn("the runner cannot install its network fence", str(e.exception))
            self.assertIn('runner.fence = "off"', str(e.exception))
        broken = FakeNft()
        broken.fail = "Error: Could not process rule: No such file or directory"
        with self.assertRaises(SystemExit) as e:
            fence_of(node, FakeSupervisor(), nft_binary="/usr/sbin/nft", euid=0, nft=broken)
        self.assertIn("nft refused the fence: Error: Could not process rule", str(e.exception))
        with self.assertRaises(ConfigError) as c:
            validate({"runner": {"fence": "auto"}})
        self.assertIn("'auto' is no longer accepted", str(c.exception))

    def test_fence_off_is_reported(self) -> None:
        """With runner.fence = off the runner starts without nft, reports the fence
        off (isolation['off']['network'] says why) and says so when it starts."""
        from twisted.logger import globalLogPublisher

        node = FakeNode(validate({"runner": {"fence": "off"}}), ("runner",), task.Clock())
        nft = FakeNft()
        fence = fence_of(node, FakeSupervisor(), nft_binary=None, euid=1000, nft=nft)
        svc = runner_with(fence)
        iso = fenced(fence).as_dict()
        self.assertEqual(iso["fence"], {"state": "off", "why": "disabled by runner.fence = off"})
        self.assertEqual(iso["off"]["network"],
                         "network fence off: disabled by runner.fence = off")
        seen: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        svc.startService()
        svc.stopService()
        self.assertTrue([e for e in seen if "runner isolation OFF: network fence"
                         in e.get("log_format", "") and e.get("why") ==
                         "disabled by runner.fence = off"], seen)
        self.assertEqual((nft.applied, nft.checked), ([], []))


class SessionWiringTests(SynchronousTestCase):
    def test_sessions_add_their_addon_ports_and_wait_for_the_table(self) -> None:
        """With the fence following the runner's sessions (app_reach), the live
        sessions' (uid, add-on port) pairs enter the table, and the Deferred a
        starting session waits on fires only once nft applied that table (at once
        when nothing changes, or the fence is stopped)."""
        pending: list[defer.Deferred[Any]] = []

        def slow(fn: Any, *args: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            d.addCallback(lambda _: fn(*args))
            pending.append(d)
            return d

        sessions = FakeSessions()
        nft = FakeNft()
        node = FakeNode(validate({"build": {"user": "no-such-epio-user"}}), ("runner",),
                        task.Clock())
        fence = fence_of(node, FakeSupervisor(), sessions, nft_binary="/usr/sbin/nft",
                         euid=0, nft=nft, in_thread=slow)
        svc = runner_with(fence)
        svc.startService()
        self.successResultOf(fence.sync())  # nothing changed: at once
        sessions.live.append((20007, 5432))
        synced = fence.sync()
        self.assertNoResult(synced)
        pending.pop().callback(None)
        self.successResultOf(synced)
        self.assertEqual(nft.applied[-1], render(fence.plan, [(20007, 5432)],
                                                 owner=fence.owner))
        sessions.live.clear()
        waiting = fence.sync()
        svc.stopService()  # a stop releases whoever waits
        self.successResultOf(waiting)
        pending.pop().callback(None)


def fake_proc(root: Path, uids: dict[int, tuple[int, int, int, int]]) -> Path:
    """A /proc with one ``<pid>/status`` per entry of ``uids`` (pid -> Uid: line)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "self").mkdir(exist_ok=True)  # not a pid: skipped
    for pid, (real, eff, saved, fs) in uids.items():
        (root / str(pid)).mkdir(exist_ok=True)
        (root / str(pid) / "status").write_text(
            f"Name:\tx\nUid:\t{real}\t{eff}\t{saved}\t{fs}\nGid:\t0\t0\t0\t0\n")
    return root


class UidSetTests(SynchronousTestCase):
    def test_uids_with_processes(self) -> None:
        """uids_with_processes names those of the given UIDs that own a process by
        any of its four UIDs (the file-system UID owns its sockets), nothing else."""
        proc = fake_proc(Path(self.mktemp()), {
            1: (0, 0, 0, 0), 10: (20001, 20001, 20001, 20001), 11: (0, 0, 0, 20002),
            12: (30000, 30000, 30000, 30000), 13: (1000, 20003, 1000, 1000)})
        self.assertEqual(uids_with_processes({20001, 20002, 20003, 20004}, proc),
                         {20001, 20002, 20003})
        self.assertEqual(uids_with_processes({30000}, proc), {30000})
        self.assertEqual(uids_with_processes({20001}, Path(self.mktemp())), set())

    def test_uid_enters_before_spawn_and_leaves_when_its_last_process_is_gone(self) -> None:
        """The fence's UID set follows the runner: an instance's UID is in the applied
        table when its spawn gate (ready) passes, STARTING, before any process ran;
        after the instance stopped the UID stays while a process of it is left on
        the host, and leaves the set once that process is gone (the periodic check
        re-renders); a UID of the range this runner never ran is not fenced even
        while a process of it runs (another runner's app)."""
        clock = task.Clock()
        sup = FakeSupervisor()
        nft = FakeNft()
        proc = fake_proc(Path(self.mktemp()), {})
        node = FakeNode(validate({"build": {"user": "no-such-epio-user"},
                                  "runner": {"fence_check_interval": 5}}), ("runner",), clock)
        fence = fence_of(node, sup, nft_binary="/usr/sbin/nft", euid=0, nft=nft,
                         in_thread=now, proc=proc)
        fake_proc(proc, {30: (20008, 20008, 20008, 20008)})  # another runner's app
        fence.startService()
        self.assertEqual(fence.applied_uids, frozenset())
        sup.instances["w"] = FakeInstance(FakeSpec(20007), None, State.STARTING)
        self.successResultOf(fence.ready())  # the gate before the spawn
        self.assertEqual(fence.applied_uids, {20007})
        self.assertIn("elements = { 20007 }", nft.applied[-1])
        fake_proc(proc, {40: (20007, 20007, 20007, 20007)})  # its process runs
        sup.instances["w"].state = State.STOPPED  # ... and outlives the instance
        fence.changed()
        self.assertEqual(fence.applied_uids, {20007})
        (proc / "40" / "status").unlink()
        (proc / "40").rmdir()
        clock.advance(5)  # the periodic check
        self.assertEqual(fence.applied_uids, frozenset())
        self.assertNotIn("20007", nft.applied[-1])
        fence.stopService()
