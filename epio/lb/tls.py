"""TLS for the router: one certificate per hostname, chosen by SNI.

The certificate directory holds ``HOSTNAME.pem`` files, each with the private
key and the certificate chain (leaf first).  ``_wildcard.example.com.pem``
serves ``*.example.com``; ``default.pem`` (or else the first file by name)
answers clients that send no SNI or an unknown name.  :meth:`SNIContexts.refresh`
re-reads the directory when a file was added, removed or changed; the service
calls it periodically and on SIGHUP, so certificates change without a restart
and without dropping connections (a handshake uses the contexts of its moment).
Certificates kept in the store (ACME-issued, or an app owner's) come through
:meth:`SNIContexts.set_stored` (:mod:`epio.certs.router`); a file of the
directory for the same exact name wins over them.  With a
:class:`~epio.certs.ocsp.Stapler` (``lb.ocsp_stapling``), every context whose
certificate names an OCSP responder staples its OCSP response (docs/https.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

if TYPE_CHECKING:
    from epio.certs.ocsp import Stapler

WILDCARD_PREFIX = "_wildcard."
# TLS 1.2 suites: forward secret AEAD only (Mozilla's "intermediate" list); TLS 1.3's
# suites are all AEAD and keep OpenSSL's defaults
TLS12_CIPHERS = (b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                 b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                 b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")


def server_context() -> SSL.Context:
    """A server context with the router's protocol floor (TLS 1.2) and ciphers."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    ctx.set_cipher_list(TLS12_CIPHERS)
    return ctx


def _context(path: Path, stapler: Stapler | None = None) -> SSL.Context:
    ctx = server_context()
    ctx.use_certificate_chain_file(str(path))
    ctx.use_privatekey_file(str(path))
    ctx.check_privatekey()
    if stapler is not None:
        try:
            chain = x509.load_pem_x509_certificates(path.read_bytes())
        except ValueError:  # OpenSSL read it: no stapling rather than no certificate
            chain = []
        stapler.attach(ctx, chain)
    return ctx


@implementer(IOpenSSLServerConnectionCreator)
class SNIContexts:
    """Server TLS connections whose certificate follows the client's SNI name."""

    log = Logger()

    def __init__(self, directory: Path | None, stapler: Stapler | None = None) -> None:
        self.directory = None if directory is None else Path(directory)
        self.stapler = stapler
        self.exact: dict[str, SSL.Context] = {}
        # certificates from the store (epio.certs.router), by exact hostname
        self.stored: dict[str, SSL.Context] = {}
        self.wild: dict[str, SSL.Context] = {}
        self._signature: tuple[Any, ...] | None = None
        self._base = server_context()
        self._base.set_tlsext_servername_callback(self._on_servername)

    def set_stored(self, contexts: dict[str, SSL.Context]) -> None:
        """The store's certificates (ACME-issued and owners'), by exact hostname."""
        self.stored = contexts

    def _scan(self) -> tuple[Any, ...]:
        if self.directory is None:
            return ()
        try:
            files = sorted(self.directory.glob("*.pem"))
            return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)
        except OSError:
            return ()

    def refresh(self, force: bool = False) -> bool:
        """Reload the directory if it changed; a bad file is skipped and logged."""
        sig = self._scan()
        if sig == self._signature and not force:
            return False
        self._signature = sig
        exact: dict[str, SSL.Context] = {}
        wild: dict[str, SSL.Context] = {}
        default_path = None
        for name, _, _ in sig:
            assert self.directory is not None
            path = self.directory / name
            try:
                ctx = _context(path, self.stapler)
            except (SSL.Error, OSError) as e:
                self.log.error("TLS certificate {path} not loaded: {error}", path=str(path),
                               error=str(e))
                continue
            host = name[:-4].lower()
            if host == "default":
                default_path = path
                continue
            if default_path is None and not (path.parent / "default.pem").exists():
                default_path = path
            if host.startswith(WILDCARD_PREFIX):
                wild["." + host[len(WILDCARD_PREFIX):]] = ctx
            else:
                exact[host] = ctx
        # the base context answers handshakes without SNI (or an unknown name)
        base = (_context(default_path, self.stapler) if default_path is not None
                else server_context())
        base.set_tlsext_servername_callback(self._on_servername)
        self.exact, self.wild, self._base = exact, wild, base
        if self.directory is not None:
            self.log.info("loaded {count} TLS certificates from {dir}",
                          count=len(exact) + len(wild), dir=str(self.directory))
        return True

    def context_for(self, name: str) -> SSL.Context | None:
        ctx = self.exact.get(name)
        if ctx is not None:
            return ctx
        stored = self.stored
        ctx = stored.get(name)
        if ctx is not None:
            return ctx
        dot = name.find(".")
        if dot >= 0 and stored:  # an owner's certificate for a wildcard domain (*.suffix)
            ctx = stored.get("*" + name[dot:])
            if ctx is not None:
                return ctx
        while dot >= 0:
            ctx = self.wild.get(name[dot:])
            if ctx is not None:
                return ctx
            dot = name.find(".", dot + 1)
        return None

    def _on_servername(self, conn: SSL.Connection) -> None:
        raw = conn.get_servername()
        if not raw:
            return
        ctx = self.context_for(raw.decode("ascii", "replace").lower().rstrip("."))
        if ctx is not None:
            conn.set_context(ctx)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._base, None)
