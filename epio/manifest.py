"""The app contract: ``epio.ini`` and ``Procfile`` parsed into a frozen :class:`Manifest`.

Shared floor: the CLI checks a manifest before uploading, the build reads it before
doing any work, the api and the runner read the ``Manifest`` stored with a release.

``epio.ini`` follows ep.io's manifest (an app written for ep.io parses unchanged)::

    [wsgi]
    entrypoint = mysite.wsgi:application
    requirements = requirements.txt

    [static]
    /static = static

    [services]
    postgres = true

    [process]
    worker = python worker.py

A ``Procfile`` is read with Heroku's rules (``name: command``; a later duplicate is
an error); its names, like ``[process]``'s, are process types
(:data:`epio.domain.PROCESS_TYPE`: ``worker``, never ``Worker``).  Process precedence, lowest
first: the ``web`` process generated from ``[wsgi]``, then the ``Procfile``, then
``epio.ini [process]``: a name defined in a higher source replaces the lower one
(and a warning says so).

Every problem in both files is collected and raised together as one
:class:`ManifestError` whose ``errors`` are ``file:line: message`` strings.
The format is documented for users in docs/apps.md.  A message quotes at most
:data:`QUOTE_MAX` characters of any value or line it complains about.

:func:`load_manifest` reads an app tree nobody vouches for (the build runs it as
root on an upload): ``epio.ini``, ``Procfile``, the requirements file and
``pyproject.toml`` must be regular files inside the app, never symlinks — such a
file is refused by name and its content is never read (:func:`read_app_file`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import re
import shlex
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

from attrs import define, field, frozen

from epio.basicauth import bad_realm, hash_password
from epio.cronspec import CronError, parse_schedule
from epio.domain import CRON_NAME_MAX, process_type_problem

__all__ = [
    "DATA_DIRECTORY",
    "Cron",
    "Django",
    "Http",
    "Manifest",
    "AppFileError",
    "ManifestError",
    "load_manifest",
    "parse_manifest",
    "parse_procfile",
    "read_app_file",
]

#: What ``%(data_directory)s`` expands to: the app's writable storage, mounted by the
#: runner at this path inside the sandbox (ep.io kept it at ``~/data``).
DATA_DIRECTORY = "/data"

#: The web entrypoint of a ``[django]`` app that names none (gunicorn's factory syntax).
DJANGO_WSGI = "django.core.wsgi:get_wsgi_application()"

INI_NAME = "epio.ini"
PROCFILE_NAME = "Procfile"
#: A ``[cron]`` job's name (``name = SCHEDULE COMMAND``; not a process type).
_CRON_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_ENTRYPOINT = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(:[A-Za-z_][A-Za-z0-9_.()]*)?$"
)
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
PYTHON_VERSION = re.compile(r"^3\.\d{1,2}(\.\d{1,3})?$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
#: the longest ``[http] idle_sleep`` (the runner refuses more)
IDLE_SLEEP_MAX = 30 * 86400.0
_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)[bB]?\s*$")
#: An error message quotes at most this many characters of a value or line.
QUOTE_MAX = 80
_MESSAGE_MAX = 400

# Known sections and, for the fixed-key ones, their keys (lower case).
_SECTIONS: dict[str, set[str] | None] = {
    "wsgi": {"entrypoint", "requirements", "workers"},
    "static": None,  # URL path = directory
    "services": {"postgres", "redis"},
    "env": None,
    "django": {"base", "settings_module", "append_settings"},
    "process": None,
    "http": {"health_check", "timeout", "idle_timeout", "boot_timeout", "max_body_size", "gzip",
             "request_buffering", "https_redirect", "hsts_max_age", "idle_sleep"},
    "cron": None,
    "release": {"command"},
    "redis": {"memory"},
    "symlinks": None,
    "basic_auth": None,
    "checkout": {"directory_name"},
    "python": {"version"},
}
#: ``[process:NAME]``: per-process-type settings (keys lower case).
_PROCESS_KEYS = {"rollover"}
#: How instances of a process type are replaced on a new release: the new one first
#: (default), or the old one stopped first (a consumer that must never run twice).
ROLLOVER_MODES = ("start-first", "stop-first")
#: The Procfile name Heroku reserves for the release phase (not a process type).
RELEASE_PROCESS = "release"
# Sections whose keys keep their case (env var names, process names, paths, users).
_CASE_SENSITIVE = {"env", "process", "static", "symlinks", "basic_auth", "cron"}


class ManifestError(Exception):
    """The manifest is invalid: ``errors`` lists every problem as ``file:line: message``."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("invalid app manifest:\n" + "\n".join("  " + e for e in self.errors))


def _ro(value: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


@frozen
class Django:
    """``[django]``: where the project is and how platform settings are added."""

    base: str = ""  # project directory relative to the app root ("" = the root)
    settings_module: str = ""  # "" = detect (manage.py, then <base>/settings)
    append_settings: bool = True  # False: DJANGO_SETTINGS_MODULE is the app's own


@frozen
class Http:
    """``[http]``: what the router and the runner need to know about the web process."""

    health_check: str | None = None  # path; None = the port accepting connections
    timeout: float | None = None  # seconds to the first response byte
    idle_timeout: float | None = None
    boot_timeout: float | None = None  # seconds for a new instance to become healthy
    max_body_size: int | None = None  # bytes
    gzip: bool = False
    # None/True: the router reads a request body whole before the app sees the request;
    # False: bodies stream to the app as they arrive (docs/router.md "Request bodies")
    request_buffering: bool | None = None
    expires: Mapping[str, int] = field(factory=dict, converter=_ro)  # path prefix -> seconds
    # the router answers plain-HTTP requests with 308 to https:// (docs/https.md)
    https_redirect: bool = False
    # Strict-Transport-Security max-age (seconds) on HTTPS responses; None = no header
    hsts_max_age: int | None = None
    # seconds without a request after which the web process is stopped until the next
    # request wakes it; None = the node's default (runner.idle_sleep), 0 = never
    idle_sleep: float | None = None


@frozen
class Cron:
    """One ``[cron]`` job: ``name = SCHEDULE COMMAND`` (5 cron fields or an @macro)."""

    name: str
    schedule: str
    command: str


def _cron_tuple(value: Iterable[Cron | Mapping[str, str]]) -> tuple[Cron, ...]:
    return tuple(c if isinstance(c, Cron) else Cron(**c) for c in value)


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _django(value: Django | Mapping[str, Any] | None) -> Django | None:
    if value is None or isinstance(value, Django):
        return value
    return Django(**value)


def _http(value: Http | Mapping[str, Any]) -> Http:
    return value if isinstance(value, Http) else Http(**value)


@frozen(hash=False)
class Manifest:
    """An app's parsed manifest.  Immutable; ``to_json``/``from_json`` round-trip."""

    processes: Mapping[str, str] = field(factory=dict, converter=_ro)  # name -> shell command
    wsgi_entrypoint: str | None = None
    wsgi_workers: int | None = None
    requirements: str | None = None  # requirements file relative to the app root
    pyproject: bool = False  # no requirements file: install the app's pyproject.toml
    static: Mapping[str, str] = field(factory=dict, converter=_ro)  # URL path -> directory
    services: Mapping[str, str] = field(
        factory=dict, converter=_ro
    )  # postgres/redis -> shared|dedicated
    redis_memory_mb: int | None = None
    python_version: str | None = None  # [python] version (runtime.txt/.python-version: build)
    env: Mapping[str, str] = field(factory=dict, converter=_ro)
    django: Django | None = field(default=None, converter=_django)
    http: Http = field(factory=Http, converter=_http)
    cron: tuple[Cron, ...] = field(default=(), converter=_cron_tuple)
    release_command: str | None = None
    # process type -> "start-first" | "stop-first" (types not listed: start-first)
    rollover: Mapping[str, str] = field(factory=dict, converter=_ro)
    symlinks: Mapping[str, str] = field(factory=dict, converter=_ro)  # link -> target
    # user -> "sha256$SALT$DIGEST" of the password (epio.basicauth): never the password
    basic_auth: Mapping[str, str] = field(factory=dict, converter=_ro)
    basic_auth_realm: str | None = None
    checkout_directory: str | None = None
    sources: tuple[str, ...] = field(default=(), converter=_str_tuple)  # files it was read from
    warnings: tuple[str, ...] = field(default=(), converter=_str_tuple)

    @property
    def needs_gunicorn(self) -> bool:
        """True when the platform runs the app's ``web`` process with gunicorn."""
        return self.wsgi_entrypoint is not None and self.processes.get("web") == web_command(
            self.wsgi_entrypoint, self.wsgi_workers
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (mappings as dicts, tuples as lists)."""
        plain: dict[str, Any] = _plain(self)
        return plain

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        return cls(**data)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        return cls.from_dict(json.loads(text))


def _plain(value: Any) -> Any:
    if hasattr(type(value), "__attrs_attrs__"):
        return {a.name: _plain(getattr(value, a.name)) for a in type(value).__attrs_attrs__}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def web_command(entrypoint: str, workers: int | None = None) -> str:
    """The ``web`` command of a ``[wsgi]`` app: gunicorn on ``$PORT`` (errors to stderr;
    the router writes the access log).

    The command is a shell line (the runner runs it with ``bash -c``): the entrypoint is
    quoted, so gunicorn's factory form (``module:make_app()``, as in
    :data:`DJANGO_WSGI`) reaches gunicorn as one word instead of a bash syntax error.
    """
    w = f" --workers {workers}" if workers else ""
    return f"gunicorn --bind 0.0.0.0:$PORT{w} {shlex.quote(entrypoint)}"


# --------------------------------------------------------------------------- parsing


@frozen
class _Item:
    section: str
    key: str
    value: str
    line: int


def _cut(text: str, limit: int = QUOTE_MAX) -> str:
    """``text`` cut to ``limit`` characters (said when it was)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def _q(text: str) -> str:
    """The quoted form of user content in an error message, at most QUOTE_MAX characters."""
    if len(text) <= QUOTE_MAX:
        return repr(text)
    return f"{text[:QUOTE_MAX]!r}... ({len(text)} characters)"


class _Errors:
    """Collects ``file:line: message`` strings, reported sorted by file and line."""

    def __init__(self) -> None:
        self._items: list[tuple[str, int, str]] = []

    def add(self, file: str, line: int, message: str) -> None:
        # a backstop: messages quote through _q/_cut, this bounds any that does not
        self._items.append((file, line, _cut(message, _MESSAGE_MAX)))

    @property
    def items(self) -> list[str]:
        return [f"{f}:{n}: {m}" for f, n, m in sorted(self._items, key=lambda t: (t[0], t[1]))]


def _interpolate(value: str, file: str, line: int, errors: _Errors) -> str:
    """ep.io's ``%(data_directory)s`` interpolation (``%%`` is a literal ``%``)."""
    out: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        if value.startswith("%%", i):
            out.append("%")
            i += 2
            continue
        m = re.match(r"%\(([A-Za-z_]+)\)s", value[i:])
        if m and m.group(1).lower() == "data_directory":
            out.append(DATA_DIRECTORY)
            i += m.end()
            continue
        name = m.group(1) if m else value[i : i + 20]
        errors.add(
            file,
            line,
            f"bad interpolation {_q(name)}: only %(data_directory)s is known (write %% for a literal %)",
        )
        return value
    return "".join(out)


def _scan_ini(text: str, file: str, errors: _Errors) -> list[_Item]:
    """A configparser-compatible scanner that keeps line numbers and collects errors."""
    items: list[_Item] = []
    section: str | None = None
    bad_section = False
    seen_sections: dict[str, int] = {}
    seen_keys: dict[tuple[str, str], int] = {}
    last: _Item | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith(("#", ";")):
            last = None if not stripped else last
            continue
        if raw[0] in " \t" and last is not None:  # continuation line
            items[-1] = _Item(last.section, last.key, last.value + "\n" + stripped, last.line)
            last = items[-1]
            continue
        if stripped.startswith("["):
            last = None
            if not stripped.endswith("]"):
                errors.add(file, lineno, f"malformed section header {_q(stripped)}")
                section, bad_section = None, True
                continue
            name = stripped[1:-1].strip()
            head, colon, sub = name.partition(":")
            if colon and head.strip().lower() == "process":
                # [process:NAME]: settings of one process type (NAME is not lower-cased: a
                # "Worker" is refused by the process-type rule, not silently renamed)
                sub = sub.strip()
                why = process_type_problem(sub)
                if why is not None:
                    errors.add(file, lineno, f"[process:{_cut(sub)}]: {why}")
                    section, bad_section = None, True
                    continue
                name = f"process:{sub}"
            else:
                name = name.lower()
            if name not in _SECTIONS and not name.startswith("process:"):
                errors.add(
                    file,
                    lineno,
                    f"unknown section [{_cut(name)}] (known: {', '.join(sorted(_SECTIONS))})",
                )
                section, bad_section = None, True
                continue
            if name in seen_sections:
                errors.add(
                    file, lineno, f"section [{name}] already defined on line {seen_sections[name]}"
                )
            seen_sections.setdefault(name, lineno)
            section, bad_section = name, False
            continue
        m = re.match(r"^([^=:]*[^=:\s])\s*[=:]\s?(.*)$", stripped)
        if m is None:
            if section == "basic_auth":  # never echo what may be a password
                errors.add(file, lineno, "[basic_auth]: expected 'user = password' "
                                         "(the line is not shown: it may hold a password)")
            else:
                errors.add(file, lineno, f"expected 'key = value', got {_q(stripped)}")
            last = None
            continue
        if section is None:
            if not bad_section:
                errors.add(file, lineno, "key outside of any section")
            last = None
            continue
        key = m.group(1).strip()
        if section not in _CASE_SENSITIVE:
            key = key.lower()
        value = m.group(2).strip()
        if (section, key) in seen_keys:
            errors.add(
                file,
                lineno,
                f"[{section}] {_cut(key)}: already set on line {seen_keys[(section, key)]}",
            )
            last = None
            continue
        seen_keys[(section, key)] = lineno
        last = _Item(section, key, value, lineno)
        items.append(last)
    return items


def _bool(item: _Item, file: str, errors: _Errors) -> bool | None:
    v = item.value.lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    errors.add(
        file,
        item.line,
        f"[{item.section}] {_cut(item.key)}: must be true or false, not {_q(item.value)}",
    )
    return None


def _number(item: _Item, file: str, errors: _Errors, kind: type = float) -> Any:
    try:
        n = kind(item.value)
    except ValueError:
        n = None
    if n is None or n <= 0:
        what = "a positive integer" if kind is int else "a positive number"
        errors.add(
            file,
            item.line,
            f"[{item.section}] {_cut(item.key)}: must be {what}, not {_q(item.value)}",
        )
        return None
    return n


def _size(item: _Item, file: str, errors: _Errors) -> int | None:
    m = _SIZE.match(item.value)
    if m is None or int(m.group(1)) <= 0:
        errors.add(
            file,
            item.line,
            f"[{item.section}] {_cut(item.key)}: must be a size like 10M, 512K or 1048576, not {_q(item.value)}",
        )
        return None
    mult = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
    return int(m.group(1)) * mult


def _rel_path(
    value: str, item: _Item, file: str, errors: _Errors, *, allow_data: bool
) -> str | None:
    """A path inside the app (relative, no ``..``) or, if allowed, under DATA_DIRECTORY."""
    p = PurePosixPath(value)
    if allow_data and (value == DATA_DIRECTORY or value.startswith(DATA_DIRECTORY + "/")):
        if ".." in p.parts:
            errors.add(
                file,
                item.line,
                f"[{item.section}] {_cut(item.key)}: {_q(value)} must not contain '..'",
            )
            return None
        return str(p)
    if p.is_absolute() or ".." in p.parts or not value:
        where = "inside the app or under %(data_directory)s" if allow_data else "inside the app"
        errors.add(
            file,
            item.line,
            f"[{item.section}] {_cut(item.key)}: {_q(value)} must be a relative path {where} (no '..')",
        )
        return None
    return str(p)


def parse_procfile(
    text: str, file: str = PROCFILE_NAME, errors: _Errors | None = None
) -> dict[str, tuple[str, int]]:
    """Heroku's Procfile rules: ``name: command``; returns name -> (command, line)."""
    own = errors is None
    errs = errors if errors is not None else _Errors()
    out: dict[str, tuple[str, int]] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([^:\s]+)\s*:\s*(.*)$", line)
        if m is None:
            errs.add(file, lineno, f"expected 'name: command', got {_q(line)}")
            continue
        name, command = m.group(1), m.group(2).strip()
        why = process_type_problem(name)
        if why is not None:  # the store's and the runner's rule: refused here, not at placement
            errs.add(file, lineno, f"process name {_q(name)}: {why}")
            continue
        if not command:
            errs.add(file, lineno, f"process {_q(name)} has no command")
            continue
        if name in out:
            errs.add(file, lineno, f"process {_q(name)} already defined on line {out[name][1]}")
            continue
        out[name] = (command, lineno)
    if own and errs.items:
        raise ManifestError(errs.items)
    return out


def parse_manifest(
    ini_text: str | None,
    procfile_text: str | None,
    files: Iterable[str] = (),
    *,
    ini_name: str = INI_NAME,
    procfile_name: str = PROCFILE_NAME,
) -> Manifest:
    """Parse the two manifest files' texts (either may be None = absent).

    ``files`` lists the app's top-level file names (to find ``requirements.txt``
    or ``pyproject.toml`` and check referenced files exist); pass the app's paths
    relative to its root for the checks to cover subdirectories.
    Raises :class:`ManifestError` with every problem found.

    The steps, in order: scan both files; read each ``epio.ini`` item into its
    section's part (:data:`_READERS`); check what spans items (the realm, the
    ``expires-`` family, the Django default web); merge the processes of the three
    sources; find the requirements; raise every error together or build the Manifest.
    """
    errors = _Errors()
    if ini_text is None and procfile_text is None:
        raise ManifestError(
            [f"{ini_name}:0: the app has neither an {ini_name} nor a {procfile_name}"]
        )
    items = _scan_ini(ini_text, ini_name, errors) if ini_text is not None else []
    procfile = (
        parse_procfile(procfile_text, procfile_name, errors) if procfile_text is not None else {}
    )
    parts = _Parts(ini_name, errors)
    for it in items:
        _read_item(parts, it)
    _check_realm(parts)
    _read_expires(parts, items)
    _default_django_web(parts, procfile)
    processes, warnings = _merge_processes(parts, procfile, procfile_name)
    _check_rollover(parts, processes)
    if not processes and not errors.items:
        where = ini_name if ini_text is not None else procfile_name
        errors.add(
            where,
            1,
            "no process to run: add [wsgi] entrypoint, a [process] entry or a Procfile line",
        )
    _find_requirements(parts, set(files))
    if errors.items:
        raise ManifestError(errors.items)
    sources = [
        n for n, t in ((ini_name, ini_text), (procfile_name, procfile_text)) if t is not None
    ]
    return parts.manifest(processes, sources, warnings)


@define
class _Parts:
    """What :func:`parse_manifest` has read so far of ``epio.ini`` (file ``file``)."""

    file: str
    errors: _Errors
    kw: dict[str, Any] = field(factory=dict)  # Manifest fields set as they are
    static: dict[str, str] = field(factory=dict)
    services: dict[str, str] = field(factory=dict)
    env: dict[str, str] = field(factory=dict)
    processes: dict[str, tuple[str, int]] = field(factory=dict)  # [process]: (command, line)
    rollover: dict[str, tuple[str, int]] = field(factory=dict)  # [process:NAME]: (mode, line)
    cron: list[Cron] = field(factory=list)
    symlinks: dict[str, str] = field(factory=dict)
    basic_auth: dict[str, str] = field(factory=dict)
    http: dict[str, Any] = field(factory=dict)
    django: dict[str, Any] | None = None
    requirements_line: int = 0
    realm_line: int = 0

    def error(self, item: _Item, message: str) -> None:
        self.errors.add(self.file, item.line, message)

    def manifest(self, processes: dict[str, str], sources: list[str],
                 warnings: list[str]) -> Manifest:
        kw = dict(self.kw)
        if self.django is not None:
            kw["django"] = Django(**self.django)
        return Manifest(
            processes=processes,
            static=self.static,
            services=self.services,
            env=self.env,
            cron=self.cron,
            symlinks=self.symlinks,
            basic_auth=self.basic_auth,
            rollover={t: mode for t, (mode, _) in self.rollover.items()},
            sources=sources,
            warnings=warnings,
            **kw,
        )


def _read_item(parts: _Parts, it: _Item) -> None:
    """One ``epio.ini`` item, interpolated, checked and kept in its section's part."""
    # a [basic_auth] password is literal: no interpolation (and so no error echoing it)
    value = (it.value if it.section == "basic_auth"
             else _interpolate(it.value, parts.file, it.line, parts.errors))
    it = _Item(it.section, it.key, value, it.line)
    s, k = it.section, it.key
    if s.startswith("process:"):
        _read_process_settings(parts, it)
        return
    known = _SECTIONS[s]
    if known is not None and k not in known and not (s == "http" and k.startswith("expires-")):
        parts.error(it, f"[{s}] unknown key {_q(k)} (known: {', '.join(sorted(known))})")
        return
    _READERS[s](parts, it)


def _read_process_settings(parts: _Parts, it: _Item) -> None:
    s, k, value = it.section, it.key, it.value
    ptype = s.partition(":")[2]
    if k not in _PROCESS_KEYS:
        parts.error(it, f"[{_cut(s)}] unknown key {_q(k)} "
                        f"(known: {', '.join(sorted(_PROCESS_KEYS))})")
    elif value not in ROLLOVER_MODES:
        parts.error(it, f"[{_cut(s)}] rollover: must be "
                        f"{' or '.join(ROLLOVER_MODES)}, not {_q(value)}")
    else:
        parts.rollover[ptype] = (value, it.line)


def _read_wsgi(parts: _Parts, it: _Item) -> None:
    k, value = it.key, it.value
    if k == "entrypoint":
        if not _ENTRYPOINT.match(value):
            parts.error(it, f"[wsgi] entrypoint: {_q(value)} must look like "
                            "package.module:application")
        else:
            parts.kw["wsgi_entrypoint"] = value if ":" in value else value + ":application"
    elif k == "requirements":
        p = _rel_path(value, it, parts.file, parts.errors, allow_data=False)
        if p is not None:
            parts.kw["requirements"] = p
            parts.requirements_line = it.line
    elif k == "workers":
        parts.kw["wsgi_workers"] = _number(it, parts.file, parts.errors, int)


def _read_static(parts: _Parts, it: _Item) -> None:
    k, value = it.key, it.value
    if not value:
        parts.error(it, f"[static] {_cut(k)}: needs a directory")
        return
    if not k.startswith("/"):
        parts.error(it, f"[static] {_q(k)}: the URL path must start with '/'")
        return
    d = _rel_path(value.rstrip("/") or value, it, parts.file, parts.errors, allow_data=True)
    if d is not None:
        parts.static["/" + k.strip("/") if k != "/" else "/"] = d


def _read_services(parts: _Parts, it: _Item) -> None:
    k, value = it.key, it.value
    v = value.lower()
    if v in _TRUE:
        parts.services[k] = "shared" if k == "postgres" else "dedicated"
    elif v == "dedicated":
        parts.services[k] = "dedicated"
    elif v not in _FALSE:
        parts.error(it, f"[services] {_cut(k)}: must be true, false or dedicated, "
                        f"not {_q(value)}")


def _read_env(parts: _Parts, it: _Item) -> None:
    if not _ENV_NAME.match(it.key):
        parts.error(it, f"[env] {_q(it.key)}: not a valid environment variable name")
    else:
        parts.env[it.key] = it.value


def _read_django(parts: _Parts, it: _Item) -> None:
    k, value = it.key, it.value
    django = parts.django = parts.django or {}
    if k == "base":
        p = _rel_path(value or ".", it, parts.file, parts.errors, allow_data=False)
        if p is not None:
            django["base"] = "" if p == "." else p
    elif k == "settings_module":
        if not _MODULE.match(value):
            parts.error(it, f"[django] settings_module: {_q(value)} is not a Python module name")
        else:
            django["settings_module"] = value
    elif k == "append_settings":
        b = _bool(it, parts.file, parts.errors)
        if b is not None:
            django["append_settings"] = b


def _read_process(parts: _Parts, it: _Item) -> None:
    k, value = it.key, it.value
    why = process_type_problem(k)
    if why is not None:
        parts.error(it, f"[process] {_q(k)}: {why}")
    elif not value:
        parts.error(it, f"[process] {_cut(k)}: has no command")
    else:
        parts.processes[k] = (value, it.line)


def _read_http(parts: _Parts, it: _Item) -> None:
    k, value, http = it.key, it.value, parts.http
    if k.startswith("expires-"):
        pass  # a key family, read once every item is (_read_expires)
    elif k == "health_check":
        if not value.startswith("/") or any(c.isspace() for c in value):
            parts.error(it, f"[http] health_check: {_q(value)} must be a URL path "
                            "starting with '/'")
        else:
            http["health_check"] = value
    elif k in ("timeout", "idle_timeout", "boot_timeout"):
        http[k] = _number(it, parts.file, parts.errors)
    elif k == "max_body_size":
        http[k] = _size(it, parts.file, parts.errors)
    elif k == "gzip":
        http[k] = _bool(it, parts.file, parts.errors) or False
    elif k == "request_buffering":
        http[k] = _bool(it, parts.file, parts.errors)
    elif k == "https_redirect":
        http[k] = _bool(it, parts.file, parts.errors) or False
    elif k == "hsts_max_age":
        http[k] = _number(it, parts.file, parts.errors, int)
    elif k == "idle_sleep":
        http[k] = _idle_sleep(parts, it)


def _idle_sleep(parts: _Parts, it: _Item) -> float | None:
    """``[http] idle_sleep``: ``off`` (0: never sleeps, whatever the node's default) or
    a duration like ``30m``, ``2s``, ``1h``, ``90`` (seconds) of at least 1 s."""
    if it.value.strip().lower() in ("off", "0", "no", "false"):
        return 0.0
    m = _DURATION.match(it.value)
    if m is not None:
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
        if 1.0 <= seconds <= IDLE_SLEEP_MAX:
            return seconds
    parts.error(it, f"[http] idle_sleep: must be off or a duration of 1s to 30d like 30m, "
                    f"2s or 1h, not {_q(it.value)}")
    return None


def _read_cron(parts: _Parts, it: _Item) -> None:
    job = _cron_entry(it.key, it.value, parts.file, it.line, parts.errors)
    if job is not None:
        parts.cron.append(job)


def _read_release(parts: _Parts, it: _Item) -> None:
    if not it.value:
        parts.error(it, "[release] command: is empty")
    else:
        parts.kw["release_command"] = it.value


def _read_redis(parts: _Parts, it: _Item) -> None:
    parts.kw["redis_memory_mb"] = _number(it, parts.file, parts.errors, int)


def _read_python(parts: _Parts, it: _Item) -> None:
    if PYTHON_VERSION.match(it.value):
        parts.kw["python_version"] = it.value
    else:
        parts.error(it, f"[python] version: must be like 3.12 or 3.12.1, not {_q(it.value)}")


def _read_symlinks(parts: _Parts, it: _Item) -> None:
    k, target = it.key, it.value
    link = _rel_path(k, it, parts.file, parts.errors, allow_data=False)
    if not target:
        parts.error(it, f"[symlinks] {_cut(k)}: needs a target")
    elif link is not None and _symlink_target_ok(link, target):
        parts.symlinks[link] = target
    elif link is not None:
        parts.error(it, f"[symlinks] {_cut(k)}: target {_q(target)} must be under "
                        "%(data_directory)s or a relative path that stays inside the app")


def _read_basic_auth(parts: _Parts, it: _Item) -> None:
    k, value = it.key, it.value
    if k == "_realm":
        why = bad_realm(value)
        if why is not None:
            parts.error(it, f"[basic_auth] _realm: {_q(value)} {why}")
        else:
            parts.kw["basic_auth_realm"] = value
            parts.realm_line = it.line
    elif not k or ":" in k or any(ord(c) < 32 or ord(c) == 127 for c in k):
        parts.error(it, f"[basic_auth] {_q(k)}: not a valid user name")
    elif not value:
        parts.error(it, f"[basic_auth] {_cut(k)}: needs a password")
    else:
        # only a salted hash goes further than this parser (epio.basicauth)
        parts.basic_auth[k] = hash_password(value)


def _read_checkout(parts: _Parts, it: _Item) -> None:
    value = it.value
    if not value or "/" in value or value in (".", ".."):
        parts.error(it, f"[checkout] directory_name: {_q(value)} must be a plain directory name")
    else:
        parts.kw["checkout_directory"] = value


#: The reader of each section's items (``[process:NAME]`` is read apart).
_READERS: dict[str, Callable[[_Parts, _Item], None]] = {
    "wsgi": _read_wsgi,
    "static": _read_static,
    "services": _read_services,
    "env": _read_env,
    "django": _read_django,
    "process": _read_process,
    "http": _read_http,
    "cron": _read_cron,
    "release": _read_release,
    "redis": _read_redis,
    "symlinks": _read_symlinks,
    "basic_auth": _read_basic_auth,
    "checkout": _read_checkout,
    "python": _read_python,
}
assert set(_READERS) == set(_SECTIONS)


def _check_realm(parts: _Parts) -> None:
    if "basic_auth_realm" in parts.kw and not parts.basic_auth:
        parts.errors.add(parts.file, parts.realm_line,
                         "[basic_auth] _realm: set, but no 'user = password' line: "
                         "nothing would be protected")


def _read_expires(parts: _Parts, items: list[_Item]) -> None:
    """``expires-/path = SECONDS`` (a key family of ``[http]``), then the Http part."""
    expires: dict[str, int] = {}
    for it in items:
        if it.section == "http" and it.key.startswith("expires-"):
            path = it.key[len("expires-") :]
            secs = _number(it, parts.file, parts.errors, int)
            if not path.startswith("/"):
                parts.error(it, f"[http] {_cut(it.key)}: must be expires-/URL/PATH = SECONDS")
            elif secs is not None:
                expires[path] = secs
    if expires:
        parts.http["expires"] = expires
    parts.kw["http"] = Http(**{k: v for k, v in parts.http.items() if v is not None})


def _default_django_web(parts: _Parts, procfile: Mapping[str, tuple[str, int]]) -> None:
    """ep.io ran a [django] app without an entrypoint through Django's own WSGI handler."""
    has_web = "web" in procfile or "web" in parts.processes
    if parts.django is not None and "wsgi_entrypoint" not in parts.kw and not has_web:
        parts.kw["wsgi_entrypoint"] = DJANGO_WSGI


def _merge_processes(
    parts: _Parts, procfile: dict[str, tuple[str, int]], procfile_name: str
) -> tuple[dict[str, str], list[str]]:
    """The processes ([wsgi] web < Procfile < [process]) and the warnings of each
    replacement; a Procfile ``release:`` line is the release phase."""
    ini_name, kw, ini_processes = parts.file, parts.kw, parts.processes
    warnings: list[str] = []
    processes: dict[str, str] = {}
    if "wsgi_entrypoint" in kw:
        processes["web"] = web_command(kw["wsgi_entrypoint"], kw.get("wsgi_workers"))
    procfile_release = procfile.pop(RELEASE_PROCESS, None)
    if procfile_release is not None:
        # Heroku's release phase: runs once per deploy, like [release] command
        if "release_command" in kw:
            warnings.append(
                f"{procfile_name}:{procfile_release[1]}: {RELEASE_PROCESS}: is replaced by "
                f"[release] command in {ini_name}"
            )
        else:
            kw["release_command"] = procfile_release[0]
    if RELEASE_PROCESS in ini_processes:
        parts.errors.add(
            ini_name,
            ini_processes[RELEASE_PROCESS][1],
            f"[process] {RELEASE_PROCESS!r} is the release phase, not a process: "
            "use [release] command",
        )
        del ini_processes[RELEASE_PROCESS]
    for name, (cmd, line) in procfile.items():
        if name in processes:
            warnings.append(
                f"{procfile_name}:{line}: process {_q(name)} replaces the one from [wsgi]"
            )
        processes[name] = cmd
    for name, (cmd, line) in ini_processes.items():
        if name in procfile:
            warnings.append(
                f"{ini_name}:{line}: [process] {_q(name)} replaces the one in {procfile_name}"
            )
        elif name in processes:
            warnings.append(f"{ini_name}:{line}: [process] {_q(name)} replaces the one from [wsgi]")
        processes[name] = cmd
    return processes, warnings


def _check_rollover(parts: _Parts, processes: Mapping[str, str]) -> None:
    for ptype, (_, line) in parts.rollover.items():
        if ptype not in processes:
            parts.errors.add(
                parts.file,
                line,
                f"[process:{_cut(ptype)}] there is no process {_q(ptype)} "
                f"(processes: {', '.join(sorted(processes)) or 'none'})",
            )


def _find_requirements(parts: _Parts, present: set[str]) -> None:
    """The requirements file named (checked to be in the app) or found, else pyproject."""
    kw = parts.kw
    if "requirements" in kw:
        if present and kw["requirements"] not in present:
            parts.errors.add(
                parts.file,
                parts.requirements_line,
                f"[wsgi] requirements: file {_q(kw['requirements'])} is not in the app",
            )
    elif "requirements.txt" in present or not present:
        kw["requirements"] = "requirements.txt" if "requirements.txt" in present else None
    if kw.get("requirements") is None and "pyproject.toml" in present:
        kw["pyproject"] = True


_CRON_LINE = re.compile(r"^(\S+(?:\s+\S+){4})\s+(\S.*)$", re.DOTALL)
_CRON_MACRO_LINE = re.compile(r"^(\S+)\s+(\S.*)$", re.DOTALL)
_CRON_FORMS = ("must be 'name = MIN HOUR DAY MONTH WEEKDAY command', 'name = @daily command' "
               "or 'MIN HOUR DAY MONTH WEEKDAY = command'")


def _cron_entry(key: str, value: str, file: str, line: int, errors: _Errors) -> Cron | None:
    """One ``[cron]`` line, in either form:

    * ``name = SCHEDULE command`` (epio's: the name shows in ``epio cron`` and the
      log source ``cron.NAME``);
    * ``SCHEDULE = command`` (the crontab-like form, key = schedule): the name is
      ``cron-`` and 8 hex digits of the schedule and command, stable across deploys.
    """
    if _CRON_NAME.match(key):
        # the schedule's words, then the command exactly as written
        m = (_CRON_MACRO_LINE if value.startswith("@") else _CRON_LINE).match(value)
        if m is None:
            errors.add(file, line, f"[cron] {_cut(key)}: {_CRON_FORMS}")
            return None
        schedule, command, name = " ".join(m.group(1).split()), m.group(2), key
        if len(name) > CRON_NAME_MAX:  # its runs' log source, cron.NAME, would be refused
            errors.add(file, line, f"[cron] {_cut(key)}: a job name has at most "
                                   f"{CRON_NAME_MAX} characters")
            return None
    elif key.startswith("@") or any(c.isspace() for c in key):
        schedule, command = " ".join(key.split()), value.strip()
        digest = hashlib.sha256(f"{schedule}\n{command}".encode()).hexdigest()[:8]
        name = f"cron-{digest}"
        if not command:
            errors.add(file, line, f"[cron] {_q(key)}: has no command")
            return None
    else:
        errors.add(file, line, f"[cron] {_q(key)}: {_CRON_FORMS}")
        return None
    try:
        parse_schedule(schedule)
    except CronError as e:
        errors.add(file, line, f"[cron] {_cut(name)}: bad schedule: {e}")
        return None
    return Cron(name, schedule, command)


def _symlink_target_ok(link: str, target: str) -> bool:
    """A ``[symlinks]`` target: under DATA_DIRECTORY, or relative and inside the app
    (resolved from the link's own directory, on its text)."""
    if "\x00" in target:
        return False
    if target.startswith("/"):
        p = posixpath.normpath(target)
        return p == DATA_DIRECTORY or p.startswith(DATA_DIRECTORY + "/")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(link), target))
    return resolved != ".." and not resolved.startswith("../")


class AppFileError(Exception):
    """An app file the platform must read is not a regular file inside the app:
    ``name`` is the file, ``reason`` why (the message is ``name: reason``)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


_SYMLINK = "is a symlink; it must be a regular file of the app"
_OUTSIDE = "is not inside the app (a directory on its path is a symlink out of it)"
_NOT_REGULAR = "is not a regular file"


def read_app_file(root: str | Path, rel: str) -> bytes:
    """The content of the app file ``rel`` (relative to the app directory ``root``).

    Refused with :class:`AppFileError` (content never read): a symlink (opened with
    ``O_NOFOLLOW``), a file whose directory resolves outside ``root`` (through
    symlinks of the app), anything but a regular file.  ``FileNotFoundError`` when
    it does not exist; other ``OSError`` as they come.
    """
    base = os.path.realpath(root)
    parent = os.path.realpath(os.path.join(base, os.path.dirname(rel)))
    if parent != base and not parent.startswith(base + os.sep):
        raise AppFileError(rel, _OUTSIDE)
    full = os.path.join(parent, os.path.basename(rel))
    st = os.lstat(full)
    if stat.S_ISLNK(st.st_mode):
        raise AppFileError(rel, _SYMLINK)
    if not stat.S_ISREG(st.st_mode):
        raise AppFileError(rel, _NOT_REGULAR)
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:  # replaced by a symlink since the lstat
            raise AppFileError(rel, _SYMLINK) from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise AppFileError(rel, _NOT_REGULAR)
        return f.read()


def _app_files(app_dir: Path) -> list[str]:
    out = []
    for p in app_dir.rglob("*"):
        if p.is_file() and ".git" not in p.parts[len(app_dir.parts) :]:
            out.append(p.relative_to(app_dir).as_posix())
    return out


def _lstat_problem(root: Path, rel: str) -> str | None:
    """Why the platform will refuse to read the app file ``rel`` (None: it will not)."""
    base = os.path.realpath(root)
    parent = os.path.realpath(os.path.join(base, os.path.dirname(rel)))
    if parent != base and not parent.startswith(base + os.sep):
        return _OUTSIDE
    try:
        st = os.lstat(os.path.join(parent, os.path.basename(rel)))
    except OSError:
        return None  # absent: reported as such elsewhere
    if stat.S_ISLNK(st.st_mode):
        return _SYMLINK
    return None


def load_manifest(app_dir: str | Path) -> Manifest:
    """Read and parse the manifest of the app directory ``app_dir``.

    The manifest files, the requirements file and ``pyproject.toml`` must not be
    symlinks (refused by name, content never read).
    """
    root = Path(app_dir)
    texts: dict[str, str | None] = {}
    errors: list[str] = []
    for name in (INI_NAME, PROCFILE_NAME):
        texts[name] = None
        try:
            texts[name] = read_app_file(root, name).decode("utf-8")
        except (FileNotFoundError, NotADirectoryError):
            pass
        except AppFileError as e:
            if e.reason != _NOT_REGULAR:  # (a directory of that name: absent, as before)
                errors.append(f"{name}:0: {e.reason}")
        except UnicodeDecodeError:
            errors.append(f"{name}:0: not UTF-8 text")
        except OSError as e:
            errors.append(f"{name}:0: cannot read: {e.strerror}")
    if errors:
        raise ManifestError(errors)
    manifest = parse_manifest(texts[INI_NAME], texts[PROCFILE_NAME], _app_files(root))
    dep = manifest.requirements or ("pyproject.toml" if manifest.pyproject else None)
    if dep is not None:
        problem = _lstat_problem(root, dep)
        if problem is not None:
            raise ManifestError([f"{dep}:0: {problem}"])
    return manifest
