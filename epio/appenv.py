"""The environment variables the platform sets in every app process.

They win over config vars (``epio.runner.sandbox.app_environment``), so a config
var of one of these names would be silently ignored; the API refuses to set one
and says why (``reserved_config_var``).  Add-on URLs (``DATABASE_URL``,
``REDIS_URL``) are ordinary config vars and not listed here.
"""

from __future__ import annotations

PLATFORM_VARS: dict[str, str] = {
    "PORT": "the port the platform gives the web process to listen on",
    "HOME": "the app's home directory in its sandbox",
    "TMPDIR": "the app's temporary directory in its sandbox",
    "PATH": "the app's virtualenv first, then the system's",
    "VIRTUAL_ENV": "the app's virtualenv",
    "PYTHONUNBUFFERED": "so that log lines reach `epio logs` at once",
}
"""Names the platform sets, with what each is for."""

PLATFORM_PREFIX = "EPIO_"
"""Every ``EPIO_*`` name belongs to the platform (EPIO_APP, EPIO_RELEASE, ...)."""


def reserved_reason(name: str) -> str | None:
    """Why a config var may not be called ``name``, or None when it may."""
    if name in PLATFORM_VARS:
        return f"the platform sets {name} itself ({PLATFORM_VARS[name]})"
    if name.startswith(PLATFORM_PREFIX):
        return f"names starting with {PLATFORM_PREFIX} belong to the platform"
    return None
