"""Entry point of the ``epio`` console script.

Commands live in modules listed in :data:`COMMAND_MODULES`; each has
``register(subparsers, common)`` adding its subcommands (``common`` is the
parent parser with ``--app`` and ``--json``).  A module that is not there yet
is skipped, so another part of epio can add ``epio/cli/<name>.py`` (logs,
run, addons, backups) without editing this file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from epio import __version__
from epio.cli.client import CliError

COMMAND_MODULES = (
    "epio.cli.commands",
    "epio.cli.logs",
    "epio.cli.run",
    "epio.cli.addons",
    "epio.cli.backups",
    "epio.cli.cron",
)


def common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--app", "-a", metavar="NAME",
                        help="the app (default: from .epio-app in this directory or above)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epio", description="Deploy and manage Python web apps on an epio platform.",
        epilog="Run `epio COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"epio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = common_options()
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):
                continue
            raise
        module.register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    func = getattr(args, "func", None)
    if func is None:
        parser.parse_args([args.command, "--help"])
        return 2
    try:
        return int(func(args) or 0)
    except CliError as e:
        print(f"epio: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("epio: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # a bug: one sentence, the details only on request
        if os.environ.get("EPIO_DEBUG"):
            raise
        print(f"epio: unexpected error ({type(e).__name__}: {e}); "
              "set EPIO_DEBUG=1 to see the details", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
