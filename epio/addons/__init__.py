"""Add-on databases: shared PostgreSQL and per-app Redis (issue 10).

Shared floor: the api provisions add-ons, the backup role pulls their data, the
runner runs dedicated servers.  Nothing here keeps state of its own: what an app
has is recorded by the caller; credentials are returned once and never logged.
"""

from __future__ import annotations

from epio.domain import APP_NAME


class AddonError(Exception):
    """An add-on operation failed; the message is safe to show a user."""

    code = "addon_error"


class InvalidAppName(AddonError):
    code = "invalid_app_name"


def db_identifier(app: str) -> str:
    """The PostgreSQL role and database name for an app: ``app_<name>``.

    App names are validated to ``[a-z][a-z0-9-]*`` so the identifier needs no
    quoting tricks; it is still always double-quoted in SQL.
    """
    if not APP_NAME.match(app):
        raise InvalidAppName(f"invalid app name {app!r}")
    return "app_" + app.replace("-", "_")
