"""One-time sign-in codes: ``epio login --web`` signs the dashboard in.

A signed-in user (the CLI's token) asks for a code; the CLI prints a link to the
dashboard with the code in its fragment (never sent to a server).  The page
exchanges the code once, in a POST body, for a new API token of that user.  The
store keeps only the code's sha256 and its expiry; redeeming deletes the row in
the same transaction that reads it, so a code works once (a second redeem, even a
concurrent one, finds nothing).  Expired rows are deleted whenever a code is made.
"""

from __future__ import annotations

import hmac
import secrets

from epio.store.backend import Transaction
from epio.store.errors import InvalidValue, NotFound
from epio.store.store import Store, hash_token

#: what every code starts with (tells it apart from an API token, ``epio_``)
CODE_PREFIX = "epiolink_"


async def create_login_code(store: Store, user_id: str, ttl: float) -> tuple[str, float]:
    """A new one-time code for ``user_id``, valid ``ttl`` seconds: (code, expires).
    The plaintext exists only in the return value."""
    if not ttl > 0:
        raise InvalidValue("a sign-in code must be valid for some time")
    code = CODE_PREFIX + secrets.token_urlsafe(32)
    now = store.now()

    async def q(tx: Transaction) -> None:
        if (await tx.execute("SELECT 1 FROM users WHERE id = ?", (user_id,))).scalar() is None:
            raise NotFound(f"no user with id {user_id!r}")
        await tx.execute("DELETE FROM login_codes WHERE expires <= ?", (now,))
        await tx.execute("INSERT INTO login_codes (code_hash, user_id, created, expires) "
                         "VALUES (?, ?, ?, ?)", (hash_token(code), user_id, now, now + ttl))

    await store.transaction(q)
    return code, now + ttl


async def redeem_login_code(store: Store, code: str) -> str | None:
    """The user id of a valid, unused, unexpired code, which is used up now; None
    for any other (malformed, unknown, used, expired)."""
    if not isinstance(code, str) or not code.startswith(CODE_PREFIX) or len(code) > 200:
        return None
    digest = hash_token(code)
    now = store.now()

    async def q(tx: Transaction) -> str | None:
        row = (await tx.execute("SELECT code_hash, user_id, expires FROM login_codes "
                                "WHERE code_hash = ?", (digest,))).rows
        if not row:
            return None
        stored, user_id, expires = row[0]
        # deleted whatever it says: an expired code is gone too; only the DELETE that
        # removed the row may use it (two redeems at once: one wins)
        gone = (await tx.execute("DELETE FROM login_codes WHERE code_hash = ?",
                                 (digest,))).rowcount
        if not gone or not hmac.compare_digest(str(stored), digest) or float(expires) <= now:
            return None
        return str(user_id)

    return await store.transaction(q)
