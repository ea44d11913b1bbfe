"""``epio addons list|create|info|destroy``, ``epio psql``, ``epio redis-cli``.

``epio addons create postgres`` provisions a shared PostgreSQL database
(``--dedicated`` for a server of its own), ``epio addons create redis
[--memory MB]`` a dedicated Redis; the app's ``DATABASE_URL``/``REDIS_URL`` are
set in a new release.  ``destroy`` takes a final backup first.  ``epio psql`` and
``epio redis-cli`` are ``epio run`` sessions running the client (the host's binaries,
visible in the sandbox) with the app's own ``DATABASE_URL``/``REDIS_URL``.
``--standby`` gives a dedicated server a standby on another runner; ``epio addons
failover KIND`` promotes it (the old primary is fenced).  ``epio addons snapshots KIND`` lists the btrfs snapshots of a dedicated server's data
and ``epio addons snapshot-restore KIND ID`` makes its data the snapshot's (the server
is stopped and started again; the previous data is kept on the runner).
"""

from __future__ import annotations

import argparse
from typing import Any

from epio.cli.client import Client
from epio.cli.commands import ago, app_of, confirm_name, out, table

KINDS = ("postgres", "redis")


def _where(a: dict[str, Any]) -> str:
    if not a.get("host"):
        return "-"
    where = f"{a['host']}:{a['port']}"
    return f"{a['database']} on {where}" if a.get("database") else where


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n} {unit}"
        n //= 1024
    return f"{n} GiB"


def _standby(a: dict[str, Any]) -> str:
    """The STANDBY column: where, its state, and its lag behind the primary."""
    s = a.get("standby")
    if not s:
        return "-"
    if s["state"] != "ready":
        return f"{s['state']}" + (f" on {s['node']}" if s.get("node") else "")
    lag = ""
    if s.get("lag_bytes") is not None:
        lag = f", lag {_size(int(s['lag_bytes']))}"
        if s.get("lag_seconds") is not None:
            lag += f"/{float(s['lag_seconds']):.1f}s"
    return f"{s['node']} {s['replication']}{lag}"


def cmd_list(args: argparse.Namespace) -> int:
    name = app_of(args)
    addons = Client.from_config().get(f"apps/{name}/addons")

    def human() -> None:
        if not addons:
            print(f"{name} has no add-ons: epio addons create postgres|redis")
            return
        table([[a["kind"], a["plan"], a["state"], a["config_var"], _where(a),
                _standby(a), ago(a["created"])] for a in addons],
              ["KIND", "PLAN", "STATE", "CONFIG VAR", "WHERE", "STANDBY", "CREATED"])

    return out(args, addons, human)


def cmd_create(args: argparse.Namespace) -> int:
    name = app_of(args)
    body: dict[str, Any] = {"kind": args.kind}
    if args.dedicated:
        body["plan"] = "dedicated"
    if args.memory is not None:
        body["memory_mb"] = args.memory
    if args.standby:
        body["standby"] = True
        if args.kind == "postgres":
            body["plan"] = "dedicated"
    client = Client.from_config()
    client.timeout = max(client.timeout, 300.0)
    a = client.post(f"apps/{name}/addons", body)
    return out(args, a, f"Created {a['plan']} {a['kind']} for {name} ({_where(a)}); "
                        f"{a['config_var']} is set in a new release")


def cmd_info(args: argparse.Namespace) -> int:
    name = app_of(args)
    a = Client.from_config().get(f"apps/{name}/addons/{args.kind}")

    def human() -> None:
        print(f"=== {name} {a['kind']}")
        print(f"Plan:       {a['plan']}")
        print(f"State:      {a['state']}")
        print(f"Where:      {_where(a)}" + (f" (runner {a['node']})" if a.get("node") else ""))
        if a.get("memory_mb"):
            print(f"Memory:     {a['memory_mb']} MB")
        print(f"Config var: {a['config_var']} (epio config get {a['config_var']})")
        if a.get("standby"):
            print(f"Standby:    {_standby(a)} (epoch {a['epoch']})")
        print(f"Created:    {ago(a['created'])}")

    return out(args, a, human)


def cmd_destroy(args: argparse.Namespace) -> int:
    name = app_of(args)
    confirm_name(args, name, f"This drops {name}'s {args.kind} database (after a final "
                 "backup). Type the app's name to confirm: ", "not destroyed")
    client = Client.from_config()
    path = f"apps/{name}/addons/{args.kind}" + ("?force=true" if args.force else "")
    client.timeout = max(client.timeout, 1800.0)
    result = client.request("DELETE", path)

    def human() -> None:
        final = result.get("final_backup")
        if final is None:
            print("No final backup was taken (no backup node configured, --force with none "
                  "answering, or nothing to back up)")
        elif final["status"] == "verified":
            print(f"Final backup {final['id']} verified ({final['size']} bytes)")
        else:
            print(f"Final backup {final['id']} FAILED: {final['error']} (dropped anyway: --force)")
        print(f"Destroyed {name}'s {args.kind} add-on")

    return out(args, result, human)


def cmd_failover(args: argparse.Namespace) -> int:
    name = app_of(args)
    confirm_name(args, name, f"This fences {name}'s {args.kind} primary (it is stopped and "
                 "never started again) and promotes its standby; writes not yet replicated "
                 "are lost. Type the app's name to confirm: ", "no failover")
    client = Client.from_config()
    client.timeout = max(client.timeout, 600.0)
    r = client.post(f"apps/{name}/addons/{args.kind}/failover", {})
    standby = r.get("standby") or {}
    return out(args, r, f"{name}'s {args.kind} fails over from {r['from_node']} to "
                        f"{r['to_node']} ({r['host']}:{r['port']}, epoch {r['epoch']}); its "
                        f"config var is set in a new release; new standby: "
                        f"{standby.get('state', 'none')}"
                        + (f" on {standby['node']}" if standby.get("node") else ""))


def cmd_snapshots(args: argparse.Namespace) -> int:
    name = app_of(args)
    snaps = Client.from_config().get(f"apps/{name}/addons/{args.kind}/snapshots")

    def human() -> None:
        if not snaps:
            print(f"{name}'s {args.kind} has no snapshots (its data dir must be a btrfs "
                  "subvolume; see docs/databases.md)")
            return
        table([[s["id"], s["kind"], ago(s["created"])] for s in snaps], ["ID", "KIND", "TAKEN"])

    return out(args, snaps, human)


def cmd_snapshot_restore(args: argparse.Namespace) -> int:
    name = app_of(args)
    confirm_name(args, name, f"This stops {name}'s {args.kind} server and replaces its data "
                 f"with snapshot {args.id} (the current data is kept aside on its runner). "
                 "Type the app's name to confirm: ", "not restored")
    client = Client.from_config()
    client.timeout = max(client.timeout, 600.0)
    r = client.post(f"apps/{name}/addons/{args.kind}/snapshots/{args.id}/restore", {})
    return out(args, r, f"Restored snapshot {args.id} of {name}'s {args.kind}; the previous "
                        f"data is kept on its runner as {r['kept_as']}")


# The password goes to psql through PGPASSWORD (percent-decoded), never argv: psql's
# command line (/proc/PID/cmdline) is readable by every user of the host.  The URL it
# gets has the user, host, database and options, without the password.
PSQL = (
    '[ -n "$DATABASE_URL" ] || { echo "this app has no DATABASE_URL: epio addons create '
    'postgres" >&2; exit 1; }; '
    'u=${DATABASE_URL#*://}; auth=${u%%/*}; tail=${u#"$auth"}; '
    'case $auth in *@*) ui=${auth%@*}; hp=${auth##*@};; *) ui=; hp=$auth;; esac; '
    'case $ui in *:*) pw=${ui#*:}; ui=${ui%%:*}; d=; '
    'while [ -n "$pw" ]; do case $pw in '
    '%[0-9A-Fa-f][0-9A-Fa-f]*) h=${pw#%}; h=${h%"${h#??}"}; '
    'd=$d$(printf "\\\\$(printf %o $((0x$h)))"); pw=${pw#%??};; '
    '*) c=${pw%"${pw#?}"}; d=$d$c; pw=${pw#?};; esac; done; '
    'PGPASSWORD=$d; export PGPASSWORD;; esac; '
    'url=${DATABASE_URL%%://*}://${ui:+$ui@}$hp$tail; unset DATABASE_URL; '
    'p=$(ls -d /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -n 1); '
    '[ -x "$p" ] || p=psql; exec "$p" "$url" "$@"'
)
REDIS_CLI = (
    '[ -n "$REDIS_URL" ] || { echo "this app has no REDIS_URL: epio addons create redis" >&2; '
    'exit 1; }; u=${REDIS_URL#redis://}; a=${u%%@*}; hp=${u#*@}; hp=${hp%%/*}; '
    'h=${hp%:*}; h=${h#[}; h=${h%]}; REDISCLI_AUTH=${a#*:} exec redis-cli -h "$h" '
    '-p "${hp##*:}" "$@"'
)


def _shell(args: argparse.Namespace, script: str, name: str) -> int:
    """``epio run -- sh -c SCRIPT NAME ARGS...`` through the ``epio run`` machinery."""
    from epio.cli.run import cmd_run

    extra = list(args.args or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    run_args = argparse.Namespace(
        app=args.app, json=False, command=["sh", "-c", script, name, *extra], list=False,
        history=False, kill=None, attach=None, detach=False, no_tty=args.no_tty,
        quiet=args.quiet, announce=False)  # the tool's own output only, on success
    return cmd_run(run_args)


def cmd_psql(args: argparse.Namespace) -> int:
    return _shell(args, PSQL, "psql")


def cmd_redis_cli(args: argparse.Namespace) -> int:
    return _shell(args, REDIS_CLI, "redis-cli")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    for name, func, what in (("psql", cmd_psql, "psql connected to the app's DATABASE_URL"),
                             ("redis-cli", cmd_redis_cli,
                              "redis-cli connected to the app's REDIS_URL")):
        q = sub.add_parser(name, parents=[common], help=f"{what} (an epio run session)")
        q.add_argument("--no-tty", "-T", action="store_true", help="no terminal (pipes)")
        q.add_argument("--quiet", "-q", action="store_true", help="no session notices")
        q.add_argument("args", nargs=argparse.REMAINDER, help=f"-- extra {name} arguments")
        q.set_defaults(func=func)
    p = sub.add_parser("addons", parents=[common], help="list, create, show, destroy databases",
                       description=__doc__)
    asub = p.add_subparsers(dest="addons_command", metavar="SUBCOMMAND")
    p.set_defaults(func=cmd_list)
    q = asub.add_parser("list", parents=[common], help="list the app's add-ons")
    q.set_defaults(func=cmd_list)
    q = asub.add_parser("create", parents=[common], help="provision postgres or redis")
    q.add_argument("kind", choices=KINDS)
    q.add_argument("--dedicated", action="store_true",
                   help="postgres: a server of its own on a runner (redis always is)")
    q.add_argument("--memory", type=int, metavar="MB", help="redis: maxmemory in MB (16)")
    q.add_argument("--standby", action="store_true",
                   help="a dedicated server with a standby on another runner (postgres: "
                        "implies --dedicated)")
    q.set_defaults(func=cmd_create)
    q = asub.add_parser("failover", parents=[common],
                        help="fence the primary, promote the standby")
    q.add_argument("kind", choices=KINDS)
    q.add_argument("--confirm", metavar="APP", help="the app's name, to confirm")
    q.set_defaults(func=cmd_failover)
    q = asub.add_parser("info", parents=[common], help="show one add-on")
    q.add_argument("kind", choices=KINDS)
    q.set_defaults(func=cmd_info)
    q = asub.add_parser("destroy", parents=[common],
                        help="final backup, then drop the database")
    q.add_argument("kind", choices=KINDS)
    q.add_argument("--confirm", metavar="APP", help="the app's name, to confirm")
    q.add_argument("--force", action="store_true",
                   help="drop even if the final backup fails")
    q.set_defaults(func=cmd_destroy)
    q = asub.add_parser("snapshots", parents=[common],
                        help="list the btrfs snapshots of a dedicated server's data")
    q.add_argument("kind", choices=KINDS)
    q.set_defaults(func=cmd_snapshots)
    q = asub.add_parser("snapshot-restore", parents=[common],
                        help="make a dedicated server's data a snapshot's")
    q.add_argument("kind", choices=KINDS)
    q.add_argument("id", help="the snapshot (epio addons snapshots KIND)")
    q.add_argument("--confirm", metavar="APP", help="the app's name, to confirm")
    q.set_defaults(func=cmd_snapshot_restore)
