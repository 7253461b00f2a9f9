"""Ordering a certificate from an ACME CA (RFC 8555) with the ``acme`` library.

The ``acme`` library is blocking (``requests``): each of its calls runs in a
thread (``asyncio.to_thread``), one HTTP request at a time, and the waits
between polls are ``asyncio.sleep`` on the event loop, so an order in progress
never blocks the server and is cancelled cleanly at shutdown. Every failure
comes out as :class:`AcmeFailure`, whose text says what went wrong, at which
step, and what to do about it.

The caller holds the state directory's order lock.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import josepy as jose
import requests
from acme import challenges, client, errors, messages
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .certs import (CertInfo, cert_info, generate_key, key_from_pem, key_to_pem, make_csr,
                    split_chain)
from .responders import HTTP01, TLSALPN01, ResponderError, Responders
from .schedule import RenewalWindow, parse_renewal_info, parse_retry_after
from .settings import AcmeSettings
from .store import Current, Store, StoreError

log = logging.getLogger("elemta.acme")

USER_AGENT = "elemta-acme/0.1"
BAD_NONCE_ROUNDS = 3          # × the library's own retry: up to 6 tries of one request
POLL_FIRST_SECONDS = 0.5
POLL_MAX_SECONDS = 5.0


class AcmeFailure(Exception):
    """An order that did not produce a certificate.

    ``kind`` sorts it (``"unreachable"``, ``"tls"``, ``"rate_limited"``,
    ``"account"``, ``"terms"``, ``"eab"``, ``"validation"``, ``"refused"``,
    ``"timeout"``, ``"responder"``, ``"storage"``, ``"error"``); ``retry_after``
    is the wait in seconds the CA asked for, if it did.
    """

    def __init__(self, message: str, kind: str = "error",
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


class _Network(client.ClientNetwork):
    """The library's network layer, remembering the last ``Retry-After`` and retrying a
    ``badNonce`` more than once (a CA may reject any nonce; RFC 8555, 6.5)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.last_retry_after: str | None = None
        self.session.hooks["response"].append(self._remember)

    def _remember(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.last_retry_after = response.headers.get("Retry-After")

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        for round_ in range(BAD_NONCE_ROUNDS):
            try:
                return super().post(*args, **kwargs)
            except messages.Error as e:
                if e.code != "badNonce" or round_ == BAD_NONCE_ROUNDS - 1:
                    raise
                log.debug("ACME: the CA rejected a nonce again; retrying")
        raise AssertionError("unreachable")


class _TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """The answer to a tls-alpn-01 challenge: ``{}`` (the library no longer has one)."""

    typ = TLSALPN01


@dataclass
class _Step:
    what: str = "starting"

    def __call__(self, what: str) -> None:
        self.what = what
        log.debug("ACME: %s", what)


@dataclass
class _Challenge:
    typ: str
    name: str
    token: str
    key_authorization: str
    body: messages.ChallengeBody
    authzr: messages.AuthorizationResource = field(repr=False)


def _b64(data: bytes) -> str:
    return jose.b64encode(data).decode("ascii")


def _network(settings: AcmeSettings, key: jose.JWK | None = None,
             alg: jose.JWASignature = jose.ES256) -> _Network:
    return _Network(key=key, alg=alg,
                    verify_ssl=str(settings.ca_file) if settings.ca_file else True,
                    user_agent=USER_AGENT, timeout=int(max(1, settings.request_timeout_seconds)))


def _jwk(key_pem: bytes, path: Any) -> tuple[jose.JWK, jose.JWASignature]:
    key = key_from_pem(key_pem)
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1":
        return jose.JWKEC(key=key), jose.ES256
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
        return jose.JWKEC(key=key), jose.ES384
    if isinstance(key, rsa.RSAPrivateKey):
        return jose.JWKRSA(key=key), jose.RS256
    raise AcmeFailure(f"the account key {path} is of a type ACME does not sign with; remove "
                      "account.key and account.json to register a new account", "account")


def _key_and_csr(key_type: str, names: list[str]) -> tuple[bytes, bytes]:
    """A new certificate key (PEM) and the request for ``names`` signed with it."""
    key = generate_key(key_type)
    return key_to_pem(key), make_csr(key, names)


def _status_name(status: Any) -> str | None:
    """A status as its name (the library decodes some statuses, not all)."""
    if status is None:
        return None
    return str(getattr(status, "name", status))


def _problem(e: messages.Error) -> str:
    text = e.detail or e.title or e.description or e.typ
    subs = [f"{s.identifier.value if s.identifier else ''}: {s.detail or s.typ}".lstrip(": ")
            for s in (e.subproblems or ())]
    return f"{text} ({'; '.join(subs)})" if subs else str(text)


def explain(e: BaseException, step: str, settings: AcmeSettings, store: Store,
            retry_after: str | None = None) -> AcmeFailure:
    """``e``, raised while doing ``step``, as an :class:`AcmeFailure` saying what to do."""
    url = settings.directory_url
    where = f"while {step}"
    if isinstance(e, AcmeFailure):
        return e
    if isinstance(e, requests.exceptions.SSLError):
        hint = (f"check that ca_file ({settings.ca_file}) holds the root certificate of "
                "the CA that signed the ACME server's certificate" if settings.ca_file
                else "for a private CA, set ca_file to its root certificate")
        return AcmeFailure(f"the ACME server at {url} presents a certificate this host "
                           f"does not trust ({where}): {_short(e)}; {hint}", "tls")
    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return AcmeFailure(f"cannot reach the ACME server at {url} ({where}): {_short(e)}; "
                           "check the directory setting, this host's DNS and that "
                           "outgoing HTTPS to the CA is allowed", "unreachable")
    if isinstance(e, messages.Error):
        return _explain_problem(e, where, settings, store, retry_after)
    if isinstance(e, errors.ConflictError):
        return AcmeFailure(f"the CA answered 409 Conflict ({where}) for {e.location}",
                           "refused")
    if isinstance(e, errors.ClientError):
        response = e.args[0] if e.args else None
        if isinstance(response, tuple):
            response = response[0]
        if isinstance(response, requests.Response):
            retry = parse_retry_after(response.headers.get("Retry-After"), _now())
            kind = "rate_limited" if response.status_code == 429 else "error"
            return AcmeFailure(f"the ACME server at {url} answered HTTP "
                               f"{response.status_code} {response.reason} ({where}) "
                               "without an ACME problem document; is the directory URL "
                               "right?", kind, retry)
        return AcmeFailure(f"unexpected answer from the CA ({where}): {e}", "error")
    if isinstance(e, ResponderError):
        return AcmeFailure(str(e), "responder")
    if isinstance(e, StoreError):
        return AcmeFailure(str(e), "storage")
    if isinstance(e, OSError):
        return AcmeFailure(f"{where}: {e}", "storage")
    log.debug("ACME: unexpected error %s", where, exc_info=e)
    return AcmeFailure(f"{type(e).__name__} {where}: {e}", "error")


def _explain_problem(e: messages.Error, where: str, settings: AcmeSettings, store: Store,
                     retry_after: str | None) -> AcmeFailure:
    code = e.code or ""
    problem = _problem(e)
    retry = parse_retry_after(retry_after, _now())
    if code == "rateLimited":
        return AcmeFailure(f"the CA rate-limits this account ({where}): {problem}; the "
                           "next attempt waits as long as the CA asked (Retry-After), so "
                           "do not force renewals until then", "rate_limited", retry)
    if code in ("accountDoesNotExist",) or (
            code == "unauthorized" and "deactivated" in problem.lower()):
        return AcmeFailure(
            f"the CA no longer accepts this ACME account ({where}): {problem}. If the "
            f"account was deactivated on purpose, remove {store.account_key} and "
            f"{store.account_json}, then run `elemta acme renew` to register a new "
            "account", "account")
    if code == "externalAccountRequired":
        return AcmeFailure(f"the CA requires External Account Binding ({where}): set "
                           "kid and hmac_key in [plugins.acme.eab] from your account at "
                           "the CA", "eab")
    if code == "userActionRequired":
        return AcmeFailure(f"the CA wants the account holder to act before it issues "
                           f"again ({where}): {problem}; see the link it gives, then "
                           "`elemta acme renew`", "terms")
    if code in ("rejectedIdentifier", "unsupportedIdentifier", "caa"):
        return AcmeFailure(f"the CA refuses to issue for {', '.join(settings.names)} "
                           f"({where}): {problem}; check names (and CAA records naming "
                           "the CA you use)", "refused")
    if code == "unauthorized" and settings.eab is not None and "regist" in where:
        return AcmeFailure(f"the CA refused the account ({where}): {problem}; check kid "
                           "and hmac_key in [plugins.acme.eab]", "eab")
    kind = "rate_limited" if retry is not None and code == "" else "refused"
    return AcmeFailure(f"the CA refused the request ({where}): {code or e.typ}: {problem}",
                       kind, retry)


class Issuer:
    """Orders one certificate for ``settings.names`` and installs it in ``store``."""

    def __init__(self, settings: AcmeSettings, store: Store, responders: Responders) -> None:
        self.settings = settings
        self.store = store
        self.responders = responders
        self._net: _Network | None = None

    def explain(self, e: BaseException, step: str) -> AcmeFailure:
        """``e``, raised while doing ``step``, as an :class:`AcmeFailure` saying what to do."""
        return explain(e, step, self.settings, self.store,
                       self._net.last_retry_after if self._net else None)

    def _validation_failure(self, chall: _Challenge, authzr: messages.AuthorizationResource,
                            ) -> AcmeFailure:
        details = [_problem(c.error) for c in authzr.body.challenges if c.error is not None]
        detail = "; ".join(details) or f"the authorization is {_status_name(authzr.body.status)}"
        if chall.typ == HTTP01:
            hint = (f"the CA connects to port 80 of the addresses in the A/AAAA records of "
                    f"{chall.name}: check that they are this host's, that port 80 is open in "
                    f"the firewall and reaches http_address ({self.settings.http_address})")
        else:
            hint = (f"the CA connects to port 443 of the addresses in the A/AAAA records of "
                    f"{chall.name}: check that they are this host's, that port 443 is open in "
                    "the firewall and reaches tls_alpn_address "
                    f"({self.settings.tls_alpn_address}), with no TLS proxy in between")
        return AcmeFailure(f"the CA could not validate {chall.name} with {chall.typ}: "
                           f"{detail}. {hint}", "validation")

    # ------------------------------------------------------------ account

    def _connect(self, step: _Step) -> tuple[client.ClientV2, jose.JWK]:
        """Directory, account key, account (blocking: run in a thread)."""
        settings, store = self.settings, self.store
        url = settings.directory_url
        step("reading the account key")
        key_pem = store.load_account_key()
        if key_pem is None:
            key_pem = key_to_pem(generate_key(settings.key_type))
            store.save_account_key(key_pem)
            log.info("ACME: created a new %s account key in %s", settings.key_type,
                     store.account_key)
        jwk, alg = _jwk(key_pem, store.account_key)
        net = self._net = _network(settings, jwk, alg)
        step(f"reading the directory {url}")
        directory = client.ClientV2.get_directory(url, net)
        acme = client.ClientV2(directory, net)
        terms = getattr(directory.meta, "terms_of_service", None)
        if terms and not settings.agree_terms:
            raise AcmeFailure(f"the CA at {url} issues only to accounts that agree to its "
                              f"terms of service ({terms}): read them, then set agree_terms = "
                              "true in [plugins.acme]", "terms")
        if acme.external_account_required() and settings.eab is None:
            raise AcmeFailure(f"the CA at {url} requires External Account Binding: set kid "
                              "and hmac_key in [plugins.acme.eab] from your account at the CA",
                              "eab")
        step("registering the ACME account")
        eab = None
        if settings.eab is not None:
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=jwk.public_key(), kid=settings.eab.kid,
                hmac_key=settings.eab.hmac_key.get_secret_value(), directory=directory,
                hmac_alg=settings.eab.algorithm)
        registration = messages.NewRegistration.from_data(
            email=settings.email, terms_of_service_agreed=True if terms else None,
            external_account_binding=eab)
        try:
            regr = acme.new_account(registration)
            created = True
        except errors.ConflictError as e:   # this key has an account already
            regr = acme.query_registration(messages.RegistrationResource(
                uri=e.location, body=messages.Registration()))
            created = False
        status = _status_name(regr.body.status) or "valid"
        if status != "valid":
            raise AcmeFailure(
                f"the ACME account {regr.uri} is {status} at the CA. If that was on purpose, "
                f"remove {store.account_key} and {store.account_json}, then run "
                "`elemta acme renew` to register a new account", "account")
        wanted = (f"mailto:{settings.email}",) if settings.email else ()
        if wanted and set(regr.body.contact) != set(wanted):
            step("updating the account's contact")
            regr = acme.update_registration(regr, regr.body.update(contact=wanted))
        account = {"directory": url, "uri": regr.uri, "contact": list(wanted),
                   "updated_at": time.time()}
        previous = store.load_account() or {}
        if {k: previous.get(k) for k in ("directory", "uri", "contact")} != \
                {k: account[k] for k in ("directory", "uri", "contact")}:
            store.save_account(account)
        if created:
            log.info("ACME: registered the account %s at %s", regr.uri, url)
        return acme, jwk

    # ------------------------------------------------------------ the order

    async def issue(self) -> Current:
        """Order, validate, finalize, download and install a certificate; the new current."""
        step = _Step()
        deadline = time.monotonic() + self.settings.order_timeout_seconds
        challenges_: list[_Challenge] = []
        try:
            # a guard above the deadline checks: every call below is bounded anyway
            async with asyncio.timeout(self.settings.order_timeout_seconds
                                       + self.settings.request_timeout_seconds * 2):
                return await self._issue(step, deadline, challenges_)
        except TimeoutError:
            raise AcmeFailure(f"the order did not finish within "
                              f"{self.settings.order_timeout_seconds:g} s "
                              f"(order_timeout_seconds); it was {step.what}", "timeout") \
                from None
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise self.explain(e, step.what) from e
        finally:
            await self._clean_up(challenges_)

    async def _issue(self, step: _Step, deadline: float,
                     pending: list[_Challenge]) -> Current:
        settings = self.settings
        names = list(settings.names)
        acme, jwk = await asyncio.to_thread(self._connect, step)
        nonce_url = acme.directory["newNonce"]

        step(f"ordering a certificate for {', '.join(names)} (new {settings.key_type} key)")
        key_pem, csr = await asyncio.to_thread(_key_and_csr, settings.key_type, names)
        orderr = await asyncio.to_thread(acme.new_order, csr)

        thumbprint = _b64(jwk.thumbprint())
        for authzr in orderr.authorizations:
            name = authzr.body.identifier.value
            if authzr.body.status == messages.STATUS_VALID:
                continue    # validated recently, and the CA reuses it
            offered = {c.chall.to_partial_json().get("type"): c for c in authzr.body.challenges}
            typ = next((t for t in settings.challenges if t in offered), None)
            if typ is None:
                raise AcmeFailure(f"the CA offers {sorted(map(str, offered))} to validate "
                                  f"{name}, none of challenges = {list(settings.challenges)}; "
                                  "add one it offers", "refused")
            body = offered[typ]
            token = str(body.chall.to_partial_json()["token"])
            pending.append(_Challenge(typ, name, token, f"{token}.{thumbprint}", body, authzr))

        if pending:
            step("starting the challenge responders")
            await self.responders.start({c.typ for c in pending})
            for c in pending:
                if c.typ == HTTP01:
                    self.responders.add_http(c.token, c.key_authorization)
                else:
                    await self.responders.add_alpn(c.name, c.key_authorization)
                await asyncio.to_thread(self.store.put_challenge, c.token, c.typ, c.name,
                                        c.key_authorization)
            for c in pending:
                step(f"answering the {c.typ} challenge for {c.name}")
                response = (challenges.HTTP01Response(key_authorization=c.key_authorization)
                            if c.typ == HTTP01
                            else _TLSALPN01Response(key_authorization=c.key_authorization))
                await asyncio.to_thread(acme.answer_challenge, c.body, response)
            for c in pending:
                step(f"waiting for the CA to validate {c.name} ({c.typ})")
                await self._wait_valid(acme, c, deadline)

        step("finalizing the order")
        try:
            await asyncio.to_thread(acme.begin_finalization, orderr)
        except messages.Error as e:
            if e.code != "orderNotReady":
                raise
        fullchain = await self._wait_certificate(acme, orderr, nonce_url, deadline, step)

        step("checking and storing the certificate")
        info = cert_info(split_chain(fullchain.encode())[0])
        if not info.covers(names):
            raise AcmeFailure(f"the CA issued a certificate for {list(info.names)}, not for "
                              f"all of {names}", "refused")
        current = await asyncio.to_thread(self.store.install, key_pem, fullchain.encode())
        log.info("ACME: issued %s for %s by %s, serial %s, valid until %s",
                 current.generation, ", ".join(info.names), info.issuer, info.serial_hex,
                 info.not_after.isoformat())
        return current

    async def _wait_valid(self, acme: client.ClientV2, c: _Challenge, deadline: float) -> None:
        authzr = c.authzr
        interval = POLL_FIRST_SECONDS
        while True:
            authzr, response = await asyncio.to_thread(acme.poll, authzr)
            status = authzr.body.status
            if status == messages.STATUS_VALID:
                return
            if status not in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
                raise self._validation_failure(c, authzr)
            interval = await self._pause(response, interval, deadline,
                                         f"validating {c.name} ({c.typ})")

    async def _wait_certificate(self, acme: client.ClientV2, orderr: messages.OrderResource,
                                nonce_url: str, deadline: float, step: _Step) -> str:
        assert self._net is not None
        interval = POLL_FIRST_SECONDS
        while True:
            response = await asyncio.to_thread(self._net.post, orderr.uri, None,
                                               new_nonce_url=nonce_url)
            body = messages.Order.from_json(response.json())
            if body.status == messages.STATUS_VALID and body.certificate:
                step("downloading the certificate")
                response = await asyncio.to_thread(self._net.post, body.certificate, None,
                                                   new_nonce_url=nonce_url)
                return response.text
            if body.status == messages.STATUS_INVALID:
                detail = _problem(body.error) if body.error is not None else "no reason given"
                raise AcmeFailure(f"the CA abandoned the order while finalizing it: {detail}",
                                  "refused")
            if body.status == messages.STATUS_READY:
                try:
                    await asyncio.to_thread(acme.begin_finalization, orderr)
                except messages.Error as e:
                    if e.code != "orderNotReady":
                        raise
            interval = await self._pause(response, interval, deadline,
                                         "waiting for the certificate")

    async def _pause(self, response: requests.Response, interval: float, deadline: float,
                     what: str) -> float:
        """Sleep until the next poll (the CA's Retry-After, else a growing interval)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise AcmeFailure(f"the CA was still {what} after "
                              f"{self.settings.order_timeout_seconds:g} s "
                              "(order_timeout_seconds)", "timeout")
        asked = parse_retry_after(response.headers.get("Retry-After"), _now())
        await asyncio.sleep(min(left, asked if asked is not None else interval))
        return min(interval * 1.5, POLL_MAX_SECONDS)

    async def _clean_up(self, pending: list[_Challenge]) -> None:
        for c in pending:
            if c.typ == HTTP01:
                self.responders.remove_http(c.token)
            else:
                self.responders.remove_alpn(c.name)
            try:
                await asyncio.to_thread(self.store.drop_challenge, c.token)
            except OSError:
                pass
        if not self.responders.shared:
            await self.responders.stop()


# ------------------------------------------------------------------ ARI


def fetch_renewal_info(settings: AcmeSettings, store: Store,
                       info: CertInfo) -> RenewalWindow | None:
    """The CA's suggested renewal window for the certificate (RFC 9773), or ``None`` when
    the CA's directory has no ``renewalInfo`` (blocking: run in a thread).

    Raises :class:`AcmeFailure` when the CA cannot be asked or answers nonsense.
    """
    if info.ari_id is None:
        return None
    net = _network(settings)
    url = settings.directory_url
    step = "asking the CA for renewal information (ARI)"
    try:
        directory = client.ClientV2.get_directory(url, net)
        try:
            base = directory["renewalInfo"]
        except KeyError:
            return None
        response = net.get(f"{str(base).rstrip('/')}/{info.ari_id}")
        return parse_renewal_info(response.json(), response.headers.get("Retry-After"), _now())
    except ValueError as e:
        raise AcmeFailure(f"the CA's renewal information is unusable: {e}", "refused") from e
    except Exception as e:
        raise explain(e, step, settings, store, net.last_retry_after) from e


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _short(e: BaseException) -> str:
    """The innermost reason of a ``requests`` error, without the URL repeated."""
    reason: BaseException = e
    seen = set()
    while True:
        inner = reason.args[0] if reason.args and isinstance(reason.args[0], BaseException) \
            else getattr(reason, "reason", None) or reason.__cause__ or reason.__context__
        if not isinstance(inner, BaseException) or id(inner) in seen:
            break
        seen.add(id(inner))
        reason = inner
    text = str(reason)
    if "] " in text and text.startswith("<"):
        text = text.split("] ", 1)[1]
    return text.rstrip(">") or type(reason).__name__
