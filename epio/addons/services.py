"""Dedicated database servers as supervised runner processes (issue 10).

A dedicated Redis or PostgreSQL of an app is one more instance on a runner,
started with an ordinary ``runner.start``: it runs under the app's UID, in its
sandbox, with the app's data directory (``$EPIO_DATA_DIR``), cgroup limits, its
output in the app's log (source ``epio-redis.1`` / ``epio-postgres.1``), and the
supervisor's crash restarts with backoff.  Its process type is one of
:data:`SERVICE_PROCESS_TYPES`: the runner gives such a process a port (``$PORT``)
and a TCP health check like a web process, the router never routes to it, and
the scheduler leaves it to the add-on code (it is not part of the formation).

The server binaries come from the host (``/usr`` is visible in the sandbox);
the image of the app's release only provides the sandbox's mount.  Secrets go
in the environment of the wrapper (readable only by the app's UID), never in
argv; the wrapper writes them into 0600 files and drops them before ``exec``.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from epio.addons.redis import SPACE_FACTOR, SPACE_MARGIN, redis_config_lines
from epio.domain import POSTGRES_PROCESS_TYPE as POSTGRES_TYPE
from epio.domain import REDIS_PROCESS_TYPE as REDIS_TYPE
from epio.domain import SERVICE_PROCESS_TYPES as SERVICE_PROCESS_TYPES  # re-exported

KIND_OF_TYPE = {REDIS_TYPE: "redis", POSTGRES_TYPE: "postgres"}
TYPE_OF_KIND = {v: k for k, v in KIND_OF_TYPE.items()}

REDIS_DIR = ".epio-redis"
POSTGRES_DIR = ".epio-postgres"
DATA_KEY = re.compile(r"^[0-9a-f]{1,32}$")
# memory for the server process beyond Redis' maxmemory (fragmentation, fork for BGSAVE)
REDIS_OVERHEAD_MB = 64
POSTGRES_MEMORY_MB = 512


def postgres_bin(configured: str = "") -> str:
    """``addons.postgres_bin``, or the newest ``/usr/lib/postgresql/*/bin``."""
    if configured:
        return configured
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                      else 0)
    return str(versions[-1].parent) if versions else "/usr/lib/postgresql/15/bin"


# The Redis wrapper: config file (0600) from the environment; data of a server that ran
# before the append-only file was on (a dump.rdb, no appendonlydir/) becomes the AOF's
# base, or Redis would start empty; the persistence guard (a snapshot only when the data
# dir has room: used memory x SPACE_FACTOR + SPACE_MARGIN, the rule of
# epio.addons.redis.PersistenceGuard); then wait for the server -- until it has really
# exited, also after a stop signal (its SHUTDOWN SAVE must finish: when this shell ends,
# the sandbox and everything in it is killed).
REDIS_SCRIPT = r"""
d="$EPIO_DATA_DIR/{dir}"
umask 077
mkdir -p "$d" || exit 1
printf '%s\n' "$EPIO_SERVICE_CONFIG" "port $PORT" "dir \"$d\"" > "$d/redis.conf" || exit 1
unset EPIO_SERVICE_CONFIG
# the role the runner was told by the add-on record at this start (epio.addons.standby)
if [ "$EPIO_SERVER_ROLE" = standby ]; then
  printf '%s\n' "replicaof $EPIO_PRIMARY_HOST $EPIO_PRIMARY_PORT" >> "$d/redis.conf" || exit 1
  echo "redis: standby of $EPIO_PRIMARY_HOST:$EPIO_PRIMARY_PORT"
fi
if [ -s "$d/dump.rdb" ] && [ ! -e "$d/appendonlydir" ]; then
  rm -rf "$d/appendonlydir.new" && mkdir "$d/appendonlydir.new" \
    && cp "$d/dump.rdb" "$d/appendonlydir.new/appendonly.aof.1.base.rdb" \
    && printf '%s\n' "file appendonly.aof.1.base.rdb seq 1 type b" \
         > "$d/appendonlydir.new/appendonly.aof.manifest" \
    && mv "$d/appendonlydir.new" "$d/appendonlydir" || exit 1
  echo "redis: the existing snapshot dump.rdb is the base of the new append-only file"
fi
redis-server "$d/redis.conf" &
server=$!
trap 'kill -TERM $server 2>/dev/null' TERM INT
(
  # sleep must not hold the output pipe: the runner sees the end of the process only
  # when every holder of it is gone
  while sleep "$EPIO_SNAPSHOT_INTERVAL" </dev/null >/dev/null 2>&1; do
    used=$(redis-cli -h "$EPIO_SERVICE_HOST" -p "$PORT" INFO memory 2>/dev/null \
           | sed -n 's/^used_memory:\([0-9]*\).*/\1/p')
    [ -n "$used" ] || continue
    need=$(( used * {num} / {den} + {margin} ))
    have=$(df --output=avail -B1 "$d" | tail -n 1 | tr -d ' ')
    if [ "$have" -lt "$need" ]; then
      echo "redis snapshot refused: $((have / 1024)) KiB free in its data directory," \
           "$((need / 1024)) KiB needed; the data is only in memory until space is freed"
    else
      redis-cli -h "$EPIO_SERVICE_HOST" -p "$PORT" BGSAVE >/dev/null 2>&1 \
        || echo "redis snapshot FAILED to start (BGSAVE)"
    fi
  done
) &
guard=$!
{wait_server}
kill $guard 2>/dev/null
exit $code
"""

# A signal interrupts ``wait``; the server may still be saving: wait until it is gone.
# ``kill -0`` succeeds on an exited, not yet reaped child; the next ``wait`` reaps it.
WAIT_SERVER = r"""wait $server
code=$?
while kill -0 $server 2>/dev/null; do
  wait $server
  code=$?
done"""

# The PostgreSQL wrapper: a cluster made on the first start; the server is stopped with
# a fast shutdown (SIGINT: open sessions are ended, a shutdown checkpoint is written)
# when the runner stops the instance, and waited for.  The runner's SIGTERM alone would
# be a smart shutdown, which waits for every client to disconnect -- past the grace,
# then SIGKILL and crash recovery at the next start.
POSTGRES_SCRIPT = r"""
d="$EPIO_DATA_DIR/{dir}"
bin={bin}
umask 077
if [ "$EPIO_SERVER_ROLE" = standby ]; then
  # a standby: a copy of the primary (pg_basebackup from its replication slot), then
  # streaming replication; the replication password only in a 0600 passfile
  printf '%s\n' "*:*:*:$EPIO_REPLICATION_USER:$EPIO_REPLICATION_PASSWORD" \
    > "$d.replication-pass" || exit 1
  if [ ! -e "$d/epio-basebackup-done" ]; then
    mkdir -p "$d" && (cd "$d" && find . -mindepth 1 -delete) || exit 1
    echo "postgres: copying the primary $EPIO_PRIMARY_HOST:$EPIO_PRIMARY_PORT (pg_basebackup)"
    PGPASSFILE="$d.replication-pass" "$bin/pg_basebackup" -h "$EPIO_PRIMARY_HOST" \
      -p "$EPIO_PRIMARY_PORT" -U "$EPIO_REPLICATION_USER" -D "$d" -X stream \
      -S "$EPIO_REPLICATION_SLOT" -c fast -w || exit 1
    touch "$d/epio-basebackup-done" || exit 1
  fi
  touch "$d/standby.signal" || exit 1
  set -- -c "primary_conninfo=host=$EPIO_PRIMARY_HOST port=$EPIO_PRIMARY_PORT user=$EPIO_REPLICATION_USER passfile='$d.replication-pass' application_name=$EPIO_REPLICATION_SLOT" \
    -c "primary_slot_name=$EPIO_REPLICATION_SLOT" -c hot_standby=on
  echo "postgres: standby of $EPIO_PRIMARY_HOST:$EPIO_PRIMARY_PORT"
else
  rm -f "$d/standby.signal"
  set --
fi
unset EPIO_REPLICATION_PASSWORD
if [ ! -s "$d/PG_VERSION" ]; then
  # empty it in place: it may be a btrfs subvolume the runner made (docs/databases.md)
  mkdir -p "$d" && (cd "$d" && find . -mindepth 1 -delete) || exit 1
  printf '%s\n' "$EPIO_SERVICE_PASSWORD" > "$TMPDIR/.pw" || exit 1
  "$bin/initdb" --no-sync -D "$d" -U "$EPIO_SERVICE_USER" --pwfile="$TMPDIR/.pw" -E UTF8 --no-locale \
    --auth-local=scram-sha-256 --auth-host=scram-sha-256 >/dev/null || {{ rm -f "$TMPDIR/.pw"; exit 1; }}
  rm -f "$TMPDIR/.pw"
  printf '%s\n' "local all $EPIO_SERVICE_USER scram-sha-256" \
    "host all $EPIO_SERVICE_USER 0.0.0.0/0 scram-sha-256" \
    "host all $EPIO_SERVICE_USER ::/0 scram-sha-256" > "$d/pg_hba.conf" || exit 1
fi
if [ -n "$EPIO_REPLICATION_USER" ]; then
  # with a standby: its replication role may connect for replication, nothing else
  printf '%s\n' "local all $EPIO_SERVICE_USER scram-sha-256" \
    "host all $EPIO_SERVICE_USER 0.0.0.0/0 scram-sha-256" \
    "host all $EPIO_SERVICE_USER ::/0 scram-sha-256" \
    "host replication $EPIO_REPLICATION_USER 0.0.0.0/0 scram-sha-256" \
    "host replication $EPIO_REPLICATION_USER ::/0 scram-sha-256" > "$d/pg_hba.conf" || exit 1
fi
unset EPIO_SERVICE_PASSWORD
"$bin/postgres" -D "$d" -p "$PORT" -k "$TMPDIR" -c listen_addresses="$EPIO_SERVICE_HOST" \
  -c dynamic_shared_memory_type=mmap -c logging_collector=off -c max_connections=50 \
  -c shared_buffers=32MB -c password_encryption=scram-sha-256 "$@" &
server=$!
trap 'echo "postgres: fast shutdown"; kill -INT $server 2>/dev/null' TERM INT
{wait_server}
exit $code
"""


def data_dir_name(base: str, data_key: str) -> str:
    """The add-on's data directory under the app's data dir: ``base-<key>``.

    Each add-on has its own key (``options["data_key"]``, made when it is provisioned),
    so a server created after a destroyed one never starts on the old one's data (for
    PostgreSQL: an old cluster whose role has the old password).  Add-ons made before
    keys existed have none and keep the plain ``base`` directory they already use.
    """
    if not data_key:
        return base
    if not DATA_KEY.match(data_key):
        raise ValueError(f"bad add-on data key {data_key!r}")
    return f"{base}-{data_key}"


def _fraction(x: float) -> tuple[int, int]:
    return int(round(x * 100)), 100


def redis_start_body(*, app: str, uid: int, instance_id: str, image_digest: str,
                     password: str, memory_mb: int, policy: str, host: str,
                     snapshot_interval: float, boot_timeout: float,
                     grace: float = 30.0, data_key: str = "",
                     epoch: int = 0) -> dict[str, Any]:
    """The ``runner.start`` body of an app's dedicated Redis.

    ``epoch`` > 0: a server of an add-on with a standby (primary or standby, as its
    runner is told at each start: :mod:`epio.addons.standby`); it authenticates to
    its primary with the app's password (``masterauth``), read-only while a replica."""
    num, den = _fraction(SPACE_FACTOR)
    script = REDIS_SCRIPT.format(dir=data_dir_name(REDIS_DIR, data_key), num=num, den=den,
                                 margin=SPACE_MARGIN, wait_server=WAIT_SERVER)
    lines = redis_config_lines(password, memory_mb, policy, host)
    if epoch:
        lines += [f"masterauth {password}", "replica-read-only yes",
                  "replica-serve-stale-data yes"]
    config = "\n".join(lines)
    env = {"EPIO_SERVICE_CONFIG": config, "EPIO_SERVICE_HOST": host,
           "EPIO_SERVICE_DIR": data_dir_name(REDIS_DIR, data_key),
           "REDISCLI_AUTH": password,
           "EPIO_SNAPSHOT_INTERVAL": str(max(1, int(snapshot_interval)))}
    if epoch:
        env["EPIO_ADDON_EPOCH"] = str(epoch)
    return {
        "instance_id": instance_id, "app": app, "uid": uid, "release": 0,
        "process_type": REDIS_TYPE, "index": 1, "command": ["/bin/sh", "-c", script],
        "image_digest": image_digest,
        "env": env,
        "limits": {"memory_mb": memory_mb + REDIS_OVERHEAD_MB, "pids": 64},
        "health_check": None, "boot_timeout": boot_timeout, "grace": grace,
    }


def postgres_start_body(*, app: str, uid: int, instance_id: str, image_digest: str,
                        user: str, password: str, host: str, pg_bin: str,
                        boot_timeout: float, grace: float = 30.0,
                        memory_mb: int = POSTGRES_MEMORY_MB,
                        data_key: str = "", epoch: int = 0,
                        repl_password: str = "") -> dict[str, Any]:
    """The ``runner.start`` body of an app's dedicated PostgreSQL server.

    ``epoch`` > 0: a server of an add-on with a standby (:mod:`epio.addons.standby`):
    its replication role may connect, and as a standby it copies and follows the
    primary from the slot named after its own data key."""
    script = POSTGRES_SCRIPT.format(dir=data_dir_name(POSTGRES_DIR, data_key),
                                    bin=shlex.quote(pg_bin), wait_server=WAIT_SERVER)
    env = {"EPIO_SERVICE_USER": user, "EPIO_SERVICE_PASSWORD": password,
           "EPIO_SERVICE_HOST": host, "EPIO_SERVICE_DIR": data_dir_name(POSTGRES_DIR, data_key)}
    if epoch:
        from epio.addons.standby import REPLICATION_USER, slot_name

        env.update({"EPIO_ADDON_EPOCH": str(epoch), "EPIO_REPLICATION_USER": REPLICATION_USER,
                    "EPIO_REPLICATION_PASSWORD": repl_password,
                    "EPIO_REPLICATION_SLOT": slot_name(data_key)})
    return {
        "instance_id": instance_id, "app": app, "uid": uid, "release": 0,
        "process_type": POSTGRES_TYPE, "index": 1, "command": ["/bin/sh", "-c", script],
        "image_digest": image_digest,
        "env": env,
        "limits": {"memory_mb": memory_mb, "pids": 128},
        "health_check": None, "boot_timeout": boot_timeout, "grace": grace,
    }
