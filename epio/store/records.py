"""Frozen value records returned by :class:`epio.store.Store` methods.

Times are seconds since the epoch as floats (taken from the injected reactor's
``seconds()``).  JSON-shaped fields (``config``, ``processes``, ``status``,
``meta``, ``limits``) are plain dicts: do not mutate them.
"""

from __future__ import annotations

from typing import Any

from attrs import field, frozen


@frozen
class User:
    """A platform user."""

    id: str
    name: str
    email: str | None
    is_admin: bool
    created: float


@frozen
class TokenInfo:
    """What is kept about an API token: never the token itself.

    ``prefix`` is the first characters of the plaintext, for display only.
    """

    id: str
    user_id: str
    prefix: str
    description: str
    created: float
    last_used: float | None


@frozen
class NewToken:
    """The result of :meth:`Store.create_token`: the plaintext is shown once."""

    token: str = field(repr=False)
    info: TokenInfo


# ``apps.purge_after`` of a destroyed app a purge has claimed: it sorts before every
# real time, so a purge that failed half-way is resumed by the next purge_due look
PURGING = -1.0


@frozen
class App:
    """An app.  ``uid`` is its Unix UID/GID, never reused while the app exists
    (destroyed apps included, until they are purged)."""

    name: str
    owner_id: str
    uid: int
    maintenance: bool
    created: float
    # set while the app is destroyed (kept for its grace period, then purged);
    # purge_after is PURGING once a purge has claimed it (no restore from then on)
    destroyed: float | None = None
    purge_after: float | None = None

    @property
    def purging(self) -> bool:
        """A purge has claimed this destroyed app (:meth:`Store.claim_purge`)."""
        return self.destroyed is not None and self.purge_after == PURGING


@frozen
class Release:
    """An immutable release: image + config vars + process types snapshot.

    ``version`` counts from 1 per app.  ``image`` is the sha256 digest of the
    image (None for a release made before the first build).  ``processes`` maps
    process type to command.
    """

    app: str
    version: int
    image: str | None
    config: dict[str, str] = field(hash=False)
    processes: dict[str, str] = field(hash=False)
    description: str
    created: float
    created_by: str | None
    meta: dict[str, Any] = field(factory=dict, hash=False)


@frozen
class Formation:
    """The desired number (and size/limits) of one process type of an app."""

    app: str
    process_type: str
    quantity: int
    size: str
    limits: dict[str, Any] = field(factory=dict, hash=False)


@frozen
class Instance:
    """One process instance as placed/observed: where it runs and in what state."""

    id: str
    app: str
    release: int
    process_type: str
    number: int
    node: str | None
    host: str | None
    port: int | None
    state: str
    since: float
    restarts: int = 0


@frozen
class Domain:
    """A hostname routed to an app; ``wildcard`` when it is ``*.suffix``."""

    hostname: str
    app: str
    wildcard: bool
    created: float


@frozen
class NodeInfo:
    """A node of the cluster as last reported."""

    id: str
    roles: tuple[str, ...]
    control_endpoint: str | None
    boot_id: str | None
    last_seen: float
    status: dict[str, Any] = field(factory=dict, hash=False)


@frozen
class Deploy:
    """A build/deploy of an app and its outcome.

    ``status`` is one of :data:`epio.store.store.DEPLOY_STATES`.
    """

    id: str
    app: str
    status: str
    image: str | None
    release: int | None
    log: str
    reason: str | None
    created: float
    finished: float | None
    created_by: str | None
    meta: dict[str, Any] = field(factory=dict, hash=False)
