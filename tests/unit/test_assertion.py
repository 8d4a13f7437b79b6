"""Caller assertions: signing, every way verification refuses one, the replay cache,
the per-target cache of signed assertions, and the header the outbound side sends."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.identity import ca
from mesh.identity.bundle import TrustBundle
from mesh.identity.names import Identity
from mesh.proxy.assertion import (
    LIFETIME,
    REFRESH_BEFORE,
    Asserted,
    AssertionVerifier,
    BadAssertion,
    ClientCredentials,
    ReplayCache,
    peer_header,
    sign_assertion,
    verify_assertion,
)
from mesh.proxy.discovery import EndpointSpec, ServiceSpec
from mesh.proxy.transport_header import AssertionClaims, CallerAssertion, SessionProtocol
from mesh.structs import convert

DOMAIN = "cluster.local"
NOW = 1_800_000_000.0
CALLER = Identity("default", "client", DOMAIN)
TARGET = "web.default.svc.cluster.local"


@dataclass
class Issued:
    bundle: TrustBundle
    chain: tuple[x509.Certificate, ...]
    key: ec.EllipticCurvePrivateKey


def issue(identity: Identity = CALLER, anchor: ca.CertKey | None = None) -> Issued:
    when = datetime.fromtimestamp(NOW, UTC)
    anchor = anchor or ca.new_anchor(DOMAIN, lifetime=timedelta(days=30), now=when)
    issuer = ca.new_issuer(anchor, DOMAIN, lifetime=timedelta(days=10), now=when)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.sign_leaf(issuer, key.public_key(), identity, now=when)
    return Issued(TrustBundle((anchor.cert,)), (leaf, issuer.cert), key)


@pytest.fixture(scope="module")
def caller() -> Issued:
    return issue()


def signed(who: Issued, *, caller: str = str(CALLER), authority: str = TARGET,
           now: float = NOW, lifetime: int = LIFETIME, nonce: bytes | None = None
           ) -> CallerAssertion:
    return sign_assertion(who.key, who.chain, caller=caller, authority=authority, now=now,
                          lifetime=lifetime, nonce=nonce)


def test_a_signed_assertion_verifies(caller: Issued) -> None:
    asserted = verify_assertion(signed(caller, nonce=b"n" * 16), bundle=caller.bundle,
                                authority=TARGET, now=NOW + 1)
    assert asserted == Asserted(str(CALLER), TARGET, int(NOW) + LIFETIME, b"n" * 16)


def test_the_authority_is_compared_without_case_or_trailing_dot(caller: Issued) -> None:
    verify_assertion(signed(caller, authority="Web.default.svc.cluster.local."),
                     bundle=caller.bundle, authority=TARGET.upper() + ".", now=NOW)


@pytest.mark.parametrize(("now", "authority", "lifetime", "who", "why"), [
    (NOW + LIFETIME + 1, TARGET, LIFETIME, CALLER, "expired"),
    (NOW, "admin.default.svc.cluster.local", LIFETIME, CALLER, "is for admin"),
    (NOW, TARGET, 3600, CALLER, "over the 300s limit"),
    (NOW, TARGET, LIFETIME, Identity("default", "other", DOMAIN), "signed by"),
])
def test_refused(caller: Issued, now: float, authority: str, lifetime: int, who: Identity,
                 why: str) -> None:
    assertion = signed(caller, caller=str(who), authority=authority, lifetime=lifetime)
    with pytest.raises(BadAssertion, match=why) as info:
        verify_assertion(assertion, bundle=caller.bundle, authority=TARGET, now=now)
    assert info.value.asserted


def test_an_untrusted_chain_is_refused(caller: Issued) -> None:
    stranger = issue()  # the same name under another anchor
    with pytest.raises(BadAssertion, match="chain is not trusted") as info:
        verify_assertion(signed(stranger), bundle=caller.bundle, authority=TARGET, now=NOW)
    assert info.value.asserted == str(CALLER)


def test_a_tampered_claim_or_signature_is_refused(caller: Issued) -> None:
    good = signed(caller)
    claims = AssertionClaims.decode(good.claims)
    other = replace(claims, authority="admin.default.svc.cluster.local")
    with pytest.raises(BadAssertion, match="does not verify"):
        verify_assertion(replace(good, claims=other.encode()), bundle=caller.bundle,
                         authority=other.authority, now=NOW)
    flipped = bytearray(good.signature)
    flipped[-1] ^= 1
    with pytest.raises(BadAssertion, match="does not verify"):
        verify_assertion(replace(good, signature=bytes(flipped)), bundle=caller.bundle,
                         authority=TARGET, now=NOW)


def test_a_chain_of_another_key_is_refused(caller: Issued) -> None:
    # Someone else's key, with the caller's (public) chain attached.
    thief = issue(Identity("default", "thief", DOMAIN))
    forged = sign_assertion(thief.key, caller.chain, caller=str(CALLER), authority=TARGET,
                            now=NOW)
    with pytest.raises(BadAssertion, match="does not verify"):
        verify_assertion(forged, bundle=caller.bundle, authority=TARGET, now=NOW)


@pytest.mark.parametrize(("claims", "chain", "why"), [
    (None, (), "no certificate chain"),
    (None, (b"not der",), "not DER"),
    (b"\xff", None, "malformed"),
])
def test_malformed_assertions_are_refused(caller: Issued, claims: bytes | None,
                                          chain: tuple[bytes, ...] | None, why: str) -> None:
    good = signed(caller)
    bad = CallerAssertion(claims if claims is not None else good.claims, good.signature,
                          chain if chain is not None else good.chain)
    with pytest.raises(BadAssertion, match=why):
        verify_assertion(bad, bundle=caller.bundle, authority=TARGET, now=NOW)


# -- the replay cache and the verifier -------------------------------------------------------


def test_a_nonce_from_another_peer_is_a_replay() -> None:
    cache = ReplayCache()
    asserted = Asserted(str(CALLER), TARGET, int(NOW) + 60, b"a" * 16)
    cache.admit(asserted, peer="gateway", now=NOW)
    cache.admit(asserted, peer="gateway", now=NOW + 1)  # the caller's cached assertion again
    with pytest.raises(BadAssertion, match="replayed: gateway presented it first"):
        cache.admit(asserted, peer="sibling", now=NOW + 2)


def test_the_replay_cache_is_bounded_and_forgets_expired_nonces() -> None:
    cache = ReplayCache(capacity=2)
    for i in range(2):
        cache.admit(Asserted("c", TARGET, int(NOW) + 10, bytes([i])), peer="p", now=NOW)
    with pytest.raises(BadAssertion, match="replay cache is full"):
        cache.admit(Asserted("c", TARGET, int(NOW) + 10, b"x"), peer="p", now=NOW)
    cache.admit(Asserted("c", TARGET, int(NOW) + 30, b"y"), peer="p", now=NOW + 11)
    assert len(cache) == 1


def test_the_verifier_remembers_a_verified_assertion_but_rechecks_time_and_target(
        caller: Issued) -> None:
    clock = [NOW]
    bundle = caller.bundle
    verifier = AssertionVerifier(lambda: bundle, clock=lambda: clock[0], replay=ReplayCache())
    assertion = signed(caller)
    assert verifier.check(assertion, authority=TARGET, peer="gw").caller == str(CALLER)
    assert verifier.check(assertion, authority=TARGET, peer="gw").caller == str(CALLER)
    with pytest.raises(BadAssertion, match="is for web"):
        verifier.check(assertion, authority="admin.default.svc.cluster.local", peer="gw")
    with pytest.raises(BadAssertion, match="replayed"):
        verifier.check(assertion, authority=TARGET, peer="elsewhere")
    clock[0] = NOW + LIFETIME + 1
    with pytest.raises(BadAssertion, match="expired"):
        verifier.check(assertion, authority=TARGET, peer="gw")
    # Another bundle (an anchor rotated out): everything is verified again.
    clock[0] = NOW
    bundle = issue().bundle
    with pytest.raises(BadAssertion, match="not trusted"):
        verifier.check(assertion, authority=TARGET, peer="gw")


# -- the caller's side ------------------------------------------------------------------


class FakeWorkload:
    def __init__(self, issued: Issued) -> None:
        self.identity = CALLER
        self.certificates = issued.chain
        self.private_key = issued.key
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

    def client_context(self) -> ssl.SSLContext:
        return self.context


def test_credentials_sign_once_per_target_for_most_of_the_lifetime(caller: Issued) -> None:
    clock = [NOW]
    workload = FakeWorkload(caller)
    creds = ClientCredentials(workload, clock=lambda: clock[0])
    assert creds() is workload.context
    first = creds.assertion_for(TARGET)
    assert creds.assertion_for(TARGET + ".") is first
    other = creds.assertion_for("admin.default.svc.cluster.local")
    assert other is not first and creds.signatures == 2
    clock[0] = NOW + LIFETIME - REFRESH_BEFORE - 1
    assert creds.assertion_for(TARGET) is first
    clock[0] = NOW + LIFETIME - REFRESH_BEFORE + 1
    fresh = creds.assertion_for(TARGET)
    assert fresh is not first and creds.signatures == 3
    verify_assertion(fresh, bundle=caller.bundle, authority=TARGET, now=clock[0])
    # A renewed certificate: the next assertion is signed with the new key.
    renewed = issue()
    workload.certificates, workload.private_key = renewed.chain, renewed.key
    assert creds.assertion_for(TARGET) is not fresh and creds.signatures == 4


def test_the_header_carries_an_assertion_only_towards_a_gateway(caller: Issued) -> None:
    creds = ClientCredentials(FakeWorkload(caller), clock=lambda: NOW)
    service = convert({"name": "web-west.default.svc.cluster.local",
                       "address": "10.96.0.10:80", "endpoints": []}, ServiceSpec)
    direct = convert({"address": "10.0.0.7:4143", "targetPort": 8080,
                      "identity": str(CALLER)}, EndpointSpec)
    via = convert({"address": "192.0.2.1:4143", "targetPort": 80,
                   "identity": str(CALLER), "authorityOverride": TARGET}, EndpointSpec)
    plain = peer_header(creds, direct, service)
    assert (plain.name, plain.port, plain.assertion) == (service.name, 8080, None)
    header = peer_header(creds, via, service, SessionProtocol.HTTP1)
    assert (header.name, header.protocol) == (TARGET, SessionProtocol.HTTP1)
    assert header.assertion is not None
    assert verify_assertion(header.assertion, bundle=caller.bundle, authority=header.name,
                            now=NOW).caller == str(CALLER)
    # A bare context provider cannot sign: the header goes without.
    assert peer_header(FakeWorkload(caller).client_context, via, service).assertion is None
