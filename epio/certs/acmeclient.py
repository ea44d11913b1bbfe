"""The ACME protocol (RFC 8555), through certbot's ``acme`` library.

Everything here blocks (``requests`` underneath): :mod:`epio.certs.issuer` runs
it in the reactor's thread pool (``deferToThread``), one call per protocol step,
so the reactor publishes the HTTP-01 answers between :meth:`AcmeClient.begin` and
:meth:`AcmeClient.finish`.
"""

from __future__ import annotations

import datetime
from typing import Any

import josepy as jose
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization

USER_AGENT = "epio-acme"
HTTP01 = "http-01"
DNS01 = "dns-01"


class AcmeFailure(Exception):
    """An order that did not give a certificate; the message is for the owner."""


def _describe(e: BaseException) -> str:
    if isinstance(e, messages.Error):
        return f"{e.typ.rsplit(':', 1)[-1]}: {e.detail}"
    if isinstance(e, errors.ValidationError):
        out = []
        for authzr in e.failed_authzrs:
            for ch in authzr.body.challenges:
                if ch.error is not None:
                    out.append(f"{authzr.body.identifier.value}: "
                               f"{ch.error.typ.rsplit(':', 1)[-1]}: {ch.error.detail}")
        return "challenge failed: " + ("; ".join(out) or "invalid authorization")
    if isinstance(e, errors.TimeoutError):
        return "the CA did not finish the order in time"
    return f"{type(e).__name__}: {e}"


class AcmeClient:
    """One ACME account at one directory."""

    def __init__(self, directory_url: str, account_key_pem: bytes, account_uri: str | None,
                 verify: bool | str = True, contact: str = "", timeout: float = 30.0) -> None:
        key = serialization.load_pem_private_key(account_key_pem, password=None)
        self.key = jose.jwk.JWKRSA(key=key)
        # verify: a bool or, as requests takes it, a CA bundle path (acme types it bool)
        self.net = client.ClientNetwork(self.key, user_agent=USER_AGENT,
                                        verify_ssl=verify,  # type: ignore[arg-type]
                                        timeout=int(timeout))
        self.directory_url = directory_url
        self.account_uri = account_uri
        self.contact = contact
        self._client: client.ClientV2 | None = None

    def _acme(self) -> client.ClientV2:
        if self._client is None:
            directory = client.ClientV2.get_directory(self.directory_url, self.net)
            self._client = client.ClientV2(directory, self.net)
        return self._client

    def register(self) -> str:
        """Create (or find, for this key) the account; returns its URI."""
        acme = self._acme()
        if self.account_uri:
            self.net.account = messages.RegistrationResource(
                uri=self.account_uri, body=messages.Registration())
            return self.account_uri
        reg = messages.NewRegistration.from_data(
            email=self.contact or None, terms_of_service_agreed=True)
        try:
            regr = acme.new_account(reg)
        except errors.ConflictError as e:  # this key already has an account
            regr = messages.RegistrationResource(uri=e.location, body=messages.Registration())
            self.net.account = regr
        except messages.Error as e:
            raise AcmeFailure("account registration: " + _describe(e)) from None
        self.account_uri = regr.uri
        return regr.uri

    def begin(self, hostname: str, key_pem: bytes, challenge: str = HTTP01
              ) -> tuple[Any, list[tuple[str, str, Any]]]:
        """A new order for ``hostname``; returns it and its challenges of the type
        ``challenge`` (:data:`HTTP01` or :data:`DNS01`) to publish before :meth:`finish`:
        ``(token, answer, challenge body)`` where the answer is the key authorization
        (HTTP-01) or the TXT value of ``_acme-challenge.NAME`` (DNS-01)."""
        acme = self._acme()
        csr = crypto_util.make_csr(key_pem, [hostname])
        try:
            order = acme.new_order(csr)
        except messages.Error as e:
            raise AcmeFailure("new order: " + _describe(e)) from None
        kind = challenges.DNS01 if challenge == DNS01 else challenges.HTTP01
        out = []
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue
            offered = [c for c in authz.body.challenges if isinstance(c.chall, kind)]
            if not offered:
                raise AcmeFailure(f"the CA offers no {challenge} challenge for "
                                  f"{authz.body.identifier.value}")
            ch = offered[0]
            out.append((ch.chall.encode("token"), ch.chall.validation(self.key), ch))
        return order, out

    def finish(self, order: Any, challs: list[tuple[str, str, Any]], timeout: float) -> str:
        """Answer the challenges, wait for validation, finalize; the full chain PEM."""
        acme = self._acme()
        try:
            for _, _, ch in challs:
                acme.answer_challenge(ch, ch.chall.response(self.key))
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
            done = acme.poll_and_finalize(order, deadline)
        except (messages.Error, errors.Error) as e:
            raise AcmeFailure(_describe(e)) from None
        if not done.fullchain_pem:
            raise AcmeFailure("the CA returned no certificate")
        return str(done.fullchain_pem)
