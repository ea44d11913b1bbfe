"""The message-type table of docs/messages.md, generated from the registry.

``python -m epio.bus.docs`` prints it; ``python -m epio.bus.docs --write``
rewrites the table in docs/messages.md (between the BEGIN/END markers).  A
test fails when the committed table differs from the registry.
"""

from __future__ import annotations

import sys
from pathlib import Path

from epio.bus.messages import REGISTRY, FieldSpec, Registry

BEGIN = "<!-- BEGIN MESSAGE TYPES (generated: python -m epio.bus.docs --write) -->"
END = "<!-- END MESSAGE TYPES -->"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "messages.md"

_NAMES = {"int": "int", "float": "float", "str": "str", "dict": "map", "list": "list",
          "bytes": "bytes", "bool": "bool", "NoneType": "nil", "object": "any"}


def _spec_name(spec: FieldSpec) -> str:
    kinds = spec if isinstance(spec, tuple) else (spec,)
    return " or ".join(_NAMES.get(k.__name__, k.__name__) for k in kinds)


def table(registry: Registry = REGISTRY) -> str:
    """The markdown table of every declared type."""
    lines = ["| type | version | pattern | body (required; *optional*) | meaning |",
             "|---|---|---|---|---|"]
    for t in registry:
        fields = [f"`{n}`: {_spec_name(s)}" for n, s in t.fields.items()]
        fields += [f"*`{n}`: {_spec_name(s)}*" for n, s in t.optional.items()]
        version = str(t.version)
        if t.min_version != t.version:
            version += f" (accepts {t.min_version}–{t.version})"
        lines.append(f"| `{t.name}` | {version} | {t.pattern} | {', '.join(fields) or '—'} "
                     f"| {t.doc} |")
    return "\n".join(lines) + "\n"


def render(doc: str, registry: Registry = REGISTRY) -> str:
    """``doc`` with its generated block replaced by the current table."""
    start = doc.index(BEGIN) + len(BEGIN)
    end = doc.index(END)
    return doc[:start] + "\n" + table(registry) + doc[end:]


def main(argv: list[str]) -> int:
    if argv[1:] == ["--write"]:
        DOCS.write_text(render(DOCS.read_text("utf-8")), "utf-8")
        return 0
    sys.stdout.write(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
