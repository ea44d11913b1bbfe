"""``epio backups list|create|restore [ID] [--to-app B]|download [ID]``.

Only ``verified`` backups (restored and checked after they were taken) count:
failed ones are listed as FAILED with their reason, ``create`` exits non-zero
when a backup failed, and ``restore`` refuses them.  A verified backup that looks
wrong next to the last good one (empty, or a size collapse) is FLAGGED, with the
reason, in its own column.  Without an ID, ``restore`` and ``download`` use the
newest verified backup that is not flagged (else the newest flagged one).
The COPIES column says where each backup is: ``local`` (on the backup node),
``archive`` (its offsite copy by ``backup.archive_command``), ``s3://BUCKET/KEY``
(its copy in the S3 archive target), or ``ARCHIVE FAILED`` with the reason.  ``restore`` of a backup kept only in the archive (pruned
locally, or the backup node's disk wiped: give its ID) fetches and checks it first.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from epio.cli.client import USER_AGENT, Client, CliError, _reason, api_error
from epio.cli.commands import ago, app_of, confirm_name, human_size, out, table

KINDS = ("postgres", "redis")
LONG = 1800.0  # seconds: a backup or restore waits for verification


def status_text(b: dict[str, Any]) -> str:
    if b["status"] == "verified":
        return "verified" + (f" (kept: {b['pinned']})" if b.get("pinned") else "")
    if b["status"] == "running":
        return "running"
    return "FAILED" + (f": {b['error']}" if b.get("error") else "")


def copies_text(b: dict[str, Any]) -> str:
    """Where the backup's copies are: on the backup node (``local``), offsite by
    archive_command (``archive``), in S3 (``s3://BUCKET/KEY``)."""
    if b.get("status") != "verified":
        return "-"
    where = ["local"] if b.get("local", True) else []
    copies = b.get("copies") or []
    if not copies and b.get("archive") == "archived":  # an api from before copies
        where.append("archive")
    for c in copies:
        if c.get("state") == "archived":
            where.append("archive" if c.get("target") == "command" else str(c.get("where")))
    text = ", ".join(where) or "-"
    failed = [c for c in copies if c.get("state") != "archived"]
    if failed or (not copies and b.get("archive") == "failed"):
        # each reason names its target (backup.archive_command ..., S3 PUT ...)
        why = ("; ".join(str(c.get("error") or "no reason") for c in failed) if failed
               else b.get("archive_error") or "no reason")
        text += f" (ARCHIVE FAILED: {why})"
    return text


COLUMNS = ["ID", "KIND", "STATUS", "TAKEN", "SIZE", "COPIES", "FLAGGED"]


def _rows(backups: list[dict[str, Any]]) -> list[list[Any]]:
    return [[b["id"], b["kind"], status_text(b), ago(b["created"]),
             human_size(b["size"]) if b["size"] else "-", copies_text(b),
             f"FLAGGED: {b['suspicious']}" if b.get("suspicious") else "-"] for b in backups]


def _newest_verified(client: Client, name: str, kind: str | None) -> dict[str, Any]:
    query = {"kind": kind} if kind else {}
    verified = [b for b in client.get(f"apps/{name}/backups", **query)
                if b["status"] == "verified"]
    for b in sorted(verified, key=lambda b: bool(b.get("suspicious"))):  # stable: newest
        return dict(b)
    raise CliError(f"{name} has no verified backup" + (f" of {kind}" if kind else ""))


def cmd_list(args: argparse.Namespace) -> int:
    name = app_of(args)
    query = {"kind": args.kind} if args.kind else {}
    backups = Client.from_config().get(f"apps/{name}/backups", **query)

    def human() -> None:
        if not backups:
            print(f"{name} has no backups yet: epio backups create")
            return
        table(_rows(backups), COLUMNS)

    return out(args, backups, human)


def cmd_create(args: argparse.Namespace) -> int:
    name = app_of(args)
    client = Client.from_config()
    client.timeout = max(client.timeout, LONG)
    body = {"kind": args.kind} if args.kind else {}
    made = client.post(f"apps/{name}/backups", body)
    out(args, made, lambda: table(_rows(made), COLUMNS))
    failed = [b for b in made if b["status"] != "verified"]
    if failed:
        print(f"epio: {len(failed)} backup(s) of {name} FAILED verification; they do not "
              "count as backups", file=sys.stderr)
        return 1
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    name = app_of(args)
    client = Client.from_config()
    client.timeout = max(client.timeout, LONG)
    backup_id = args.id or _newest_verified(client, name, args.kind)["id"]
    into = args.to_app or name
    confirm_name(args, into, f"This replaces {into}'s live data with backup {backup_id} (the "
                 "current data is kept aside). Type the app's name to confirm: ", "not restored")
    body = {"to_app": args.to_app} if args.to_app else {}
    r = client.post(f"apps/{name}/backups/{backup_id}/restore", body)
    kept = f"; the previous data is kept as {r['kept_as']}" if r.get("kept_as") else ""
    return out(args, r, f"Restored backup {backup_id} of {name} into {r['into']}{kept}")


def cmd_download(args: argparse.Namespace) -> int:
    name = app_of(args)
    client = Client.from_config()
    backup = (_newest_verified(client, name, args.kind) if args.id is None
              else {"id": args.id})
    url = client.url(f"apps/{name}/backups/{backup['id']}/download")
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {client.token}",
                                               "User-Agent": USER_AGENT})
    dest = Path(args.output) if args.output else None
    digest = hashlib.sha256()
    size = 0
    try:
        with urllib.request.urlopen(req, timeout=LONG) as resp:
            expected = resp.headers.get("X-Backup-Sha256") or ""
            status = resp.headers.get("X-Backup-Status") or ""
            if dest is None:
                disp = resp.headers.get("Content-Disposition") or ""
                fname = disp.split('filename="')[-1].rstrip('"') if "filename=" in disp else \
                    f"{name}-{backup['id']}.dump"
                dest = Path(os.path.basename(fname))
            tmp = dest.with_name(dest.name + ".part")
            with open(tmp, "wb") as f:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
    except urllib.error.HTTPError as e:
        raise api_error(e) from None
    except (urllib.error.URLError, OSError) as e:
        raise CliError(f"download failed: {_reason(getattr(e, 'reason', e))}") from None
    if expected and digest.hexdigest() != expected:
        tmp.unlink(missing_ok=True)
        raise CliError("the download does not match the backup's checksum; removed it")
    os.replace(tmp, dest)
    note = "" if status == "verified" else f" (WARNING: this backup is {status or 'unverified'})"
    return out(args, {"id": backup["id"], "path": str(dest), "size": size,
                      "sha256": digest.hexdigest(), "status": status},
               f"Saved backup {backup['id']} to {dest} ({human_size(size)}, sha256 checked)"
               + note)


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("backups", parents=[common], help="list, create, restore, download "
                       "backups", description=__doc__)
    bsub = p.add_subparsers(dest="backups_command", metavar="SUBCOMMAND")
    p.set_defaults(func=cmd_list, kind=None)
    q = bsub.add_parser("list", parents=[common], help="list backups (failed ones marked)")
    q.add_argument("--kind", choices=KINDS)
    q.set_defaults(func=cmd_list)
    q = bsub.add_parser("create", parents=[common], help="back up now (waits for verification)")
    q.add_argument("--kind", choices=KINDS)
    q.set_defaults(func=cmd_create)
    q = bsub.add_parser("restore", parents=[common],
                        help="restore a verified backup (default: the newest)")
    q.add_argument("id", nargs="?", metavar="ID")
    q.add_argument("--to-app", metavar="APP", help="restore into another app of yours")
    q.add_argument("--kind", choices=KINDS, help="with no ID: the newest of this kind")
    q.add_argument("--confirm", metavar="APP", help="the target app's name, to confirm")
    q.set_defaults(func=cmd_restore)
    q = bsub.add_parser("download", parents=[common], help="download a backup file")
    q.add_argument("id", nargs="?", metavar="ID")
    q.add_argument("--kind", choices=KINDS, help="with no ID: the newest of this kind")
    q.add_argument("--output", "-o", metavar="FILE")
    q.set_defaults(func=cmd_download)
