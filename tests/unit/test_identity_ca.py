"""The certificate authority: anchors, issuers, leaves, CSR checks and the issuer directory.

Chains are checked with the real ``openssl verify`` and with the strict verifier of
``cryptography.x509.verification``; every CSR refusal code has a hand-made CSR.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import DNSName, PolicyBuilder, Store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.errors import IdentityError
from mesh.identity import ca
from mesh.identity.bundle import TrustBundle
from mesh.identity.ca import CertKey, CsrRefused, IssuerDir, UnsupportedKey
from mesh.identity.errors import TrustSetupError
from mesh.identity.names import Identity, InvalidName

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
DOMAIN = "cluster.local"
WEB = Identity("default", "web", DOMAIN)


@pytest.fixture(scope="module")
def anchor() -> CertKey:
    return ca.new_anchor(DOMAIN, lifetime=timedelta(days=3650), now=NOW)


@pytest.fixture(scope="module")
def issuer(anchor: CertKey) -> CertKey:
    return ca.new_issuer(anchor, DOMAIN, lifetime=timedelta(days=365), now=NOW)


@pytest.fixture(scope="module")
def workload_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def leaf(issuer: CertKey, workload_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return ca.sign_leaf(issuer, workload_key.public_key(), WEB, now=NOW)


def ext(cert: x509.Certificate,
        kind: type[x509.ExtensionType]) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(kind)


def ski(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def aki(cert: x509.Certificate) -> bytes | None:
    return cert.extensions.get_extension_for_class(
        x509.AuthorityKeyIdentifier).value.key_identifier


def openssl_verify(tmp_path: Path, anchors: list[x509.Certificate],
                   intermediates: list[x509.Certificate], leaf: x509.Certificate, *,
                   at: datetime, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("openssl")
    assert exe is not None, "the openssl CLI is missing; `make test` installs it"
    files = {"bundle.pem": anchors, "issuer.pem": intermediates, "leaf.pem": [leaf]}
    for name, certs in files.items():
        (tmp_path / name).write_bytes(b"".join(map(ca.cert_pem, certs)))
    return subprocess.run(
        [exe, "verify", "-x509_strict", "-attime", str(int(at.timestamp())), *extra,
         "-CAfile", str(tmp_path / "bundle.pem"), "-untrusted", str(tmp_path / "issuer.pem"),
         str(tmp_path / "leaf.pem")],
        capture_output=True, text=True, check=False, timeout=30)


# -- chains verify ------------------------------------------------------------------------

@pytest.mark.parametrize("purpose", [("-purpose", "sslclient"),
                                     ("-purpose", "sslserver", "-verify_hostname",
                                      WEB.dns_name)])
def test_openssl_verifies_the_chain(tmp_path: Path, anchor: CertKey, issuer: CertKey,
                                    leaf: x509.Certificate, purpose: tuple[str, ...]) -> None:
    done = openssl_verify(tmp_path, [anchor.cert], [issuer.cert], leaf, at=NOW, extra=purpose)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("OK")


def test_openssl_refuses_the_chain_under_another_anchor(tmp_path: Path, issuer: CertKey,
                                                        leaf: x509.Certificate) -> None:
    other = ca.new_anchor(DOMAIN, lifetime=timedelta(days=3650), now=NOW)
    done = openssl_verify(tmp_path, [other.cert], [issuer.cert], leaf, at=NOW)
    assert done.returncode != 0


def test_strict_verifiers_accept_the_chain(anchor: CertKey, issuer: CertKey,
                                           leaf: x509.Certificate) -> None:
    builder = PolicyBuilder().store(Store([anchor.cert])).time(NOW)
    client = builder.build_client_verifier().verify(leaf, [issuer.cert])
    assert client.chain == [leaf, issuer.cert, anchor.cert]
    assert client.subjects is not None
    assert x509.DNSName(WEB.dns_name) in client.subjects
    server = builder.build_server_verifier(DNSName(WEB.dns_name)).verify(leaf, [issuer.cert])
    assert server[-1] == anchor.cert


def test_long_names_fit_because_the_leaf_subject_is_empty(issuer: CertKey) -> None:
    long = Identity("n" * 63, "s" * 63, DOMAIN)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.sign_leaf(issuer, key.public_key(), long, now=NOW)
    assert Identity.from_certificate(cert) == long


# -- extensions ---------------------------------------------------------------------------

def test_anchor_is_a_backdated_self_signed_p256_root(anchor: CertKey) -> None:
    cert = anchor.cert
    assert cert.subject == cert.issuer
    cert.verify_directly_issued_by(cert)
    assert isinstance(anchor.key.curve, ec.SECP256R1)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        "root.cluster.local"
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value == x509.BasicConstraints(ca=True, path_length=1)
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical
    assert isinstance(ku.value, x509.KeyUsage)
    assert ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    assert ski(cert) == x509.SubjectKeyIdentifier.from_public_key(anchor.key.public_key()).digest
    assert cert.not_valid_before_utc == NOW - timedelta(seconds=20)
    assert cert.not_valid_after_utc == NOW + timedelta(days=3650)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)


def test_two_anchors_for_one_domain_are_told_apart(anchor: CertKey) -> None:
    other = ca.new_anchor(DOMAIN, lifetime=timedelta(days=3650), now=NOW)
    assert other.cert.subject != anchor.cert.subject
    assert TrustBundle.describe(other.cert) != TrustBundle.describe(anchor.cert)


def test_issuer_is_a_path_length_zero_ca_under_the_anchor(anchor: CertKey,
                                                          issuer: CertKey) -> None:
    cert = issuer.cert
    cert.verify_directly_issued_by(anchor.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        "identity.meshgate.cluster.local"
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value == x509.BasicConstraints(ca=True, path_length=0)
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and isinstance(ku.value, x509.KeyUsage)
    assert ku.value.key_cert_sign and ku.value.crl_sign
    assert aki(cert) == ski(anchor.cert)
    assert ski(cert) == x509.SubjectKeyIdentifier.from_public_key(issuer.key.public_key()).digest
    assert cert.not_valid_before_utc == NOW - timedelta(seconds=20)
    assert cert.not_valid_after_utc == NOW + timedelta(days=365)


def test_issuer_never_outlives_its_anchor(anchor: CertKey) -> None:
    long = ca.new_issuer(anchor, DOMAIN, lifetime=timedelta(days=99999), now=NOW)
    assert long.cert.not_valid_after_utc == anchor.cert.not_valid_after_utc


def test_issuer_reuses_a_given_key_and_control_namespace(anchor: CertKey) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    again = ca.new_issuer(anchor, DOMAIN, lifetime=timedelta(days=1), now=NOW, key=key,
                          control_ns="linkerd")
    assert again.key is key
    assert again.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        "identity.linkerd.cluster.local"
    with pytest.raises(UnsupportedKey):
        ca.new_issuer(anchor, DOMAIN, lifetime=timedelta(days=1), now=NOW,
                      key=ec.generate_private_key(ec.SECP384R1()))


def test_ca_names_longer_than_a_common_name_are_refused() -> None:
    with pytest.raises(InvalidName, match="64 characters"):
        ca.new_anchor("a" * 60 + ".local", lifetime=timedelta(days=1), now=NOW)


def test_leaf_extensions(issuer: CertKey, workload_key: ec.EllipticCurvePrivateKey,
                         leaf: x509.Certificate) -> None:
    assert len(leaf.subject) == 0
    assert leaf.issuer == issuer.cert.subject
    san = ext(leaf, x509.SubjectAlternativeName)
    assert san.critical  # required by RFC 5280 when the subject is empty
    assert isinstance(san.value, x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == [WEB.dns_name]
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/default/sa/web"]
    bc = ext(leaf, x509.BasicConstraints)
    assert bc.critical and bc.value == x509.BasicConstraints(ca=False, path_length=None)
    ku = ext(leaf, x509.KeyUsage)
    assert ku.critical and isinstance(ku.value, x509.KeyUsage)
    assert ku.value.digital_signature and not ku.value.key_cert_sign
    assert not ku.value.key_encipherment
    eku = ext(leaf, x509.ExtendedKeyUsage)
    assert not eku.critical
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH,  # type: ignore[call-overload]
                               ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ski(leaf) == x509.SubjectKeyIdentifier.from_public_key(
        workload_key.public_key()).digest
    assert aki(leaf) == ski(issuer.cert)
    assert leaf.not_valid_before_utc == NOW - timedelta(seconds=20)
    assert leaf.not_valid_after_utc == NOW + timedelta(hours=24)
    assert leaf.public_key() == workload_key.public_key()


def test_leaf_lifetime_and_backdate_are_clamped_to_the_issuer(
        anchor: CertKey, workload_key: ec.EllipticCurvePrivateKey) -> None:
    short = ca.new_issuer(anchor, DOMAIN, lifetime=timedelta(hours=2), now=NOW)
    cert = ca.sign_leaf(short, workload_key.public_key(), WEB, now=NOW,
                        lifetime=timedelta(hours=24), backdate=timedelta(hours=1))
    assert cert.not_valid_after_utc == short.cert.not_valid_after_utc
    assert cert.not_valid_before_utc == short.cert.not_valid_before_utc
    later = ca.sign_leaf(short, workload_key.public_key(), WEB, now=NOW + timedelta(hours=1),
                         lifetime=timedelta(minutes=10), backdate=timedelta(seconds=5))
    assert later.not_valid_before_utc == NOW + timedelta(hours=1) - timedelta(seconds=5)
    assert later.not_valid_after_utc == NOW + timedelta(hours=1, minutes=10)


def test_an_expired_issuer_signs_nothing(anchor: CertKey,
                                         workload_key: ec.EllipticCurvePrivateKey) -> None:
    short = ca.new_issuer(anchor, DOMAIN, lifetime=timedelta(hours=1), now=NOW)
    with pytest.raises(TrustSetupError, match="expired at 2030-06-01T13:00:00Z"):
        ca.sign_leaf(short, workload_key.public_key(), WEB, now=NOW + timedelta(hours=2))


@pytest.mark.parametrize("make_key", [lambda: ec.generate_private_key(ec.SECP384R1()),
                                      lambda: rsa.generate_private_key(65537, 2048)])
def test_leaves_need_p256_keys(issuer: CertKey, make_key: object) -> None:
    key = make_key()  # type: ignore[operator]
    with pytest.raises(UnsupportedKey, match="P-256") as info:
        ca.sign_leaf(issuer, key.public_key(), WEB, now=NOW)
    assert isinstance(info.value, ValueError) and isinstance(info.value, IdentityError)


def test_naive_clock_is_refused(issuer: CertKey,
                                workload_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        ca.sign_leaf(issuer, workload_key.public_key(), WEB, now=NOW.replace(tzinfo=None))


# -- CSRs ---------------------------------------------------------------------------------

def pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def build_csr(names: list[x509.GeneralName], *, key: object = None,
              subject: x509.Name | None = None,
              extensions: tuple[x509.ExtensionType, ...] = ()) -> bytes:
    signer = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=True)
    return pem(builder.sign(signer, hashes.SHA256()))  # type: ignore[arg-type]


DNS = x509.DNSName(WEB.dns_name)
URI = x509.UniformResourceIdentifier(WEB.spiffe_uri)


def test_make_csr_round_trips(workload_key: ec.EllipticCurvePrivateKey) -> None:
    csr = ca.make_csr(workload_key, WEB)
    assert csr.is_signature_valid
    identity, public = ca.csr_identity(pem(csr))
    assert identity == WEB
    assert public == workload_key.public_key()


@pytest.mark.parametrize("names, subject", [
    ([DNS], None),
    ([URI, DNS], None),
    ([DNS], x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, WEB.dns_name)])),
])
def test_csr_accepted_forms(names: list[x509.GeneralName], subject: x509.Name | None) -> None:
    identity, _ = ca.csr_identity(build_csr(names, subject=subject))
    assert identity == WEB


def corrupt_signature(csr_pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the ECDSA signature's s
    body = base64.encodebytes(bytes(der))
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + \
        b"-----END CERTIFICATE REQUEST-----\n"


def bad_version() -> bytes:
    der = x509.load_pem_x509_csr(build_csr([DNS])).public_bytes(serialization.Encoding.DER)
    der = der.replace(b"\x02\x01\x00", b"\x02\x01\x4b", 1)  # version 75
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(der) + \
        b"-----END CERTIFICATE REQUEST-----\n"


def big_csr() -> bytes:
    names: list[x509.GeneralName] = [DNS]
    names += [x509.DNSName(f"host{i}.example.com") for i in range(400)]
    return build_csr(names)


REFUSALS = {
    "extra dns name": (lambda: build_csr([DNS, x509.DNSName("web.example.com")]),
                       "extra-names", "web.example.com"),
    "two identity names": (lambda: build_csr([DNS, x509.DNSName(
        Identity("default", "db", DOMAIN).dns_name)]), "extra-names", "db.default"),
    "ip san": (lambda: build_csr([DNS, x509.IPAddress(__import__("ipaddress").ip_address(
        "10.0.0.1"))]), "extra-names", "IP:10.0.0.1"),
    "email san": (lambda: build_csr([DNS, x509.RFC822Name("a@example.com")]),
                  "extra-names", "email:a@example.com"),
    "foreign uri": (lambda: build_csr([DNS, x509.UniformResourceIdentifier(
        "https://evil.example.com/")]), "extra-names", "https://evil.example.com/"),
    "two uris": (lambda: build_csr([DNS, URI, x509.UniformResourceIdentifier(
        "spiffe://cluster.local/ns/default/sa/db")]), "extra-names", "sa/db"),
    "mismatched uri": (lambda: build_csr([DNS, x509.UniformResourceIdentifier(
        "spiffe://cluster.local/ns/kube-system/sa/admin")]), "mismatched-uri",
        "spiffe://cluster.local/ns/kube-system/sa/admin"),
    "uri only": (lambda: build_csr([URI]), "no-identity", WEB.spiffe_uri),
    "no san": (lambda: build_csr([]), "no-identity", "subjectAltName"),
    "plain dns name": (lambda: build_csr([x509.DNSName("web.example.com")]), "no-identity",
                       "web.example.com"),
    "foreign subject": (lambda: build_csr([DNS], subject=x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "admin")])), "extra-names", "CN=admin"),
    "subject with o": (lambda: build_csr([DNS], subject=x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
         x509.NameAttribute(NameOID.COMMON_NAME, WEB.dns_name)])), "extra-names",
        "system:masters"),
    "rsa key": (lambda: build_csr([DNS], key=rsa.generate_private_key(65537, 2048)),
                "unsupported-key", "RSA"),
    "p384 key": (lambda: build_csr([DNS], key=ec.generate_private_key(ec.SECP384R1())),
                 "unsupported-key", "secp384r1"),
    "bad signature": (lambda: corrupt_signature(build_csr([DNS])), "bad-signature",
                      "signature"),
    "garbage": (lambda: b"hello, identity service", "malformed", "CERTIFICATE REQUEST"),
    "certificate instead": (lambda: b"-----BEGIN CERTIFICATE-----\nAAAA\n"
                            b"-----END CERTIFICATE-----\n", "malformed", "PEM"),
    "bad version": (bad_version, "malformed", "version"),
    "oversize": (big_csr, "too-large", "at most 8192"),
    "ca request": (lambda: build_csr([DNS], extensions=(
        x509.BasicConstraints(ca=True, path_length=None),)), "extra-extensions",
        "BasicConstraints"),
    "unknown extension": (lambda: build_csr([DNS], extensions=(x509.UnrecognizedExtension(
        x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"),)), "extra-extensions",
        "1.3.6.1.4.1.99999.1"),
    "challenge password": (lambda: pem(
        x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([DNS]), critical=False)
        .add_attribute(x509.ObjectIdentifier("1.2.840.113549.1.9.7"), b"secret")
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())),
        "extra-extensions", "1.2.840.113549.1.9.7"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_csr_refusals(case: str) -> None:
    make, reason, named = REFUSALS[case]
    with pytest.raises(CsrRefused) as info:
        ca.csr_identity(make())
    assert info.value.reason == reason
    assert named in str(info.value)
    assert isinstance(info.value, IdentityError)


def test_every_refusal_code_is_exercised() -> None:
    assert {reason for _, reason, _ in REFUSALS.values()} == set(
        ca.CsrRefusal.__args__)  # type: ignore[attr-defined]


def test_csr_size_limit_is_a_parameter() -> None:
    small = build_csr([DNS])
    with pytest.raises(CsrRefused) as info:
        ca.csr_identity(small, max_bytes=len(small) - 1)
    assert info.value.reason == "too-large"
    assert ca.csr_identity(small, max_bytes=len(small))[0] == WEB


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_csr_identity_only_refuses_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(CsrRefused):
        ca.csr_identity(data)


GOOD_CSR_DER = x509.load_pem_x509_csr(build_csr([DNS, URI])).public_bytes(
    serialization.Encoding.DER)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(GOOD_CSR_DER) - 1), st.integers(0, 255)),
                min_size=1, max_size=4))
def test_csr_identity_only_refuses_damaged_csrs(edits: list[tuple[int, int]]) -> None:
    der = bytearray(GOOD_CSR_DER)
    for at, value in edits:
        der[at] = value
    data = (b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(der))
            + b"-----END CERTIFICATE REQUEST-----\n")
    try:
        identity, _ = ca.csr_identity(data)
    except CsrRefused:
        return
    assert identity == WEB  # an edit that still passes every check names no one else


# -- PEM helpers --------------------------------------------------------------------------

def test_pem_round_trips(anchor: CertKey, issuer: CertKey) -> None:
    assert ca.load_certs(ca.cert_pem(anchor.cert) + ca.cert_pem(issuer.cert)) == [
        anchor.cert, issuer.cert]
    again = ca.load_key(ca.key_pem(issuer.key))
    assert again.private_numbers() == issuer.key.private_numbers()


@pytest.mark.parametrize("data", [b"", b"garbage", b"-----BEGIN CERTIFICATE-----\nxx\n"
                                  b"-----END CERTIFICATE-----\n"])
def test_load_certs_refuses_garbage(data: bytes) -> None:
    with pytest.raises(TrustSetupError, match="BEGIN CERTIFICATE"):
        ca.load_certs(data)


def test_load_key_refuses_garbage_other_keys_and_encryption() -> None:
    with pytest.raises(TrustSetupError, match="no readable PEM private key"):
        ca.load_key(b"garbage")
    rsa_pem = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    with pytest.raises(TrustSetupError, match="RSA"):
        ca.load_key(rsa_pem)
    locked = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"))
    with pytest.raises(TrustSetupError, match="encrypted"):
        ca.load_key(locked)


# -- the issuer directory -----------------------------------------------------------------

def init_dir(path: Path, *, force: bool = False) -> tuple[CertKey, CertKey]:
    return IssuerDir(path).init(DOMAIN, anchor_lifetime=timedelta(days=3650),
                                issuer_lifetime=timedelta(days=365), now=NOW, force=force)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_the_layout_with_private_keys(tmp_path: Path) -> None:
    out = tmp_path / "issuer"
    anchor, issuer = init_dir(out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["anchor.crt", "anchor.key", "issuer.crt", "issuer.key",
                     "trust-bundle.pem"]
    assert mode(out / "anchor.key") == 0o600
    assert mode(out / "issuer.key") == 0o600
    assert mode(out / "issuer.crt") == 0o644
    assert mode(out / "trust-bundle.pem") == 0o644
    assert mode(out) == 0o700
    d = IssuerDir(out)
    loaded = d.load_issuer()
    assert loaded.cert == issuer.cert
    assert loaded.key.private_numbers() == issuer.key.private_numbers()
    assert d.load_anchor().cert == anchor.cert
    assert d.load_anchor_cert() == anchor.cert
    assert d.load_bundle().anchors == (anchor.cert,)
    assert d.issuer_chain_pem() == ca.cert_pem(issuer.cert)


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    first, _ = init_dir(tmp_path)
    with pytest.raises(TrustSetupError) as info:
        init_dir(tmp_path)
    assert "anchor.key" in str(info.value) and "--force" in str(info.value)
    assert IssuerDir(tmp_path).load_anchor().cert == first.cert
    second, _ = init_dir(tmp_path, force=True)
    assert IssuerDir(tmp_path).load_anchor().cert == second.cert
    assert mode(tmp_path / "anchor.key") == 0o600
    assert not list(tmp_path.glob(".*.tmp"))


def test_init_refuses_when_any_one_file_exists(tmp_path: Path) -> None:
    (tmp_path / "trust-bundle.pem").write_bytes(b"")
    with pytest.raises(TrustSetupError, match=r"trust-bundle\.pem"):
        init_dir(tmp_path)


def test_load_issuer_detects_a_key_that_is_not_the_certificates(tmp_path: Path) -> None:
    init_dir(tmp_path)
    other = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "issuer.key").write_bytes(ca.key_pem(other))
    with pytest.raises(TrustSetupError, match=r"issuer\.key does not belong to .*issuer\.crt"):
        IssuerDir(tmp_path).load_issuer()


def test_load_issuer_detects_an_issuer_under_no_trusted_anchor(tmp_path: Path) -> None:
    init_dir(tmp_path)
    foreign_anchor = ca.new_anchor(DOMAIN, lifetime=timedelta(days=3650), now=NOW)
    foreign = ca.new_issuer(foreign_anchor, DOMAIN, lifetime=timedelta(days=30), now=NOW)
    d = IssuerDir(tmp_path)
    d.save_issuer(foreign)
    with pytest.raises(TrustSetupError) as info:
        d.load_issuer()
    message = str(info.value)
    assert "issuer.crt" in message and "does not chain to any anchor" in message
    assert TrustBundle.describe(d.load_anchor_cert()) in message
    d.save_bundle(d.load_bundle().with_anchor(foreign_anchor.cert))
    assert d.load_issuer().cert == foreign.cert


def test_missing_and_damaged_files_are_named(tmp_path: Path) -> None:
    d = IssuerDir(tmp_path)
    with pytest.raises(TrustSetupError, match=r"issuer\.crt is missing.*identity init"):
        d.load_issuer()
    init_dir(tmp_path)
    (tmp_path / "trust-bundle.pem").write_bytes(b"not pem")
    with pytest.raises(TrustSetupError, match=r"trust-bundle\.pem"):
        d.load_bundle()
    (tmp_path / "issuer.key").write_bytes(b"not a key")
    with pytest.raises(TrustSetupError, match=r"issuer\.key"):
        d.load_issuer()


def test_pending_anchor_is_promoted(tmp_path: Path) -> None:
    init_dir(tmp_path)
    d = IssuerDir(tmp_path)
    nxt = ca.new_anchor(DOMAIN, lifetime=timedelta(days=3650), now=NOW)
    d.save_pending_anchor(nxt)
    assert mode(tmp_path / "anchor-next.key") == 0o600
    assert d.load_pending_anchor().cert == nxt.cert
    d.promote_pending_anchor()
    assert d.load_anchor().cert == nxt.cert
    assert not (tmp_path / "anchor-next.crt").exists()
    with pytest.raises(TrustSetupError, match=r"anchor-next\.crt is missing"):
        d.promote_pending_anchor()


def test_write_private_is_0600_and_atomic(tmp_path: Path) -> None:
    target = tmp_path / "tls.key"
    target.write_bytes(b"old")
    target.chmod(0o644)
    ca.write_private(target, b"new")
    assert target.read_bytes() == b"new"
    assert mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["tls.key"]
