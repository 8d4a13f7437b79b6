"""Caller assertions: how a target proxy learns who called it through a gateway it does
not trust.

When the caller's proxy dials an endpoint reached through a gateway (an endpoint
with an authority override: a mirror of a linked cluster's Service), it signs with
its workload key a short-lived `AssertionClaims` (its identity, the target
authority it names in the transport header, an expiry and a random nonce) and sends
it, with its certificate chain, in transport-header field 101 (`peer_header`). The
gateway checks the assertion names its mTLS peer and passes it on unchanged; the
target verifies it against its own trust bundle (`AssertionVerifier`): the chain to
an anchor, the signature, the expiry, the authority it was asked for, and the nonce.

Signing costs an ECDSA signature, so `ClientCredentials` keeps one assertion per
target authority for most of its lifetime (`LIFETIME`, re-signed when less than
`REFRESH_BEFORE` is left). The same assertion therefore arrives in many
connections, all through the same path; the replay cache remembers, for each nonce,
the peer that first presented it and refuses it from any other peer (another
gateway, or a pod that saw it and replays it directly). Within its lifetime an
assertion could still be reused by the gateway that carried it; the short expiry
bounds that, and the gateway could not have made up the caller in the first place.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.errors import IdentityError, ProtocolError
from mesh.identity.bundle import TrustBundle
from mesh.identity.names import Identity
from mesh.proxy.discovery import EndpointSpec, ServiceSpec
from mesh.proxy.transport_header import (
    AssertionClaims,
    CallerAssertion,
    SessionProtocol,
    TransportHeader,
)

LIFETIME = 60
"""Seconds an assertion is valid for after it is signed."""
REFRESH_BEFORE = 15
"""A cached assertion is re-signed once less than this many seconds of it are left."""
MAX_LIFETIME = 300
"""Assertions valid for longer than this from now are refused (a stolen one would last)."""
NONCE_SIZE = 16
REPLAY_CAPACITY = 100_000
"""Nonces remembered at once; when all are unexpired, new assertions are refused."""
_VERIFIED_CAPACITY = 4096
_SIGNED_CAPACITY = 4096
_CONTEXT = b"meshgate caller assertion v1\x00"
"""Prefixed to the claims before signing, so no other signature by the key can pass."""


class BadAssertion(ProtocolError):
    """A caller assertion that does not hold; `asserted` is the identity it claimed."""

    def __init__(self, message: str, *, asserted: str = "") -> None:
        super().__init__(message)
        self.asserted = asserted


@dataclass(frozen=True)
class Asserted:
    """A verified assertion: the caller it proves, for which authority, until when."""

    caller: str
    authority: str
    not_after: int
    nonce: bytes


def normal_authority(name: str) -> str:
    """A service name as compared: lower case, without a trailing dot."""
    return name.lower().rstrip(".")


# -- signing -------------------------------------------------------------------------------


def sign_assertion(key: ec.EllipticCurvePrivateKey, chain: Sequence[x509.Certificate], *,
                   caller: str, authority: str, now: float, lifetime: int = LIFETIME,
                   nonce: bytes | None = None) -> CallerAssertion:
    """An assertion that `caller` (the identity of `chain`'s leaf) calls `authority`."""
    claims = AssertionClaims(caller=caller, authority=normal_authority(authority),
                             not_after=int(now) + lifetime,
                             nonce=nonce if nonce is not None else os.urandom(NONCE_SIZE))
    encoded = claims.encode()
    signature = key.sign(_CONTEXT + encoded, ec.ECDSA(hashes.SHA256()))
    der = tuple(cert.public_bytes(serialization.Encoding.DER) for cert in chain)
    return CallerAssertion(encoded, signature, der)


class SigningWorkload(Protocol):
    """What signing needs of a workload identity (`CertStore`, `StaticIdentity`)."""

    @property
    def identity(self) -> Identity: ...
    @property
    def certificates(self) -> tuple[x509.Certificate, ...]: ...
    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey: ...
    def client_context(self) -> ssl.SSLContext: ...


class ClientCredentials:
    """What the outbound side dials peer proxies with: call it for the TLS client
    context; `assertion_for` gives the caller assertion for a target authority."""

    def __init__(self, workload: SigningWorkload, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.workload = workload
        self.clock = clock
        self._signed: dict[str, tuple[x509.Certificate, CallerAssertion, int]] = {}
        self.signatures = 0
        """Assertions signed so far (the rest came from the cache)."""

    def __call__(self) -> ssl.SSLContext:
        return self.workload.client_context()

    def assertion_for(self, authority: str) -> CallerAssertion:
        """A valid assertion for `authority`, signed now or a little earlier."""
        now = self.clock()
        authority = normal_authority(authority)
        chain = self.workload.certificates
        if not chain:
            raise IdentityError(f"{self.workload.identity} has no certificate yet to sign "
                                "a caller assertion with")
        cached = self._signed.get(authority)
        # A renewed certificate (another leaf) comes with another key: sign again.
        if cached is not None and cached[0] is chain[0] and cached[2] - now > REFRESH_BEFORE:
            return cached[1]
        assertion = sign_assertion(self.workload.private_key, chain,
                                   caller=str(self.workload.identity), authority=authority,
                                   now=now)
        if len(self._signed) >= _SIGNED_CAPACITY:
            self._signed.clear()
        self._signed[authority] = (chain[0], assertion, int(now) + LIFETIME)
        self.signatures += 1
        return assertion


def peer_header(credentials: Callable[[], ssl.SSLContext], ep: EndpointSpec,
                service: ServiceSpec, protocol: SessionProtocol | None = None
                ) -> TransportHeader:
    """The transport header for dialling `ep`'s proxy, an endpoint of `service`.

    An endpoint with an authority override is a gateway of a linked cluster: the
    header names the service over there and, when `credentials` can sign, carries
    the caller's assertion for it.
    """
    header = TransportHeader(port=ep.target_port, name=ep.authority or service.name,
                             protocol=protocol)
    if ep.authority and isinstance(credentials, ClientCredentials):
        return replace(header, assertion=credentials.assertion_for(ep.authority))
    return header


# -- verifying -----------------------------------------------------------------------------


def verify_assertion(assertion: CallerAssertion, *, bundle: TrustBundle, authority: str,
                     now: float) -> Asserted:
    """Check `assertion` for a connection that named `authority`; raise `BadAssertion`.

    The chain must lead to an anchor of `bundle` and its leaf must be the asserted
    caller, the signature must be the leaf key's, the authority must match, and the
    assertion must be unexpired (and not valid for implausibly long).
    """
    try:
        claims = AssertionClaims.decode(assertion.claims)
    except ProtocolError as e:
        raise BadAssertion(f"the assertion's claims are malformed: {e}") from None
    who = claims.caller or "-"
    if not assertion.chain:
        raise BadAssertion("the assertion carries no certificate chain", asserted=who)
    try:
        chain = [x509.load_der_x509_certificate(der) for der in assertion.chain]
    except ValueError as e:
        raise BadAssertion(f"the assertion's chain is not DER certificates: {e}",
                           asserted=who) from None
    try:
        bundle.verify(chain, now=datetime.fromtimestamp(now, UTC))
        signer = str(Identity.from_certificate(chain[0]))
    except IdentityError as e:
        raise BadAssertion(f"the assertion's chain is not trusted: {e}", asserted=who) from None
    if signer != claims.caller:
        raise BadAssertion(f"the assertion names caller {who} but is signed by {signer}",
                           asserted=who)
    key = chain[0].public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise BadAssertion(f"the certificate of {signer} has no ECDSA key", asserted=who)
    try:
        key.verify(assertion.signature, _CONTEXT + assertion.claims, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BadAssertion(f"the signature of the assertion for {who} does not verify with "
                           "the key of its certificate", asserted=who) from None
    asserted = Asserted(claims.caller, claims.authority, claims.not_after, claims.nonce)
    _check_fresh(asserted, now=now, authority=authority)
    return asserted


def _check_fresh(asserted: Asserted, *, now: float, authority: str) -> None:
    who = asserted.caller
    if now > asserted.not_after:
        raise BadAssertion(f"the assertion for {who} expired {now - asserted.not_after:.0f}s "
                           "ago (check the clocks of both hosts if this repeats)", asserted=who)
    if asserted.not_after - now > MAX_LIFETIME:
        raise BadAssertion(f"the assertion for {who} is valid for "
                           f"{asserted.not_after - now:.0f}s, over the {MAX_LIFETIME}s limit",
                           asserted=who)
    if normal_authority(authority) != asserted.authority:
        raise BadAssertion(f"the assertion for {who} is for {asserted.authority or '-'}, but "
                           f"the connection is for {normal_authority(authority) or '-'}",
                           asserted=who)


class ReplayCache:
    """Nonces seen lately, each with the peer that first presented it, kept until the
    assertion it names expires; at most `capacity` at once."""

    def __init__(self, capacity: int = REPLAY_CAPACITY) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[bytes, tuple[str, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, asserted: Asserted, *, peer: str, now: float) -> None:
        """Remember the assertion from `peer`; raise `BadAssertion` for a replay."""
        first = self._seen.get(asserted.nonce)
        if first is not None:
            if first[0] != peer:
                raise BadAssertion(f"the assertion for {asserted.caller} was replayed: "
                                   f"{first[0]} presented it first", asserted=asserted.caller)
            return
        self._expire(now)
        if len(self._seen) >= self.capacity:
            raise BadAssertion(f"{len(self._seen)} unexpired assertions are remembered, the "
                               "replay cache is full; refusing new ones until some expire",
                               asserted=asserted.caller)
        self._seen[asserted.nonce] = (peer, asserted.not_after)

    def _expire(self, now: float) -> None:
        # Assertions are signed for the same lifetime, so insertion order is close to
        # expiry order: drop expired ones from the front; a straggler waits its turn.
        seen = self._seen
        while seen:
            nonce, (_, not_after) = next(iter(seen.items()))
            if not_after >= now:
                return
            del seen[nonce]


class AssertionVerifier:
    """Verifies the assertions a listener is presented, against the current bundle.

    An assertion verified once is remembered (by its digest, until it expires) so
    that the same cached assertion in the next connection costs a hash, not a chain
    verification and a signature check (measured: about 4 us instead of 300 us,
    `bench/assertion.py`). Its chain is then not checked again for the assertion's
    remaining lifetime, at most `MAX_LIFETIME`; a new trust bundle clears the memory.
    """

    def __init__(self, bundle: Callable[[], TrustBundle], *,
                 clock: Callable[[], float] = time.time,
                 replay: ReplayCache | None = None) -> None:
        self.bundle = bundle
        self.clock = clock
        self.replay = replay
        self._verified: dict[bytes, Asserted] = {}
        self._verified_with: TrustBundle | None = None

    def check(self, assertion: CallerAssertion, *, authority: str, peer: str) -> Asserted:
        """The verified assertion presented by `peer` for `authority`; raises
        `BadAssertion`. With a replay cache the nonce is checked and remembered."""
        now = self.clock()
        bundle = self.bundle()
        if bundle is not self._verified_with:  # rotated anchors: verify everything again
            self._verified.clear()
            self._verified_with = bundle
        digest = hashlib.sha256(assertion.encode()).digest()
        asserted = self._verified.get(digest)
        if asserted is None:
            asserted = verify_assertion(assertion, bundle=bundle, authority=authority, now=now)
            if len(self._verified) >= _VERIFIED_CAPACITY:
                self._verified = {d: a for d, a in self._verified.items()
                                  if a.not_after >= now}
                if len(self._verified) >= _VERIFIED_CAPACITY:
                    self._verified.clear()
            self._verified[digest] = asserted
        else:
            _check_fresh(asserted, now=now, authority=authority)
        if self.replay is not None:
            self.replay.admit(asserted, peer=peer, now=now)
        return asserted
