"""``epio cron``: the app's ``[cron]`` entries, their last run and status.

``epio ps`` also lists the entries whose last run failed (:func:`failing_lines`).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from epio.cli.client import Client
from epio.cli.commands import ago, app_of, out, table


def _at(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _last(entry: dict[str, Any]) -> str:
    run = entry.get("last_run")
    if not run:
        return "-"
    how = ""
    if run.get("exit_signal"):
        how = f" ({run['exit_signal']})"
    elif run.get("exit_status") not in (None, 0):
        how = f" (exit {run['exit_status']})"
    return f"run.{run['number']} {ago(run['started'])}{how}"


def cmd_cron(args: argparse.Namespace) -> int:
    name = app_of(args)
    entries = Client.from_config().get(f"apps/{name}/cron")

    def human() -> None:
        if not entries:
            print(f"{name} has no [cron] entries in its current release")
            return
        table([[e["name"], e["schedule"], e["status"], _last(e), _at(e.get("next_slot")),
                e["command"]] for e in entries],
              ["NAME", "SCHEDULE (UTC)", "STATUS", "LAST RUN", "NEXT", "COMMAND"])
        for e in entries:
            if e["status"] in ("failed", "skipped", "missed") and e.get("reason"):
                print(f"{e['name']}: {e['status']}: {e['reason']}")

    return out(args, entries, human)


def failing_lines(client: Client, app: str) -> list[str]:
    """One line per cron entry whose last run failed (for ``epio ps``)."""
    lines = []
    for e in client.get(f"apps/{app}/cron"):
        if e["status"] == "failed":
            why = f": {e['reason']}" if e.get("reason") else ""
            lines.append(f"cron {e['name']} FAILED ({_last(e)}){why}; "
                         f"see epio logs --source cron.{e['name']}")
    return lines


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("cron", parents=[common], help="list the app's [cron] entries",
                       description="The [cron] entries of the app's current release: schedule "
                                   "(UTC), status of the last run, next run.")
    p.set_defaults(func=cmd_cron)
