"""``epio-admin join``: make this host a node of an existing cluster, in one command.

Given the store URL and a join token from the api (``POST
/api/v1/cluster/join-tokens``), :func:`join`:

1. checks everything it can before the token is used: the roles, that the config
   file and the data dir's secret do not exist yet (a host joins once), that every
   ``--set`` key is known and valid, which address this host has towards the store;
2. redeems the token in the store (once, before it expires; epio.cluster.redeem): the
   node id, the cluster secret (unsealed with the token, never printed or logged),
   the settings every node shares (domain, app UID range, bus encryption);
3. reads the nexus and logger endpoint lists from the store;
4. writes ``DATA_DIR/cluster-secret`` (0600), ``DATA_DIR/cluster-endpoints.json``
   (the lists: the node starts with them and then follows the store) and the config
   file (0600: the store URL may carry a password), whose ``cluster.nexus`` and
   ``cluster.loggers`` are empty: the node follows the store's lists.

``twistd -n epio --config FILE --role=ROLES`` then starts the node.
"""

from __future__ import annotations

import socket
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from attrs import frozen

from epio.cluster import (
    EndpointLists,
    JoinError,
    follows_store,
    redeem,
    to_toml,
    valid_token_form,
    write_cache,
)
from epio.config import ConfigError, validate
from epio.secretfile import write_secret_file

#: the ports a joined node binds on its address (the defaults of each role's keys)
PORTS = {"api": 8000, "lb": 8080, "runner": 7731, "backup": 7741, "metrics": 9100}
NEXUS_PORTS = (7711, 7712, 7713)  # heartbeat, router, publish
LOGGER_PORTS = (7721, 7722, 7723)  # pull, router, publish
#: seconds the join waits for the store's first connection
CONNECT_TIMEOUT = 10.0


def store_hosts(url: str) -> list[tuple[str, int]]:
    """The (host, port) pairs of a postgresql:// URL (several for a primary and standbys)."""
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    out = []
    for part in netloc.split(","):
        if not part:
            continue
        if part.startswith("["):
            host, _, rest = part[1:].partition("]")
            port = rest.lstrip(":")
        else:
            host, _, port = part.partition(":")
        out.append((host, int(port) if port.isdigit() else 5432))
    return out


def address_towards(url: str) -> str:
    """This host's address on the route to the store's first host (no packet is sent:
    a UDP socket's connect only picks the route)."""
    hosts = store_hosts(url)
    if not hosts:
        raise JoinError("the store URL names no host; give this host's address with --address")
    host, port = hosts[0]
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(info[0], socket.SOCK_DGRAM) as s:
            s.connect(info[4])
            return str(s.getsockname()[0])
    except OSError as e:
        raise JoinError(f"cannot find this host's address towards the store ({host}: "
                        f"{e.strerror}); give it with --address") from None


def parse_sets(items: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``SECTION.KEY=VALUE`` items (VALUE in TOML; a bare word is a string)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, eq, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not eq or not dot or not section or not key:
            raise JoinError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        out.setdefault(section, {})[key] = value
    return out


def _endpoint_host(addr: str) -> str:
    """The host part of a ZeroMQ endpoint: an IPv6 address in brackets."""
    return f"[{addr}]" if ":" in addr else addr


def _listen(port: int, addr: str) -> str:
    """A Twisted server endpoint string on ``addr`` (IPv6: ``tcp6``, colons escaped)."""
    if ":" in addr:
        return f"tcp6:{port}:interface=" + addr.replace(":", "\\:")
    return f"tcp:{port}:interface={addr}"


def node_config(*, node_id: str, data_dir: Path, store_url: str, address: str,
                roles: Iterable[str], shared: Mapping[str, Mapping[str, Any]],
                sets: Mapping[str, Mapping[str, Any]],
                logger_peers: Sequence[Mapping[str, str]] = ()) -> dict[str, dict[str, Any]]:
    """The joined node's configuration: its id, data dir and store; the shared settings;
    every role's listeners on ``address`` (default ports); empty hand-written lists
    (the node follows the store's); an api's ``logger.peers`` (the loggers it queries,
    as listed in the store at the join); then ``sets`` over all of it."""
    host = _endpoint_host(address)
    doc: dict[str, dict[str, Any]] = {
        "node": {"id": node_id, "data_dir": str(data_dir)},
        "store": {"url": store_url},
        "cluster": {"secret_file": str(data_dir / "cluster-secret"), "nexus": [],
                    "loggers": []},
        "metrics": {"listen": _listen(PORTS["metrics"], address)},
    }
    for section, table in shared.items():
        doc.setdefault(section, {}).update(table)
    roles = set(roles)
    if "api" in roles:
        doc.setdefault("api", {})["listen"] = _listen(PORTS["api"], address)
        doc.setdefault("logger", {})["peers"] = [dict(p) for p in logger_peers]
    if "lb" in roles:
        doc.setdefault("lb", {})["listen"] = _listen(PORTS["lb"], address)
    if "nexus" in roles:
        hb, router, pub = NEXUS_PORTS
        doc["nexus"] = {"heartbeat_bind": f"tcp://{host}:{hb}",
                        "router_bind": f"tcp://{host}:{router}",
                        "publish_bind": f"tcp://{host}:{pub}"}
    if "logger" in roles:
        pull, router, pub = LOGGER_PORTS
        own = {"router": f"tcp://{host}:{router}", "publish": f"tcp://{host}:{pub}"}
        logger = doc.setdefault("logger", {})
        logger.update({"pull_bind": f"tcp://{host}:{pull}", "router_bind": own["router"],
                       "publish_bind": own["publish"]})
        if "api" in roles:  # the api asks its own logger too
            logger["peers"] = [own, *logger["peers"]]
    if "runner" in roles:
        doc.setdefault("runner", {}).update({
            "control_bind": f"tcp://{host}:{PORTS['runner']}", "advertise_host": address})
    if "backup" in roles:
        doc.setdefault("backup", {})["control_bind"] = f"tcp://{host}:{PORTS['backup']}"
    for section, table in sets.items():
        doc.setdefault(section, {}).update(table)
    return doc


def check_config(doc: Mapping[str, Any]) -> None:
    try:
        validate(doc)
    except ConfigError as e:
        raise JoinError("the joined node's configuration would be invalid:\n"
                        + "\n".join("  - " + err for err in e.errors)) from None


@frozen
class Joined:
    """What a join did (never the secret)."""

    node_id: str
    token_id: str
    config_path: Path
    data_dir: Path
    lists: EndpointLists
    address: str


async def join(reactor: Any, *, store_url: str, token: str, roles: Sequence[str],
               data_dir: Path, config_path: Path, address: str | None,
               sets: Mapping[str, Mapping[str, Any]], used_by: str) -> Joined:
    """Join the cluster of ``store_url`` with ``token`` (see the module's docstring)."""
    from epio.store import StoreError, open_store
    from epio.store.cluster import read_endpoints
    from epio.store.service import redact_url

    if not follows_store(store_url):
        raise JoinError("a host joins a cluster whose store is PostgreSQL "
                        "(postgresql://...); an SQLite store is one box's")
    if not valid_token_form(token):
        raise JoinError("not a join token (they start with epiojoin_); get one from "
                        "POST /api/v1/cluster/join-tokens")
    if config_path.exists():
        raise JoinError(f"{config_path} exists: this host has a configuration already "
                        "(a host joins once; remove it to join again)")
    secret_path = data_dir / "cluster-secret"
    if secret_path.exists():
        raise JoinError(f"{secret_path} exists: this data dir belongs to a node already")
    addr = address or address_towards(store_url)
    # every check that needs no token first: a refused --set must not use the token up
    check_config(node_config(node_id="joining", data_dir=data_dir, store_url=store_url,
                             address=addr, roles=roles, shared={}, sets=sets))
    default_ttl = validate({}).settings.cluster.endpoint_ttl
    try:
        store = await open_store(store_url, reactor, migrate_schema=False, pool_size=1,
                                 connect_timeout=CONNECT_TIMEOUT)
    except (StoreError, ValueError) as e:
        raise JoinError(f"cannot open the store {redact_url(store_url)}: {e}") from None
    try:
        grant = await redeem(store, token, used_by)
        rows = await read_endpoints(store, float(sets.get("cluster", {}).get(
            "endpoint_ttl", default_ttl)))
    except StoreError as e:
        raise JoinError(f"store {redact_url(store_url)}: {e}") from None
    finally:
        await store.close()
    doc = node_config(node_id=grant.node_id, data_dir=data_dir, store_url=store_url,
                      address=addr, roles=roles, shared=grant.shared, sets=sets,
                      logger_peers=[p for _, p in rows.logger_peers])
    check_config(doc)
    lists = EndpointLists.from_rows(rows)  # the routers too: a runner's fence lets them in
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o711)
    write_secret_file(secret_path, grant.secret.hex() + "\n")
    write_cache(data_dir, lists)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    write_secret_file(config_path, to_toml(doc, header=[
        f"epio node {grant.node_id}: written by epio-admin join (token {grant.token_id}).",
        "cluster.nexus and cluster.loggers are empty: this node follows the lists in the",
        "store (docs/cluster.md); entries added here are merged with them.",
    ]))
    return Joined(grant.node_id, grant.token_id, config_path, data_dir, lists, addr)
