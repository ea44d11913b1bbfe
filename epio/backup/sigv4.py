"""AWS Signature Version 4 for requests with an ``Authorization`` header.

Written from AWS's description ("Create a signed AWS API request", the S3 "Signature
Calculations for the Authorization Header" page) and checked against AWS's published
examples (tests/backup/test_sigv4.py): the canonical request is

    METHOD \\n CANONICAL-URI \\n CANONICAL-QUERY \\n CANONICAL-HEADERS \\n
    SIGNED-HEADERS \\n PAYLOAD-HASH

the string to sign ``AWS4-HMAC-SHA256 \\n DATE \\n SCOPE \\n sha256(canonical)`` with
``SCOPE = YYYYMMDD/region/service/aws4_request``, and the signing key the HMAC-SHA256
chain ``"AWS4" + secret -> date -> region -> service -> "aws4_request"``.

S3's canonical URI is the path URI-encoded once (``/`` kept); the caller sends exactly
the path and query this module encodes (:func:`encode_path`, :func:`canonical_query`),
so what is signed is what goes on the wire.  Pure functions: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_UNRESERVED = "-_.~"  # besides letters and digits: never encoded (RFC 3986)
_SPACES = re.compile(r"\s+")


def encode(value: str) -> str:
    """URI-encode every byte but the unreserved characters (``%XY`` upper case)."""
    return quote(value, safe=_UNRESERVED)


def encode_path(path: str) -> str:
    """The canonical (and sent) form of an S3 path: each segment encoded, ``/`` kept."""
    return quote(path, safe="/" + _UNRESERVED)


def canonical_query(query: Iterable[tuple[str, str]]) -> str:
    """``name=value`` pairs encoded, sorted by name then value, joined by ``&``; a
    parameter without a value is ``name=``."""
    return "&".join(f"{k}={v}" for k, v in sorted((encode(k), encode(v)) for k, v in query))


def canonical_headers(headers: Mapping[str, str]) -> tuple[str, str]:
    """(the canonical header block, the signed header list) of ``headers``: names lower
    case and sorted, values trimmed with inner runs of spaces made one."""
    items = sorted((k.lower().strip(), _SPACES.sub(" ", v.strip())) for k, v in headers.items())
    block = "".join(f"{k}:{v}\n" for k, v in items)
    return block, ";".join(k for k, _ in items)


def canonical_request(method: str, path: str, query: Iterable[tuple[str, str]],
                      headers: Mapping[str, str], payload_sha256: str) -> tuple[str, str]:
    """(the canonical request, the signed headers); ``path`` is already encoded."""
    block, signed = canonical_headers(headers)
    text = "\n".join((method.upper(), path or "/", canonical_query(query), block, signed,
                      payload_sha256))
    return text, signed


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    """The key of one day, region and service (``date`` is YYYYMMDD)."""
    k = _hmac(("AWS4" + secret_key).encode("utf-8"), date)
    k = _hmac(k, region)
    k = _hmac(k, service)
    return _hmac(k, "aws4_request")


def string_to_sign(amz_date: str, scope: str, canonical: str) -> str:
    return "\n".join((ALGORITHM, amz_date, scope,
                      hashlib.sha256(canonical.encode("utf-8")).hexdigest()))


def authorization(method: str, path: str, query: Iterable[tuple[str, str]],
                  headers: Mapping[str, str], payload_sha256: str, access_key_id: str,
                  secret_key: str, region: str, service: str, amz_date: str) -> str:
    """The ``Authorization`` header value of a request.

    ``headers`` are every header to sign -- at least ``host`` and ``x-amz-date``
    (``amz_date``, ``YYYYMMDDTHHMMSSZ``), and for S3 ``x-amz-content-sha256`` -- sent
    with exactly these values; ``path`` is the encoded path as sent.
    """
    canonical, signed = canonical_request(method, path, list(query), headers, payload_sha256)
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    signature = hmac.new(signing_key(secret_key, amz_date[:8], region, service),
                         string_to_sign(amz_date, scope, canonical).encode("utf-8"),
                         hashlib.sha256).hexdigest()
    return (f"{ALGORITHM} Credential={access_key_id}/{scope}, SignedHeaders={signed}, "
            f"Signature={signature}")
