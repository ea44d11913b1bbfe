"""The state store: one schema, versioned migrations, SQLite or PostgreSQL.

Use it through :class:`Store` (async domain methods, no SQL outside this
package).  A node's :class:`StoreService` opens it; ``await
service.whenReady()`` gives the :class:`Store`.  See docs/store.md.
"""

from epio.domain import DEPLOY_FINAL, DEPLOY_STATES, DEPLOY_TRANSITIONS, INSTANCE_STATES
from epio.store.errors import (
    AppQuotaExceeded,
    Conflict,
    HostnameRefused,
    InvalidName,
    InvalidTransition,
    InvalidValue,
    LastAdminToken,
    MigrationError,
    NotFound,
    RateLimited,
    StoreError,
    StoreUnavailable,
    Throttled,
    UidsExhausted,
)
from epio.store.locks import FileLock, LeaderService, Lock, PgLock
from epio.store.records import (
    App,
    Deploy,
    Domain,
    Formation,
    Instance,
    NewToken,
    NodeInfo,
    Release,
    TokenInfo,
    User,
)
from epio.store.service import StoreService, open_store
from epio.store.store import (
    APP_DESTROYED,
    CHANGE_KINDS,
    AppLimits,
    Change,
    Store,
    hash_token,
    normalise_hostname,
    validate_app_name,
)

__all__ = [
    "APP_DESTROYED",
    "CHANGE_KINDS",
    "DEPLOY_FINAL",
    "DEPLOY_STATES",
    "DEPLOY_TRANSITIONS",
    "INSTANCE_STATES",
    "App",
    "AppLimits",
    "AppQuotaExceeded",
    "Change",
    "Conflict",
    "HostnameRefused",
    "Deploy",
    "Domain",
    "FileLock",
    "Formation",
    "Instance",
    "InvalidName",
    "InvalidTransition",
    "InvalidValue",
    "LastAdminToken",
    "LeaderService",
    "Lock",
    "MigrationError",
    "NewToken",
    "NodeInfo",
    "NotFound",
    "PgLock",
    "RateLimited",
    "Release",
    "Store",
    "StoreError",
    "StoreService",
    "StoreUnavailable",
    "Throttled",
    "TokenInfo",
    "UidsExhausted",
    "User",
    "hash_token",
    "normalise_hostname",
    "open_store",
    "validate_app_name",
]
