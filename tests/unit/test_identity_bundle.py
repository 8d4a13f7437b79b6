"""Trust bundles: several anchors, rotation by adding and removing, and failure messages."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import ssl
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from mesh.identity import ca
from mesh.identity.bundle import TrustBundle, describe, fingerprint
from mesh.identity.ca import CertKey
from mesh.identity.errors import CertificateExpired, TrustSetupError, UntrustedChain
from mesh.identity.names import Identity

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
DOMAIN = "cluster.local"
WEB = Identity("default", "web", DOMAIN)
DB = Identity("prod", "db", DOMAIN)


@dataclasses.dataclass(frozen=True)
class Tree:
    anchor: CertKey
    issuer: CertKey
    leaf: x509.Certificate

    @property
    def chain(self) -> list[x509.Certificate]:
        return [self.leaf, self.issuer.cert]


def tree(identity: Identity = WEB, *, issuer_lifetime: timedelta = timedelta(days=365)
         ) -> Tree:
    anchor = ca.new_anchor(DOMAIN, lifetime=timedelta(days=3650), now=NOW)
    issuer = ca.new_issuer(anchor, DOMAIN, lifetime=issuer_lifetime, now=NOW)
    key = ec.generate_private_key(ec.SECP256R1())
    return Tree(anchor, issuer, ca.sign_leaf(issuer, key.public_key(), identity, now=NOW))


@pytest.fixture(scope="module")
def old() -> Tree:
    return tree(WEB)


@pytest.fixture(scope="module")
def new() -> Tree:
    return tree(DB)


@pytest.fixture(scope="module")
def both(old: Tree, new: Tree) -> TrustBundle:
    return TrustBundle((old.anchor.cert,)).with_anchor(new.anchor.cert)


def openssl_verify(tmp_path: Path, bundle: TrustBundle,
                   t: Tree) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("openssl")
    assert exe is not None, "the openssl CLI is missing; `make test` installs it"
    (tmp_path / "bundle.pem").write_bytes(bundle.to_pem())
    (tmp_path / "issuer.pem").write_bytes(ca.cert_pem(t.issuer.cert))
    (tmp_path / "leaf.pem").write_bytes(ca.cert_pem(t.leaf))
    return subprocess.run(
        [exe, "verify", "-x509_strict", "-purpose", "sslclient", "-attime",
         str(int(NOW.timestamp())), "-CAfile", str(tmp_path / "bundle.pem"),
         "-untrusted", str(tmp_path / "issuer.pem"), str(tmp_path / "leaf.pem")],
        capture_output=True, text=True, check=False, timeout=30)


# -- reading and writing ------------------------------------------------------------------

def test_pem_round_trip_keeps_order_and_drops_duplicates(old: Tree, new: Tree) -> None:
    pem = ca.cert_pem(old.anchor.cert) + ca.cert_pem(new.anchor.cert) + \
        ca.cert_pem(old.anchor.cert)
    bundle = TrustBundle.from_pem(pem)
    assert bundle.anchors == (old.anchor.cert, new.anchor.cert)
    assert TrustBundle.from_pem(bundle.to_pem()) == bundle


@pytest.mark.parametrize("pem, words", [
    (b"", "no readable PEM certificate"),
    (b"garbage", "no readable PEM certificate"),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "PEM"),
])
def test_from_pem_refuses_garbage(pem: bytes, words: str) -> None:
    with pytest.raises(TrustSetupError, match=words):
        TrustBundle.from_pem(pem)


def test_from_pem_refuses_non_ca_certificates(old: Tree) -> None:
    with pytest.raises(TrustSetupError, match="not a CA certificate"):
        TrustBundle.from_pem(ca.cert_pem(old.anchor.cert) + ca.cert_pem(old.leaf))


def test_bundle_is_immutable_and_never_empty(both: TrustBundle) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        both.anchors = ()  # type: ignore[misc]
    with pytest.raises(TrustSetupError, match="at least one anchor"):
        TrustBundle(())


def test_ssl_cadata_loads_every_anchor(both: TrustBundle) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=both.ssl_cadata())
    assert len(ctx.get_ca_certs()) == 2


def test_fingerprint_and_describe(old: Tree) -> None:
    der = old.anchor.cert.public_bytes(serialization.Encoding.DER)
    fp = hashlib.sha256(der).hexdigest()
    assert fingerprint(old.anchor.cert) == TrustBundle.fingerprint(old.anchor.cert) == fp
    assert describe(old.anchor.cert) == f"root.cluster.local (sha256 {fp[:8]}…)"
    assert TrustBundle.describe(old.anchor.cert) == describe(old.anchor.cert)


# -- adding and removing anchors ----------------------------------------------------------

def test_with_anchor_is_idempotent(old: Tree, both: TrustBundle) -> None:
    assert both.with_anchor(old.anchor.cert) is both
    assert both.contains(old.anchor.cert)
    with pytest.raises(TrustSetupError, match="not a CA"):
        both.with_anchor(old.leaf)


def test_without_anchor_by_certificate_or_fingerprint(old: Tree, new: Tree,
                                                      both: TrustBundle) -> None:
    by_cert = both.without_anchor(old.anchor.cert)
    fp = fingerprint(old.anchor.cert)
    by_prefix = both.without_anchor(fp[:8])
    colons = ":".join(fp[i:i + 2] for i in range(0, 16, 2)).upper()
    by_colons = both.without_anchor(colons)
    assert by_cert == by_prefix == by_colons == TrustBundle((new.anchor.cert,))
    assert both.anchors == (old.anchor.cert, new.anchor.cert)  # unchanged


def test_without_anchor_refuses_unknown_short_and_last(old: Tree, new: Tree,
                                                       both: TrustBundle) -> None:
    with pytest.raises(TrustSetupError, match="at least 8 hex digits"):
        both.without_anchor(fingerprint(old.anchor.cert)[:4])
    unknown = "0" * 64 if not fingerprint(old.anchor.cert).startswith("0") else "f" * 64
    with pytest.raises(TrustSetupError, match="no anchor in the trust bundle"):
        both.without_anchor(unknown)
    with pytest.raises(TrustSetupError, match="is not in the trust bundle"):
        TrustBundle((new.anchor.cert,)).without_anchor(old.anchor.cert)
    with pytest.raises(TrustSetupError, match="last anchor"):
        TrustBundle((new.anchor.cert,)).without_anchor(new.anchor.cert)


# -- verification -------------------------------------------------------------------------

def test_two_anchors_verify_leaves_under_either(old: Tree, new: Tree,
                                                both: TrustBundle) -> None:
    assert both.verify(old.chain, now=NOW) is both.anchors[0]
    assert both.verify(new.chain, now=NOW) is both.anchors[1]
    assert both.verify([*old.chain, old.anchor.cert], now=NOW) == old.anchor.cert


def test_openssl_agrees_with_a_two_anchor_bundle(tmp_path: Path, old: Tree, new: Tree,
                                                 both: TrustBundle) -> None:
    for t in (old, new):
        done = openssl_verify(tmp_path, both, t)
        assert done.returncode == 0, done.stdout + done.stderr
    done = openssl_verify(tmp_path, both.without_anchor(old.anchor.cert), old)
    assert done.returncode != 0


def test_removed_anchor_no_longer_verifies_and_is_named(old: Tree, new: Tree,
                                                        both: TrustBundle) -> None:
    after = both.without_anchor(old.anchor.cert)
    assert after.verify(new.chain, now=NOW) == new.anchor.cert
    with pytest.raises(UntrustedChain) as info:
        after.verify(old.chain, now=NOW)
    message = str(info.value)
    assert WEB.dns_name in message  # whose chain
    assert old.anchor.cert.subject.rfc4514_string() in message  # the anchor it needs
    key_id = old.anchor.cert.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value.digest.hex()
    assert f"authority key id {key_id}" in message
    assert describe(new.anchor.cert) in message  # what the bundle holds
    assert describe(old.anchor.cert) not in message


def test_a_leaf_sent_without_its_issuer_is_explained(old: Tree, both: TrustBundle) -> None:
    with pytest.raises(UntrustedChain, match="must send it along with its leaf") as info:
        both.verify([old.leaf], now=NOW)
    assert old.issuer.cert.subject.rfc4514_string() in str(info.value)


def test_an_empty_chain_is_untrusted(both: TrustBundle) -> None:
    with pytest.raises(UntrustedChain, match="presented no certificate"):
        both.verify([], now=NOW)


def test_a_trusted_anchor_with_a_bad_leaf_says_why(old: Tree, both: TrustBundle) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    server_only = (x509.CertificateBuilder()
                   .subject_name(x509.Name([])).issuer_name(old.issuer.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(NOW - timedelta(minutes=1))
                   .not_valid_after(NOW + timedelta(hours=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(WEB.dns_name)]),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       old.issuer.key.public_key()), critical=False)
                   .sign(old.issuer.key, hashes.SHA256()))
    with pytest.raises(UntrustedChain) as info:
        both.verify([server_only, old.issuer.cert], now=NOW)
    assert "which is in the trust bundle" in str(info.value)
    assert describe(old.anchor.cert) in str(info.value)


def test_naive_clock_is_refused(old: Tree, both: TrustBundle) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        both.verify(old.chain, now=NOW.replace(tzinfo=None))


# -- time ---------------------------------------------------------------------------------

def test_just_expired_leaf_names_clock_skew(old: Tree, both: TrustBundle) -> None:
    at = old.leaf.not_valid_after_utc + timedelta(minutes=3)
    with pytest.raises(CertificateExpired) as info:
        both.verify(old.chain, now=at)
    message = str(info.value)
    assert "leaf certificate" in message and WEB.dns_name in message
    assert "expired at 2030-06-02T12:00:00Z" in message
    assert "valid from 2030-06-01T11:59:40Z to 2030-06-02T12:00:00Z" in message
    assert "check the clocks of both hosts (clock skew)" in message


def test_long_expired_leaf_asks_for_renewal(old: Tree, both: TrustBundle) -> None:
    with pytest.raises(CertificateExpired) as info:
        both.verify(old.chain, now=NOW + timedelta(days=3))
    assert "renew" in str(info.value)
    assert "clock skew" not in str(info.value)


def test_not_yet_valid_leaf_names_clock_skew(old: Tree, both: TrustBundle) -> None:
    with pytest.raises(CertificateExpired) as info:
        both.verify(old.chain, now=NOW - timedelta(hours=2))
    message = str(info.value)
    assert "is not valid until 2030-06-01T11:59:40Z" in message
    assert "clock skew" in message


def test_backdating_absorbs_small_skew(old: Tree, both: TrustBundle) -> None:
    assert both.verify(old.chain, now=NOW - timedelta(seconds=19)) == old.anchor.cert


def test_expired_issuer_is_named(both: TrustBundle) -> None:
    short = tree(issuer_lifetime=timedelta(hours=2))
    bundle = both.with_anchor(short.anchor.cert)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.sign_leaf(short.issuer, key.public_key(), WEB, now=NOW + timedelta(hours=1))
    with pytest.raises(CertificateExpired) as info:
        bundle.verify([leaf, short.issuer.cert], now=NOW + timedelta(hours=5))
    message = str(info.value)
    assert f"issuer certificate {describe(short.issuer.cert)} expired at" in message
    assert "rotate" in message


def test_expired_chain_under_a_foreign_anchor_is_untrusted(old: Tree, new: Tree) -> None:
    only_new = TrustBundle((new.anchor.cert,))
    with pytest.raises(UntrustedChain):
        only_new.verify(old.chain, now=NOW + timedelta(days=3))


def test_expired_anchor_is_named() -> None:
    anchor = ca.new_anchor(DOMAIN, lifetime=timedelta(days=10), now=NOW)
    issuer = ca.new_issuer(anchor, DOMAIN, lifetime=timedelta(days=365), now=NOW)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.sign_leaf(issuer, key.public_key(), WEB, now=NOW + timedelta(days=9, hours=23))
    with pytest.raises(CertificateExpired) as info:
        TrustBundle((anchor.cert,)).verify([leaf, issuer.cert], now=NOW + timedelta(days=11))
    assert f"trust anchor {describe(anchor.cert)} expired at" in str(info.value)
