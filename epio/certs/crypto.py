"""Keys, CSRs and certificates for the platform's TLS (pyca/cryptography).

Private keys are kept in the store *sealed*: AES-256-GCM under a key derived
from the cluster secret with HKDF-SHA256 (``info = b"epio certificate keys"``),
a fresh 96-bit nonce per seal, the hostname (or ``acme-account:<directory>``)
as associated data, so a sealed key copied to another row does not open.
Anyone with the store but not the cluster secret gets no private key.
"""

from __future__ import annotations

import base64
import datetime
import os

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

SEAL_INFO = b"epio certificate keys"
SEAL_VERSION = "v1"


class CertificateError(ValueError):
    """A certificate or key that cannot be used (mismatch, unreadable, wrong names)."""


def _seal_key(secret: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=SEAL_INFO).derive(secret)


def seal(secret: bytes, plaintext: bytes, context: str) -> str:
    """``plaintext`` encrypted for the store (text: ``v1:<base64 nonce+ciphertext>``)."""
    nonce = os.urandom(12)
    ct = AESGCM(_seal_key(secret)).encrypt(nonce, plaintext, context.encode())
    return SEAL_VERSION + ":" + base64.b64encode(nonce + ct).decode("ascii")


def unseal(secret: bytes, sealed: str, context: str) -> bytes:
    """The plaintext of :func:`seal`; CertificateError if the secret or context differ."""
    version, _, body = sealed.partition(":")
    if version != SEAL_VERSION:
        raise CertificateError(f"unknown sealed key format {version!r}")
    raw = base64.b64decode(body)
    try:
        return AESGCM(_seal_key(secret)).decrypt(raw[:12], raw[12:], context.encode())
    except InvalidTag:
        raise CertificateError("sealed key does not open with this cluster secret") from None


def new_key_pem() -> bytes:
    """A fresh P-256 private key (PEM, PKCS#8): fast to make, accepted by every CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_account_key_pem() -> bytes:
    """A fresh RSA-2048 ACME account key (RS256 is what every ACME server accepts)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_chain(cert_pem: bytes) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as e:
        raise CertificateError(f"the certificate is not PEM: {e}") from None
    if not chain:
        raise CertificateError("no certificate in the PEM data")
    return chain


def names_of(cert: x509.Certificate) -> list[str]:
    """The DNS names a certificate is for (its SAN, else its common name)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return [str(a.value).lower()
                for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def covers(names: list[str], hostname: str) -> bool:
    """Whether one of ``names`` (``*.example.com`` wildcards allowed) covers ``hostname``."""
    hostname = hostname.lower()
    for n in names:
        if n == hostname:
            return True
        if n.startswith("*.") and "." in hostname and hostname.split(".", 1)[1] == n[2:]:
            return True
    return False


def not_after(cert_pem: bytes) -> float:
    """The leaf's expiry as a Unix time."""
    return load_chain(cert_pem)[0].not_valid_after_utc.timestamp()


def check_pair(cert_pem: bytes, key_pem: bytes, hostname: str, now: float) -> float:
    """Validate an owner's certificate for ``hostname``: PEM chain, the key matches the
    leaf, the leaf's names cover the hostname, it is valid now.  Returns its expiry."""
    chain = load_chain(cert_pem)
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise CertificateError(f"the key is not an unencrypted PEM private key: {e}") from None
    pub = leaf.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    mine = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    if pub != mine:
        raise CertificateError("the key does not match the certificate")
    names = names_of(leaf)
    if not covers(names, hostname):
        raise CertificateError(
            f"the certificate is for {', '.join(names) or 'no DNS name'}, not {hostname}")
    when = datetime.datetime.fromtimestamp(now, datetime.UTC)
    if leaf.not_valid_after_utc <= when:
        raise CertificateError("the certificate has expired")
    if leaf.not_valid_before_utc > when:
        raise CertificateError("the certificate is not valid yet")
    return leaf.not_valid_after_utc.timestamp()
