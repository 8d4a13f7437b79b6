"""The client side of workload identity: one workload's certificate, kept valid.

A `CertStore` obtains a leaf certificate for its `Identity` from the identity
service (through a `Requester`), renews it at ``renew_at`` of its lifetime,
and keeps two long-lived TLS contexts presenting it: `server_context` for
accepting mesh connections and `client_context` for dialling them.

A store may instead `adopt` a chain and key held from before (a VM's files,
which `write_back` keeps current with each renewal) and renew those, proving
the identity with the certificate itself.

Renewal loads the new chain and key *into the same context objects*, so
listeners and dialers holding them present the new certificate from their next
handshake on; connections already open keep working, since an established
TLS session never uses the context's certificate again.

Trust bundles: the service sends the anchors it trusts with each certificate.
New anchors are added to the existing contexts. OpenSSL cannot remove a CA from
a context's store, so when an anchor *leaves* the bundle the store builds fresh
contexts and hands those out from then on; the old contexts stay valid for the
connections that use them, and whoever caches a context (a listener created
with ``ssl=ctx``) should fetch it again on `on_change` — or look it up per
connection, as with ``StreamWriter.start_tls(store.server_context())``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry, Counter, Gauge

from mesh.errors import ConfigError, IdentityError
from mesh.identity import ca, tls
from mesh.identity.bundle import TrustBundle, fingerprint, rfc3339
from mesh.identity.errors import (
    CertificateExpired,
    ServiceUnavailable,
    TrustSetupError,
    UntrustedChain,
)
from mesh.identity.names import Identity, InvalidName

log = logging.getLogger(__name__)

# Renewal happens at renew_at ± this fraction of the lifetime, so that workloads
# started together (a rollout, a node reboot) do not all renew in the same second.
RENEW_JITTER = 0.05
# Errors worth retrying: the service is away or overloaded. Everything else
# (a refusal, an unusable answer) would come back the same, and is raised.
RETRYABLE: tuple[type[BaseException], ...] = (ServiceUnavailable, OSError)


@dataclass(frozen=True)
class Issued:
    """What the identity service returned for one certificate request."""

    chain_pem: bytes  # leaf first, then intermediates
    bundle_pem: bytes | None  # anchors the service trusts now, or None


class Requester(Protocol):
    """Asks the identity service to sign a CSR.

    ``current`` is the store when it still holds a valid certificate (a requester
    may present it over mTLS to prove the identity being renewed), else None.
    Raises `ServiceUnavailable` (or `OSError`) when the service cannot be
    reached, `IssuanceRefused` when it says no.
    """

    async def certify(self, csr_pem: bytes, *, current: CertStore | None) -> Issued: ...


ChangeListener = Callable[["CertStore"], None]


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.expiration = Gauge(
            "identity_cert_expiration_timestamp_seconds",
            "When the workload's current certificate expires (Unix time)", ["identity"],
            registry=registry)
        self.refresh = Counter(
            "identity_cert_refresh", "Certificate requests to the identity service, by result",
            ["result"], registry=registry)


# Several stores may share a registry; metric families may be registered only once.
_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()


def _metrics_for(registry: CollectorRegistry) -> _Metrics:
    metrics = _METRICS.get(registry)
    if metrics is None:
        metrics = _METRICS[registry] = _Metrics(registry)
    return metrics


@dataclass(frozen=True)
class _Current:
    certs: tuple[x509.Certificate, ...]
    chain_pem: bytes
    key: ec.EllipticCurvePrivateKey
    received: float
    """When it arrived: lifetimes count from here, since notBefore is backdated for skew."""

    @property
    def not_before(self) -> float:
        return self.certs[0].not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self.certs[0].not_valid_after_utc.timestamp()


class CertStore:
    """One workload's certificate, its renewal, and the TLS contexts that present it.

    ``registry`` receives the store's metrics (``identity_cert_*``); without one
    the store keeps its own, as `metrics`.
    """

    def __init__(self, identity: Identity, requester: Requester, *, bundle: TrustBundle,
                 clock: Callable[[], float] = time.time, renew_at: float = 0.7,
                 backoff: tuple[float, float] = (0.5, 30.0), rng: random.Random | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 registry: CollectorRegistry | None = None) -> None:
        if not 0.0 < renew_at < 1.0:
            raise ConfigError(f"renew_at is {renew_at}; it must be a fraction of the "
                              "certificate lifetime between 0 and 1, such as 0.7")
        if not 0.0 < backoff[0] <= backoff[1]:
            raise ConfigError(f"backoff is {backoff}; it must be (first delay, longest "
                              "delay) in seconds, with 0 < first <= longest")
        self._identity = identity
        self._requester = requester
        self._bundle = bundle
        self._clock = clock
        self._renew_at = renew_at
        self._backoff = backoff
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._current: _Current | None = None
        self._server_ctx = tls.server_context(bundle)
        self._client_ctx = tls.client_context(bundle)
        self._stopped = asyncio.Event()
        self.on_change: list[ChangeListener] = []
        self.metrics = registry if registry is not None else CollectorRegistry()
        self._metrics = _metrics_for(self.metrics)

    # -- what the store holds -----------------------------------------------------------

    @property
    def identity(self) -> Identity:
        return self._identity

    @property
    def bundle(self) -> TrustBundle:
        """The anchors this workload trusts now (the latest the service sent)."""
        return self._bundle

    @property
    def chain(self) -> bytes | None:
        """The current chain as PEM, leaf first; None before the first certificate."""
        return self._current.chain_pem if self._current else None

    @property
    def certificates(self) -> tuple[x509.Certificate, ...]:
        """The current chain, leaf first; empty before the first certificate."""
        return self._current.certs if self._current else ()

    @property
    def key_pem(self) -> bytes:
        """The current private key as unencrypted PKCS#8 PEM, for `tls.load_identity`."""
        if self._current is None:
            raise IdentityError(f"{self._identity} has no certificate yet; await start() first")
        return ca.key_pem(self._current.key)

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        """The current certificate's key, for signing caller assertions."""
        if self._current is None:
            raise IdentityError(f"{self._identity} has no certificate yet; await start() first")
        return self._current.key

    @property
    def expires_at(self) -> float | None:
        """When the current certificate expires (Unix time); None before the first."""
        return self._current.not_after if self._current else None

    def server_context(self) -> ssl.SSLContext:
        """The context for accepting mesh connections (the same object across renewals)."""
        return self._server_ctx

    def client_context(self) -> ssl.SSLContext:
        """The context for dialling mesh peers (the same object across renewals)."""
        return self._client_ctx

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Obtain the first certificate, retrying while the service is unreachable.

        `IssuanceRefused` and unusable answers are permanent and raised.
        """
        await self.renew()

    async def renew(self) -> None:
        """Obtain a new certificate now, as `run` does when one is due (same retries)."""
        if not await self._obtain():
            raise IdentityError(f"the certificate store of {self._identity} was stopped "
                                "before it obtained a certificate")

    def adopt(self, chain_pem: bytes, key_pem: bytes) -> None:
        """Present a chain and key obtained before (a VM's certificate files, kept
        across restarts) until `run` renews them, when due, through the identity
        service, which accepts the certificate itself as the proof for its renewal.

        Checked as an issued chain is (this identity, the trust bundle, the key's
        own certificate); raises `CertificateExpired` when it is no longer (or not
        yet) valid, `UntrustedChain` or `TrustSetupError` when it is unusable.
        """
        what = f"the certificate held for {self._identity} is"
        try:
            certs, key = tuple(ca.load_certs(chain_pem)), ca.load_key(key_pem)
        except TrustSetupError as e:
            raise TrustSetupError(f"{what} unreadable: {e}") from e
        if not _same_key(certs[0], key):
            raise TrustSetupError(f"{what} not the held key's: the certificate and key "
                                  "do not belong together (written by different "
                                  "enrollments, or interrupted while being replaced)")
        self._check(certs, self._bundle, what=f"{what} a")
        # Lifetimes count from issuance, which the service backdates notBefore from.
        issued = certs[0].not_valid_before_utc.timestamp() + ca.BACKDATE.total_seconds()
        self._install(certs, key, self._bundle, received=min(issued, self._clock()))
        log.info("identity certificate adopted identity=%s serial=%x not_after=%s "
                 "renew_in=%.0fs", self._identity, certs[0].serial_number,
                 rfc3339(certs[0].not_valid_after_utc), self._renewal_delay())

    async def run(self) -> None:
        """Renew for ever (until `stop`), at ``renew_at`` of each certificate's lifetime.

        Calls `start` first when no certificate is held yet. While the service is
        unreachable it retries with jittered exponential backoff, logging each
        failure with the time left on the current certificate; permanent errors
        are raised, with the current certificate still in place.
        """
        if self._current is None:
            await self.start()
        while await self._pause(self._renewal_delay()):
            if not await self._obtain():
                return

    def stop(self) -> None:
        """End `run` (and a `start` still retrying) at its next wait."""
        self._stopped.set()

    # -- renewal ----------------------------------------------------------------------

    async def _obtain(self) -> bool:
        """One certificate, retrying; False when stopped before one was obtained."""
        attempt = 0
        while not self._stopped.is_set():
            attempt += 1
            try:
                await self._renew_once()
                return True
            except RETRYABLE as e:
                delay = self._retry_delay(attempt)
                self._failed(e, attempt=attempt, retry_in=delay)
                if not await self._pause(delay):
                    return False
            except IdentityError as e:
                self._failed(e, attempt=attempt, retry_in=None)
                raise
        return False

    async def _renew_once(self) -> None:
        # A fresh key for every certificate: a key that leaked (a core dump, a
        # debugger) is then useful only until the certificate it belongs to
        # expires, and P-256 keys cost microseconds to make.
        key = ec.generate_private_key(ec.SECP256R1())
        csr_pem = ca.make_csr(key, self._identity).public_bytes(serialization.Encoding.PEM)
        issued = await self._requester.certify(csr_pem, current=self if self._valid() else None)
        certs, bundle = self._accept(issued, key)
        self._install(certs, key, bundle, received=self._clock())
        self._metrics.refresh.labels("success").inc()
        log.info("identity certificate issued identity=%s serial=%x not_after=%s",
                 self._identity, certs[0].serial_number,
                 rfc3339(certs[0].not_valid_after_utc))

    def _accept(self, issued: Issued, key: ec.EllipticCurvePrivateKey
                ) -> tuple[tuple[x509.Certificate, ...], TrustBundle]:
        """The issued chain and bundle, once checked to be usable by this workload."""
        what = f"the identity service answered {self._identity}'s request with"
        try:
            certs = tuple(ca.load_certs(issued.chain_pem))
            bundle = TrustBundle.from_pem(issued.bundle_pem) if issued.bundle_pem \
                else self._bundle
        except TrustSetupError as e:
            raise TrustSetupError(f"{what} something unusable: {e}") from e
        if not _same_key(certs[0], key):
            raise TrustSetupError(f"{what} a certificate for another key than the one in "
                                  "the request; the service or a proxy before it is broken")
        self._check(certs, bundle, what=f"{what} a")
        return certs, bundle

    def _check(self, certs: tuple[x509.Certificate, ...], bundle: TrustBundle, *,
               what: str) -> None:
        """Raise unless ``certs`` name this workload and verify under ``bundle`` now;
        ``what`` begins each message (it reads on with "certificate ..." or "chain ...")."""
        try:
            named = Identity.from_certificate(certs[0])
        except InvalidName as e:
            raise TrustSetupError(f"{what} certificate that names no identity: {e}") from e
        if named != self._identity:
            raise TrustSetupError(f"{what} certificate for {named}")
        try:
            bundle.verify(certs, now=self._now())
        except (UntrustedChain, CertificateExpired) as e:
            raise type(e)(f"{what} chain that this workload cannot use: {e}") from e

    def _install(self, certs: tuple[x509.Certificate, ...], key: ec.EllipticCurvePrivateKey,
                 bundle: TrustBundle, *, received: float) -> None:
        chain_pem = b"".join(ca.cert_pem(c) for c in certs)
        key_pem = ca.key_pem(key)
        server, client = self._server_ctx, self._client_ctx
        old = {fingerprint(a) for a in self._bundle.anchors}
        new = {fingerprint(a) for a in bundle.anchors}
        if old - new:
            # OpenSSL cannot take a CA out of a context's store: only fresh
            # contexts stop trusting it. Old ones live on in open connections.
            server, client = tls.server_context(bundle), tls.client_context(bundle)
        elif new - old:
            added = "".join(ca.cert_pem(a).decode("ascii") for a in bundle.anchors
                            if fingerprint(a) not in old)
            for ctx in (server, client):
                ctx.load_verify_locations(cadata=added)
        for ctx in (server, client):
            tls.load_identity(ctx, chain_pem, key_pem)
        if old != new:
            log.info("trust bundle changed identity=%s added=%s removed=%s fresh_contexts=%s",
                     self._identity, _listing(bundle, new - old),
                     _listing(self._bundle, old - new), bool(old - new))
        self._server_ctx, self._client_ctx = server, client
        self._bundle = bundle
        self._current = _Current(certs, chain_pem, key, received)
        self._metrics.expiration.labels(str(self._identity)).set(self._current.not_after)
        for listener in list(self.on_change):
            try:
                listener(self)
            except Exception:
                # One broken listener must not keep the others from the news.
                log.exception("identity change listener failed identity=%s listener=%r",
                              self._identity, listener)

    def _failed(self, cause: BaseException, *, attempt: int, retry_in: float | None) -> None:
        self._metrics.refresh.labels("failure").inc()
        expires = self.expires_at
        left = expires - self._clock() if expires is not None else None
        level = logging.ERROR if retry_in is None or (left is not None and left <= 0) \
            else logging.WARNING
        log.log(level, "identity %s failed identity=%s attempt=%d retry_in=%s expires_in=%s "
                "cause=%s: %s", "renewal" if self._current else "issuance", self._identity,
                attempt, f"{retry_in:.2f}s" if retry_in is not None else "never",
                f"{left:.0f}s" if left is not None else "none", type(cause).__name__, cause)

    # -- timing -------------------------------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def _valid(self) -> bool:
        cur = self._current
        return cur is not None and cur.not_before <= self._clock() < cur.not_after

    def _renewal_delay(self) -> float:
        """Seconds until the current certificate is due for renewal, with jitter."""
        assert self._current is not None
        start = max(self._current.not_before, self._current.received)
        end = self._current.not_after
        fraction = self._renew_at + self._rng.uniform(-RENEW_JITTER, RENEW_JITTER)
        fraction = min(max(fraction, 0.0), 1.0)
        return max(0.0, start + fraction * (end - start) - self._clock())

    def _retry_delay(self, attempt: int) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random."""
        first, longest = self._backoff
        ceiling = min(longest, first * 2 ** min(attempt - 1, 62))
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    async def _pause(self, delay: float) -> bool:
        """Wait ``delay`` with the injected sleep; False when stopped meanwhile."""
        if self._stopped.is_set():
            return False
        sleeper = asyncio.ensure_future(self._sleep(delay))
        stopper = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait((sleeper, stopper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, stopper):
                task.cancel()
            await asyncio.gather(sleeper, stopper, return_exceptions=True)
        error = None if sleeper.cancelled() else sleeper.exception()
        if error is not None:
            raise error
        return not self._stopped.is_set()


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def write_back(cert_file: Path, key_file: Path) -> ChangeListener:
    """A listener that writes each new chain and key over ``cert_file`` and
    ``key_file``, so that a restarted process adopts the latest (`CertStore.adopt`).

    Each file is replaced atomically (a temporary file in the same directory,
    fsync, rename); the key file is mode 0600. The two renames are not one: a crash
    between them (microseconds, once a renewal) leaves a pair that `adopt` refuses.
    A write that fails is logged and tried again at the next renewal; the store
    keeps serving from memory.
    """

    def write(store: CertStore) -> None:
        chain = store.chain
        if chain is None:
            return
        try:
            ca.write_private(key_file, store.key_pem)
            ca.write_public(cert_file, chain)
        except OSError as e:
            log.warning("identity files not written identity=%s cert_file=%s key_file=%s "
                        "cause=%s; a restart would adopt the previous certificate",
                        store.identity, cert_file, key_file, e.strerror or e)
            return
        log.info("identity files written identity=%s cert_file=%s key_file=%s",
                 store.identity, cert_file, key_file)

    return write


def _listing(bundle: TrustBundle, fingerprints: set[str]) -> str:
    return ",".join(bundle.describe(a) for a in bundle.anchors
                    if fingerprint(a) in fingerprints) or "none"
