"""``epio-admin``: operator commands run on a node, straight against its store.

The ``epio`` CLI talks HTTP to the API with a token; these commands are for the
operator of a node who has no working token (the admin token file was lost, or
every admin token was revoked before the API refused that).  They read the
node's own configuration (``--config``, ``--data-dir``, ``--store``: the same
flags and meaning as ``twistd epio``), so they work against the embedded SQLite
store and a PostgreSQL store alike, with the node running or stopped.

``epio-admin join`` makes the host it runs on a node of a cluster, given the
store URL and a join token (epio.joining; docs/cluster.md).

``epio-admin join-token create`` makes a join token for one new host, as
``POST /api/v1/cluster/join-tokens`` does, from the node's own cluster secret and
configuration: the token goes to stdout once (nothing else does), an audit line with
its id, never the token, to stderr.  A node whose store is SQLite makes none.

``epio-admin token create`` mints an admin token, writes it to
``DATA_DIR/admin-token`` (0600, atomically) and audits it: the token's stored
description says who made it, where and how, and one line on stderr says the
same.  The secret itself is only ever in the file.
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from attrs import frozen
from twisted.internet.interfaces import IReactorTime

from epio import __version__
from epio.api.domain import ADMIN_NAME, write_token_file
from epio.config import Config, ConfigError, load_config
from epio.store import Conflict, NotFound, Store, StoreError, open_store
from epio.store.service import default_sqlite_url, redact_url


class AdminError(Exception):
    """A refusal for the operator: one sentence, exit status 1, no traceback."""


@frozen
class MintedToken:
    """What ``token create`` did (never the secret itself)."""

    path: Path
    token_id: str
    user: str
    created_user: bool
    description: str


def operator_description() -> str:
    """Who mints the token, from where: the audit text stored with it."""
    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = f"uid {os.getuid()}"
    return f"minted by epio-admin on {socket.gethostname()} (operator {who})"[:200]


async def mint_admin_token(store: Store, data_dir: Path, user_name: str | None) -> MintedToken:
    """Issue an admin token for ``user_name`` (default: the first-start ``admin``) and
    write it to ``data_dir/admin-token``.

    The default admin is created again if it is gone; a named user must exist
    and be an admin (this command restores access, it does not grant it).
    """
    name = user_name or ADMIN_NAME
    created = False
    try:
        user = await store.get_user_by_name(name)
    except NotFound:
        if user_name is not None:
            raise AdminError(f"no user named {name!r}") from None
        try:
            user = await store.create_user(name, None, is_admin=True)
            created = True
        except Conflict:  # created meanwhile by a starting api
            user = await store.get_user_by_name(name)
    if not user.is_admin:
        raise AdminError(f"user {name!r} is not an admin; "
                         "name an admin with --user (or omit it for the default admin)")
    description = operator_description()
    new = await store.create_token(user.id, description)
    path = write_token_file(data_dir, new.token)
    return MintedToken(path, new.info.id, user.name, created, description)


def store_url(config: Config, data_dir: Path) -> str:
    """The node's store URL; for the embedded default, refuse a data dir without one
    (a mistyped --data-dir must not get a fresh, empty store)."""
    url = config.settings.store.url or default_sqlite_url(data_dir)
    if url.startswith("sqlite:///"):
        db = Path(url[len("sqlite:///"):])
        if not db.is_file():
            raise AdminError(f"no store at {db}: is {data_dir} the data dir of a node that "
                             "has started once (or is store.url missing from --config)?")
    return url


def node_config(args: argparse.Namespace) -> tuple[Config, Path]:
    """The node's configuration (``--config``, ``--data-dir``, ``--store`` over it) and
    its data dir, which must exist."""
    overrides: dict[str, dict[str, Any]] = {}
    if args.data_dir is not None:
        overrides["node"] = {"data_dir": args.data_dir}
    if args.store is not None:
        overrides["store"] = {"url": args.store}
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        raise AdminError(str(e)) from None
    data_dir = Path(config.settings.node.data_dir or "epio-data").absolute()
    if not data_dir.is_dir():
        raise AdminError(f"no data dir {data_dir}")
    return config, data_dir


async def open_node_store(reactor: IReactorTime, config: Config, url: str) -> Store:
    """The node's store as it is (no migration), one connection."""
    section = config.settings.store
    try:
        return await open_store(url, reactor, migrate_schema=False,
                                pool_size=1, connect_timeout=section.connect_timeout,
                                busy_timeout=section.busy_timeout)
    except (StoreError, ValueError) as e:
        raise AdminError(f"cannot open the store {redact_url(url)}: {e}") from None


async def token_create(reactor: IReactorTime, args: argparse.Namespace) -> int:
    config, data_dir = node_config(args)
    url = store_url(config, data_dir)
    store = await open_node_store(reactor, config, url)
    try:
        minted = await mint_admin_token(store, data_dir, args.user)
    except StoreError as e:
        raise AdminError(f"store {redact_url(url)}: {e}") from None
    finally:
        await store.close()
    # the audit line: who, where, which token id -- never the token
    print(f"epio-admin: audit: admin token {minted.token_id} for user {minted.user!r} "
          f"{minted.description}; store {redact_url(url)}"
          f"{'; the admin user was created again' if minted.created_user else ''}",
          file=sys.stderr)
    from epio.api.settings import ApiSettings

    # the routed URL when the platform is served through the routers (api.hostname)
    routed = ApiSettings.from_config(config).platform_url() or "URL"
    print(f"wrote a new admin token to {minted.path} (mode 0600); log in with:\n"
          f"  epio login --api {routed} < {minted.path}")
    return 0


async def join_token_create(reactor: IReactorTime, args: argparse.Namespace) -> int:
    """``epio-admin join-token create``: a join token for one new host (epio.cluster),
    as the api's ``POST /cluster/join-tokens`` makes one, from this node's secret and
    shared settings."""
    from epio.cluster import DEFAULT_TTL, JoinIssuer, follows_store, shared_settings
    from epio.node import NodeSetupError, read_or_create_secret

    config, data_dir = node_config(args)
    url = config.settings.store.url or default_sqlite_url(data_dir)
    if not follows_store(url):  # as the api's 409 not_a_cluster
        raise AdminError(f"no join token: this node's store ({redact_url(url)}) is not "
                         "PostgreSQL (a single-box store cannot be joined)")
    secret_path = Path(config.settings.cluster.secret_file or data_dir / "cluster-secret")
    if not secret_path.is_file():  # never make one here: it would be no cluster's
        raise AdminError(f"no cluster secret at {secret_path}: is {data_dir} the data dir "
                         "of a node of the cluster (or cluster.secret_file missing from "
                         "--config)?")
    try:
        secret = read_or_create_secret(secret_path)
    except NodeSetupError as e:
        raise AdminError(str(e)) from None
    issuer = JoinIssuer(secret, shared_settings(config.settings))
    description = operator_description()
    store = await open_node_store(reactor, config, url)
    try:
        new = await issuer.issue(store, args.node_id, args.ttl, description)
    except StoreError as e:  # InvalidValue (ttl, node id) too: its sentence
        raise AdminError(str(e)) from None
    finally:
        await store.close()
    info = new.info
    ttl = args.ttl if args.ttl is not None else DEFAULT_TTL
    expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.expires))
    # the audit line: which token, for which node, who -- never the token
    print(f"epio-admin: audit: join token {info.id} for node {info.node_id!r} "
          f"{description}; store {redact_url(url)}", file=sys.stderr)
    print(f"epio-admin: join token for node {info.node_id}, single use, valid until "
          f"{expires} ({ttl:g} s); give it on stdin to the new host's\n"
          f"  epio-admin join --token - --store URL --role ROLES",
          file=sys.stderr)
    print(new.token)  # the only line on stdout, and the only place the token is
    return 0


async def join_cluster(reactor: Any, args: argparse.Namespace) -> int:
    """``epio-admin join``: this host becomes a node of the cluster (epio.joining)."""
    from twisted.python.usage import UsageError

    from epio.cluster import JoinError
    from epio.joining import join, parse_sets
    from epio.tap import ROLES, parse_roles

    try:
        roles = parse_roles(args.role)
    except UsageError as e:
        raise AdminError(str(e)) from None
    token = args.token
    if token == "-":
        token = sys.stdin.readline().strip()
    data_dir = Path(args.data_dir).absolute()
    config_path = Path(args.config).absolute() if args.config else data_dir / "epio.toml"
    try:
        joined = await join(reactor, store_url=args.store, token=token,
                            roles=[r for r in ROLES if r in roles], data_dir=data_dir,
                            config_path=config_path, address=args.address,
                            sets=parse_sets(args.set or []), used_by=operator_description())
    except JoinError as e:
        raise AdminError(str(e)) from None
    role_list = ",".join(r for r in ROLES if r in roles)
    lists = joined.lists
    print(f"epio-admin: audit: joined as node {joined.node_id!r} with join token "
          f"{joined.token_id} ({operator_description()})", file=sys.stderr)
    print(f"joined the cluster as node {joined.node_id} at {joined.address}\n"
          f"  config       {joined.config_path} (0600)\n"
          f"  data dir     {joined.data_dir} (cluster secret in cluster-secret, 0600)\n"
          f"  nexus        {' '.join(lists.nexus_endpoints('router')) or 'none yet'}\n"
          f"  loggers      {' '.join(lists.loggers) or 'none yet'}\n"
          f"start it with:\n"
          f"  twistd -n --pidfile= epio --config {joined.config_path} --role={role_list}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epio-admin",
        description="Operator commands for an epio node, run on the node against its store.")
    parser.add_argument("--version", action="version", version=f"epio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    token = sub.add_parser("token", help="admin API tokens")
    token_sub = token.add_subparsers(dest="action", metavar="ACTION")
    create = token_sub.add_parser(
        "create", help="mint an admin token into DATA_DIR/admin-token (0600), audited",
        description="Mint a new admin API token and write it to DATA_DIR/admin-token "
                    "(mode 0600). The way back in when no admin token works.")
    create.add_argument("--data-dir", "-d", metavar="DIR",
                        help="the node's data dir (overrides node.data_dir)")
    create.add_argument("--config", "-c", metavar="FILE",
                        help="the node's configuration file (for store.url and the data dir)")
    create.add_argument("--store", metavar="URL", help="store URL (overrides store.url)")
    create.add_argument("--user", metavar="NAME",
                        help="the admin to mint for (default: admin, created again if gone)")
    create.set_defaults(func=token_create)
    join_token = sub.add_parser("join-token", help="join tokens for new hosts")
    join_token_sub = join_token.add_subparsers(dest="action", metavar="ACTION")
    jcreate = join_token_sub.add_parser(
        "create", help="make a single-use join token for one new host (PostgreSQL store)",
        description="Make a join token for one new host, as POST /api/v1/cluster/"
                    "join-tokens does, from this node's cluster secret and configuration. "
                    "The token is printed once, alone on stdout (pipe it to the new host's "
                    "`epio-admin join --token -`); the audit line and the hint go to "
                    "stderr. A node whose store is SQLite makes none. docs/cluster.md")
    jcreate.add_argument("--data-dir", "-d", metavar="DIR",
                         help="the node's data dir (overrides node.data_dir)")
    jcreate.add_argument("--config", "-c", metavar="FILE",
                         help="the node's configuration file (store.url, the data dir, the "
                              "settings every node shares)")
    jcreate.add_argument("--store", metavar="URL", help="store URL (overrides store.url)")
    jcreate.add_argument("--node-id", metavar="ID",
                         help="the node id the token grants (default node-<8 hex>)")
    jcreate.add_argument("--ttl", type=float, metavar="SECONDS",
                         help="seconds the token is valid (default 3600, at most 86400)")
    jcreate.set_defaults(func=join_token_create)
    join = sub.add_parser(
        "join", help="make this host a node of a cluster: one command, a join token",
        description="Join the cluster whose store is at --store with a join token from "
                    "its api (POST /api/v1/cluster/join-tokens, admins only). Writes the "
                    "node's data dir (with the cluster secret) and its config file; "
                    "`twistd -n epio --config FILE --role=ROLES` then starts it. The "
                    "token works once, before it expires. docs/cluster.md")
    join.add_argument("--store", required=True, metavar="URL",
                      help="the cluster's store (postgresql://...)")
    join.add_argument("--token", required=True, metavar="TOKEN",
                      help="the join token (- reads it from stdin)")
    join.add_argument("--role", "-r", required=True, metavar="ROLES",
                      help="comma-separated roles of the new node (as twistd epio --role)")
    join.add_argument("--data-dir", "-d", default="/var/lib/epio", metavar="DIR",
                      help="the node's data dir (default /var/lib/epio)")
    join.add_argument("--config", "-c", metavar="FILE",
                      help="the config file to write (default DATA_DIR/epio.toml)")
    join.add_argument("--address", metavar="ADDR",
                      help="this host's address the other nodes reach it at (default: the "
                           "one on the route to the store)")
    join.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                      help="one more config key for this node (TOML value), repeatable")
    join.set_defaults(func=join_cluster)
    return parser


def main(argv: list[str] | None = None) -> None:
    """The ``epio-admin`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        sys.exit(2)
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    async def run(reactor: IReactorTime) -> None:
        try:
            code = await func(reactor, args)
        except AdminError as e:
            print(f"epio-admin: {e}", file=sys.stderr)
            code = 1
        if code:
            raise SystemExit(code)

    react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
