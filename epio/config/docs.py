"""Print docs/configuration.md from the schema: ``python -m epio.config.docs``."""

from __future__ import annotations

import json

from epio.config.schema import SCHEMA

HEADER = """\
# Configuration reference

A node reads one TOML file (`twistd epio --config /etc/epio/epio.toml`). Every key is
optional; the defaults below run a single box. All errors in a file are reported
together, and unknown sections or keys are errors, so a typo never passes silently.
Command-line options (`--data-dir`, `--domain`, `--api-listen`, `--lb-listen`) override
the file.

This page is generated from `epio/config/schema.py` by `python -m epio.config.docs`;
a test fails when it is out of date.
"""


def render() -> str:
    out = [HEADER]
    for section, keys in SCHEMA.items():
        out.append(f"\n## [{section}]\n")
        if not keys:
            out.append("\nNo keys yet.\n")
            continue
        out.append("\n| key | type | default | meaning |\n|---|---|---|---|\n")
        for name, key in keys.items():
            default = json.dumps(key.default)
            out.append(f"| `{name}` | {key.kind.__name__} | `{default}` | {key.doc} |\n")
    return "".join(out)


if __name__ == "__main__":
    print(render(), end="")
