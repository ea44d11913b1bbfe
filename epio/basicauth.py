"""``[basic_auth]``: HTTP Basic authentication that the router enforces for an app.

Shared floor: the manifest parser hashes the passwords (:func:`hash_password`) as
it reads ``epio.ini``, so the parsed manifest -- and everything made from it: the
build's reply on the bus, the release's meta in the store, the route every nexus
publishes to every router -- carries ``sha256$SALT$DIGEST`` strings, never a
password.  The router checks each request against the route's :class:`BasicAuth`
(:meth:`BasicAuth.allows`).

Why salted SHA-256 and not a slow KDF: the router verifies the header of *every*
request (browsers resend it each time) and any client can send wrong ones; a KDF
costing milliseconds would make each attempt cost the router that much CPU.  The
cleartext lives in the app's own ``epio.ini`` (its upload) anyway; what this
protects is the platform's copies.  Comparison is :func:`hmac.compare_digest`, and an
unknown user costs the same hash as a known one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from typing import Any

from attrs import field, frozen

__all__ = ["DEFAULT_REALM", "BasicAuth", "bad_realm", "hash_password"]

#: The realm a browser shows when ``[basic_auth] _realm`` is not set.
DEFAULT_REALM = "Restricted"
SCHEME = "sha256"
_HASH = re.compile(r"^sha256\$([0-9a-f]{32})\$([0-9a-f]{64})$")
_REALM = re.compile(r"^[\x20-\x7e]{1,200}$")
_DUMMY = (b"\0" * 16, b"\0" * 32)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """``sha256$SALT$DIGEST`` of ``password`` (UTF-8) with a random 16-byte salt."""
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.sha256(salt + password.encode("utf-8")).hexdigest()
    return f"{SCHEME}${salt.hex()}${digest}"


def bad_realm(realm: str) -> str | None:
    """Why ``realm`` cannot be sent in a ``WWW-Authenticate`` header (None: it can)."""
    if not _REALM.match(realm):
        return "must be 1-200 printable ASCII characters"
    if '"' in realm or "\\" in realm:
        return "must not contain '\"' or '\\'"
    return None


def _users(value: Mapping[str, tuple[bytes, bytes]]) -> Mapping[str, tuple[bytes, bytes]]:
    return dict(value)


@frozen
class BasicAuth:
    """Who may pass (user -> (salt, sha256 digest)) and the realm to name."""

    realm: str
    users: Mapping[str, tuple[bytes, bytes]] = field(converter=_users, hash=False)
    #: the header line of a 401 answer (CRLF-terminated)
    challenge: bytes = field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "challenge", b'WWW-Authenticate: Basic realm="%s", '
                           b'charset="UTF-8"\r\n' % self.realm.encode("ascii"))

    @classmethod
    def from_wire(cls, data: Any) -> BasicAuth | None:
        """From a route's ``options["basic_auth"]`` (``{"realm", "users": {user:
        "sha256$SALT$DIGEST"}}``); None when it is not that shape."""
        if not isinstance(data, Mapping):
            return None
        realm, users = data.get("realm"), data.get("users")
        if not isinstance(realm, str) or bad_realm(realm) or not isinstance(users, Mapping) \
                or not users:
            return None
        parsed: dict[str, tuple[bytes, bytes]] = {}
        for user, value in users.items():
            m = _HASH.match(value) if isinstance(user, str) and isinstance(value, str) else None
            if m is None:
                return None
            parsed[user] = (bytes.fromhex(m.group(1)), bytes.fromhex(m.group(2)))
        return cls(realm, parsed)

    def allows(self, authorization: bytes | None) -> bool:
        """Whether an ``Authorization`` header value names a user and its password."""
        if not authorization:
            return False
        scheme, _, token = authorization.strip().partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        if not sep:
            return False
        try:
            name = user.decode("utf-8")
        except UnicodeDecodeError:
            return False
        salt, digest = self.users.get(name, _DUMMY)
        ok = hmac.compare_digest(hashlib.sha256(salt + password).digest(), digest)
        return ok and name in self.users
