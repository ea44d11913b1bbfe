"""Typed store errors.  The api maps each to one stable error code (STYLE 13)."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""

    code = "store_error"


class NotFound(StoreError):
    """The named thing (app, user, release, ...) does not exist."""

    code = "not_found"


class Conflict(StoreError):
    """The change would break a uniqueness or reference rule (duplicate name, ...)."""

    code = "conflict"


class HostnameRefused(Conflict):
    """The ``refused`` check of :meth:`Store.add_domain` said no (inside its transaction)."""


class LastAdminToken(Conflict):
    """Revoking this token would leave no admin able to use the API."""

    code = "last_admin_token"


class Throttled(StoreError):
    """A per-user limit says not now; ``retry_after`` seconds is when it may pass."""

    code = "throttled"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(Throttled):
    """Too many app creations and deletions by one user in the window."""

    code = "rate_limited"


class AppQuotaExceeded(Throttled):
    """The user has as many apps as they may have."""

    code = "app_quota_exceeded"


class UidsExhausted(StoreError):
    """Every app UID of the configured range is taken."""

    code = "app_uids_exhausted"


class InvalidName(StoreError, ValueError):
    """A name, hostname, key or other identifier is not well formed."""

    code = "invalid_name"


class InvalidValue(StoreError, ValueError):
    """A value passed to a store method is out of range or of the wrong shape."""

    code = "invalid_value"


class StoreUnavailable(StoreError):
    """The database cannot be reached (connection refused, lost, closed store)."""

    code = "store_unavailable"


class MigrationError(StoreError):
    """The schema could not be brought up to date (or is newer than this code)."""

    code = "migration_error"


class IntegrityError(StoreError):
    """Internal: a constraint of the database was violated (backend-neutral)."""

    code = "conflict"


class InvalidTransition(StoreError):
    """A deploy state change its state machine does not have (DEPLOY_TRANSITIONS):
    a bug, or a writer that lost a race (the deploy ended meanwhile)."""
