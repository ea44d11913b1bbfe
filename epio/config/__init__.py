"""Node configuration: a TOML file validated against one schema at start-up.

Every error in a file is collected and reported together; unknown sections and
keys are errors (STYLE 14).  The schema itself lives in :mod:`epio.config.schema`
and is the single source of docs/configuration.md.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from epio.config.schema import CHECKS, SCHEMA, Key
from epio.config.settings import Settings

__all__ = ["Config", "ConfigError", "load_config", "SCHEMA", "Key", "Settings"]


class ConfigError(Exception):
    """One or more configuration errors; ``errors`` lists every one."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("invalid configuration:\n" + "\n".join("  - " + e for e in errors))


class Config:
    """Validated configuration: ``config["lb"]["workers"]`` (every key present)."""

    def __init__(self, values: dict[str, dict[str, Any]], path: Path | None = None) -> None:
        self._values = values
        self.path = path
        self.settings = Settings.from_values(values)
        """The same values, typed and frozen: ``config.settings.lb.workers``."""

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self._values[section]

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {s: dict(v) for s, v in self._values.items()}

    def replace(self, section: str, **values: Any) -> Config:
        """Return a copy with some keys of one section changed (validated)."""
        raw = self.as_dict()
        raw[section].update(values)
        return validate(raw, self.path)


def _check(key: Key, where: str, value: Any, errors: list[str]) -> Any:
    problem = key.check(value)
    if problem is not None:
        errors.append(f"{where}: {problem}")
    return value


def validate(raw: Mapping[str, Any], path: Path | None = None) -> Config:
    """Validate a parsed TOML document; raise ConfigError with every problem."""
    errors: list[str] = []
    values: dict[str, dict[str, Any]] = {}
    for section, table in raw.items():
        if section not in SCHEMA:
            errors.append(
                f"[{section}]: unknown section (known: {', '.join(sorted(SCHEMA))})"
            )
            continue
        if not isinstance(table, Mapping):
            errors.append(f"[{section}]: must be a table")
            continue
        for name in table:
            if name not in SCHEMA[section]:
                errors.append(
                    f"{section}.{name}: unknown key (known: {', '.join(sorted(SCHEMA[section]))})"
                )
    for section, keys in SCHEMA.items():
        table = raw.get(section, {})
        if not isinstance(table, Mapping):
            table = {}
        out: dict[str, Any] = {}
        for name, key in keys.items():
            if name in table:
                out[name] = _check(key, f"{section}.{name}", table[name], errors)
            else:
                out[name] = key.default_value()
        values[section] = out
    if not errors:
        for check in CHECKS:
            errors.extend(check(values))
    if errors:
        raise ConfigError(errors)
    return Config(values, path)


def load_config(path: str | Path | None, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Config:
    """Read, merge command-line overrides into, and validate a config file.

    ``path`` None means: defaults only.  Raises ConfigError (all problems at once).
    """
    raw: dict[str, Any] = {}
    p = Path(path) if path is not None else None
    if p is not None:
        try:
            text = p.read_text("utf-8")
        except OSError as e:
            raise ConfigError([f"{p}: cannot read: {e.strerror}"]) from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError([f"{p}: not valid TOML: {e}"]) from None
    for section, table in (overrides or {}).items():
        merged = dict(raw.get(section, {})) if isinstance(raw.get(section), Mapping) else {}
        merged.update(table)
        raw[section] = merged
    try:
        return validate(raw, p)
    except ConfigError as e:
        if p is not None:
            raise ConfigError([f"{p}: {err}" for err in e.errors]) from None
        raise
