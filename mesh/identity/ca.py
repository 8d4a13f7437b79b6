"""The certificate authority: trust anchors, issuers and workload leaf certificates.

Everything here is a pure function over ``cryptography`` objects with the clock
passed in, except `IssuerDir`, which owns the on-disk layout written by
``meshgate identity init --out DIR``. `csr_identity` is the gate the identity
service puts in front of `sign_leaf`: it accepts a CSR only when it asks for one
identity and nothing else.

Leaves have an empty subject and a critical subjectAltName (RFC 5280 4.2.1.6):
identity DNS names are often longer than the 64 characters a common name may
hold, and strict verifiers read only the SAN anyway.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.errors import IdentityError
from mesh.files import fsync_dir, write_atomic
from mesh.identity.bundle import TrustBundle, describe, is_ca, rfc3339
from mesh.identity.errors import TrustSetupError
from mesh.identity.names import DEFAULT_CONTROL_NS, Identity, InvalidName, check_trust_domain

BACKDATE = timedelta(seconds=20)
LEAF_LIFETIME = timedelta(hours=24)
MAX_CSR_BYTES = 8192
_EXTENSION_REQUEST = x509.ObjectIdentifier("1.2.840.113549.1.9.14")  # PKCS #9

CsrRefusal = Literal["malformed", "too-large", "bad-signature", "unsupported-key",
                     "extra-names", "no-identity", "mismatched-uri", "extra-extensions"]


class UnsupportedKey(IdentityError, ValueError):
    """A key is not ECDSA P-256, the only kind meshgate signs or issues with."""


class CsrRefused(IdentityError):
    """A certificate signing request was refused; ``reason`` is a short code."""

    def __init__(self, message: str, *, reason: CsrRefusal) -> None:
        super().__init__(message)
        self.reason: CsrRefusal = reason


@dataclass(frozen=True)
class CertKey:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


# -- keys ---------------------------------------------------------------------------------

def _key_kind(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"ECDSA {key.curve.name}"
    return type(key).__name__.removeprefix("_").replace("PublicKey", "").replace(
        "PrivateKey", "") or "unknown"


def _is_p256(key: object) -> bool:
    return (isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey)
            and isinstance(key.curve, ec.SECP256R1))


def _p256_public(key: object, what: str) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey) or not _is_p256(key):
        raise UnsupportedKey(f"{what} is {_key_kind(key)}; meshgate only uses ECDSA P-256 "
                             "(secp256r1) keys")
    return key


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


# -- certificates -------------------------------------------------------------------------

def _aware(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return now


def _common_name(cn: str, trust_domain: str) -> x509.NameAttribute:
    if len(cn) > 64:
        raise InvalidName(f"trust domain {trust_domain!r} is too long: the CA name {cn!r} "
                          "exceeds the 64 characters a certificate common name may hold")
    return x509.NameAttribute(NameOID.COMMON_NAME, cn)


def _ca_name(cn: str, trust_domain: str, public_key: ec.EllipticCurvePublicKey) -> x509.Name:
    # The key id in O tells two generations of the same CA apart, in messages and
    # for path building when a bundle holds both.
    key_id = x509.SubjectKeyIdentifier.from_public_key(public_key).digest.hex()[:8]
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"meshgate {key_id}"),
                      _common_name(cn, trust_domain)])


def _ca_certificate(subject: x509.Name, key: ec.EllipticCurvePrivateKey,
                    signer: CertKey | None, *, path_length: int, not_before: datetime,
                    not_after: datetime) -> x509.Certificate:
    public = key.public_key()
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(signer.cert.subject if signer else subject)
               .public_key(public)
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before)
               .not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=True, path_length=path_length),
                              critical=True)
               .add_extension(_key_usage(key_cert_sign=True), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public),
                              critical=False))
    if signer is not None:
        builder = builder.add_extension(_authority_key_id(signer.cert), critical=False)
    return builder.sign(signer.key if signer else key, hashes.SHA256())


def _key_usage(*, key_cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not key_cert_sign, content_commitment=False,
                         key_encipherment=False, data_encipherment=False,
                         key_agreement=False, key_cert_sign=key_cert_sign,
                         crl_sign=key_cert_sign, encipher_only=False, decipher_only=False)


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            _p256_public(issuer.public_key(), f"the key of {describe(issuer)}"))
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _window(signer: x509.Certificate, *, now: datetime, lifetime: timedelta,
            backdate: timedelta) -> tuple[datetime, datetime]:
    """notBefore/notAfter for a certificate signed now, clamped inside the signer's."""
    if lifetime <= timedelta(0):
        raise ValueError(f"lifetime must be positive, not {lifetime}")
    start = max(now - backdate, signer.not_valid_before_utc)
    end = min(now + lifetime, signer.not_valid_after_utc)
    if end <= now:
        raise TrustSetupError(f"{describe(signer)} expired at "
                              f"{rfc3339(signer.not_valid_after_utc)} and can sign nothing "
                              "more; rotate it (meshgate identity rotate)")
    return start, end


def anchor_trust_domain(cert: x509.Certificate) -> str:
    """The trust domain a trust anchor made by `new_anchor` names (its CN is
    ``root.<trust-domain>``); "" for a certificate that names none."""
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(cn[0].value) if cn else ""
    return name.removeprefix("root.") if name.startswith("root.") else ""


def new_anchor(trust_domain: str, *, lifetime: timedelta, now: datetime) -> CertKey:
    """A self-signed ECDSA P-256 trust anchor ``root.<trust-domain>``."""
    check_trust_domain(trust_domain)
    if lifetime <= timedelta(0):
        raise ValueError(f"lifetime must be positive, not {lifetime}")
    now = _aware(now)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _ca_name(f"root.{trust_domain}", trust_domain, key.public_key())
    cert = _ca_certificate(subject, key, None, path_length=1, not_before=now - BACKDATE,
                           not_after=now + lifetime)
    return CertKey(cert, key)


def new_issuer(anchor: CertKey, trust_domain: str, *, lifetime: timedelta, now: datetime,
               key: ec.EllipticCurvePrivateKey | None = None,
               control_ns: str = DEFAULT_CONTROL_NS) -> CertKey:
    """An intermediate CA ``identity.<control-ns>.<trust-domain>`` signed by ``anchor``.

    Its validity never extends past the anchor's. ``key`` reuses an existing key.
    """
    check_trust_domain(trust_domain)
    now = _aware(now)
    if key is None:
        key = ec.generate_private_key(ec.SECP256R1())
    public = _p256_public(key.public_key(), "the issuer key")
    start, end = _window(anchor.cert, now=now, lifetime=lifetime, backdate=BACKDATE)
    subject = _ca_name(f"identity.{control_ns}.{trust_domain}", trust_domain, public)
    cert = _ca_certificate(subject, key, anchor, path_length=0, not_before=start,
                           not_after=end)
    return CertKey(cert, key)


def sign_leaf(issuer: CertKey, public_key: ec.EllipticCurvePublicKey, identity: Identity, *,
              now: datetime, lifetime: timedelta = LEAF_LIFETIME,
              backdate: timedelta = BACKDATE) -> x509.Certificate:
    """A workload certificate for ``identity`` and ``public_key``, signed by ``issuer``.

    Backdated by ``backdate`` for clock skew; never valid past the issuer.
    """
    public = _p256_public(public_key, "the workload key")
    start, end = _window(issuer.cert, now=_aware(now), lifetime=lifetime, backdate=backdate)
    san = x509.SubjectAlternativeName([x509.DNSName(identity.dns_name),
                                       x509.UniformResourceIdentifier(identity.spiffe_uri)])
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                 ExtendedKeyUsageOID.CLIENT_AUTH])
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(issuer.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(san, critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(key_cert_sign=False), critical=True)
            .add_extension(eku, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(_authority_key_id(issuer.cert), critical=False)
            .sign(issuer.key, hashes.SHA256()))


# -- certificate signing requests ---------------------------------------------------------

def make_csr(key: ec.EllipticCurvePrivateKey, identity: Identity
             ) -> x509.CertificateSigningRequest:
    """A CSR for ``identity``: empty subject, SAN with its DNS name and SPIFFE URI."""
    _p256_public(key.public_key(), "the workload key")
    san = x509.SubjectAlternativeName([x509.DNSName(identity.dns_name),
                                       x509.UniformResourceIdentifier(identity.spiffe_uri)])
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(san, critical=True)
            .sign(key, hashes.SHA256()))


def _refuse(reason: CsrRefusal, message: str) -> CsrRefused:
    return CsrRefused(f"certificate request refused ({reason}): {message}", reason=reason)


def _general_name(name: x509.GeneralName) -> str:
    kinds = {x509.DNSName: "DNS", x509.IPAddress: "IP", x509.RFC822Name: "email",
             x509.UniformResourceIdentifier: "URI", x509.DirectoryName: "dirName",
             x509.RegisteredID: "RID", x509.OtherName: "otherName"}
    value = name.value
    if isinstance(value, x509.Name):
        value = value.rfc4514_string()
    return f"{kinds.get(type(name), type(name).__name__)}:{value}"


def csr_identity(csr_pem: bytes, *, max_bytes: int = MAX_CSR_BYTES
                 ) -> tuple[Identity, ec.EllipticCurvePublicKey]:
    """Check a PEM CSR for the identity service; return the identity and key it asks for.

    Accepted: a valid signature by a P-256 key, a subject that is empty or only
    ``CN=<dns name>``, and one subjectAltName naming one identity DNS name and
    optionally its SPIFFE URI. Anything else raises `CsrRefused`. Whether the
    caller may have that identity (token, trust domain) is not checked here.
    """
    if len(csr_pem) > max_bytes:
        raise _refuse("too-large", f"the request is {len(csr_pem)} bytes; at most {max_bytes} "
                      "are accepted for one identity")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        subject = list(csr.subject)
        attributes = [a.oid for a in csr.attributes]
        extensions = list(csr.extensions)
    except x509.DuplicateExtension as e:
        raise _refuse("extra-extensions", f"the CSR requests extension {e.oid.dotted_string} "
                      "more than once; request one subjectAltName only") from e
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion,
            x509.UnsupportedGeneralNameType) as e:
        raise _refuse("malformed", "the request is not a readable PEM certificate signing "
                      f"request (-----BEGIN CERTIFICATE REQUEST-----): {e}") from e
    try:
        public = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise _refuse("unsupported-key", f"the CSR's key cannot be read ({e}); generate an "
                      "ECDSA P-256 key") from e
    if not isinstance(public, ec.EllipticCurvePublicKey) or not _is_p256(public):
        raise _refuse("unsupported-key", f"the CSR's key is {_key_kind(public)}; generate an "
                      "ECDSA P-256 (secp256r1) key")
    try:
        signed = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as e:
        raise _refuse("bad-signature", f"the CSR's signature cannot be checked: {e}") from e
    if not signed:
        raise _refuse("bad-signature", "the CSR's signature does not match its key; it was "
                      "altered or signed with another key")
    _check_requested(extensions, attributes)
    identity = _requested_identity(
        csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    if subject and not (len(subject) == 1 and subject[0].oid == NameOID.COMMON_NAME
                        and subject[0].value == identity.dns_name):
        raise _refuse("extra-names", f"the CSR's subject is {csr.subject.rfc4514_string()!r}; "
                      f"leave it empty or set only CN={identity.dns_name}")
    return identity, public


def _check_requested(extensions: list[x509.Extension[x509.ExtensionType]],
                     attributes: Iterable[x509.ObjectIdentifier]) -> None:
    extra_attributes = [oid.dotted_string for oid in attributes
                        if oid != _EXTENSION_REQUEST]
    if extra_attributes:
        raise _refuse("extra-extensions", f"the CSR carries attributes {extra_attributes}; "
                      "request only a subjectAltName")
    extra = [type(e.value).__name__ if not isinstance(e.value, x509.UnrecognizedExtension)
             else e.oid.dotted_string
             for e in extensions if not isinstance(e.value, x509.SubjectAlternativeName)]
    if extra:
        raise _refuse("extra-extensions", f"the CSR requests extensions {', '.join(extra)}; "
                      "request only a subjectAltName, the issuer sets everything else")
    if not extensions:
        raise _refuse("no-identity", "the CSR has no subjectAltName; request one with the "
                      "identity DNS name <sa>.<ns>.serviceaccount.identity.<control-ns>."
                      "<trust-domain>")


def _requested_identity(san: x509.SubjectAlternativeName) -> Identity:
    names = list(san)
    asked = ", ".join(map(_general_name, names)) or "nothing"
    dns = [n.value for n in names if isinstance(n, x509.DNSName)]
    uris = [n.value for n in names if isinstance(n, x509.UniformResourceIdentifier)]
    if len(dns) + len(uris) != len(names) or len(dns) > 1 or len(uris) > 1 or any(
            not u.startswith("spiffe://") for u in uris):
        raise _refuse("extra-names", f"the CSR asks for {asked}; ask for exactly one identity "
                      "DNS name and optionally its spiffe:// URI")
    if not dns:
        raise _refuse("no-identity", f"the CSR asks for {asked} but names no identity DNS "
                      "name <sa>.<ns>.serviceaccount.identity.<control-ns>.<trust-domain>")
    try:
        identity = Identity.parse(dns[0])
    except InvalidName as e:
        raise _refuse("no-identity", f"the CSR asks for {asked}: {e}") from e
    if identity.dns_name != dns[0]:
        raise _refuse("no-identity", f"the CSR asks for {dns[0]!r}, which is not written as "
                      f"an identity name; expected {identity.dns_name!r}")
    if uris and uris[0] != identity.spiffe_uri:
        raise _refuse("mismatched-uri", f"the CSR asks for {dns[0]} with URI {uris[0]}, "
                      f"which names another workload; its URI is {identity.spiffe_uri}")
    return identity


# -- PEM ----------------------------------------------------------------------------------

def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_certs(pem: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM blob; `TrustSetupError` when there is none."""
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise TrustSetupError(f"no readable PEM certificate ({e}); expected "
                              "-----BEGIN CERTIFICATE----- blocks") from e


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """An unencrypted PEM ECDSA P-256 private key; `TrustSetupError` for anything else."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError as e:
        raise TrustSetupError("the private key is encrypted; meshgate reads unencrypted "
                              "keys kept in mode 0600 files") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TrustSetupError(f"no readable PEM private key ({e})") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not _is_p256(key):
        raise TrustSetupError(f"the private key is {_key_kind(key)}; meshgate CA keys are "
                              "ECDSA P-256")
    return key


# -- the issuer directory -----------------------------------------------------------------

def write_private(path: Path, data: bytes) -> None:
    """Write secret ``data`` (a key PEM) to ``path`` atomically, mode 0600."""
    write_atomic(path, data, mode=0o600)


def write_public(path: Path, data: bytes) -> None:
    """Write ``data`` that may be read by anyone (certificates) to ``path``
    atomically, mode 0644."""
    write_atomic(path, data, mode=0o644)


class IssuerDir:
    """The files of ``meshgate identity init --out DIR``.

    ``anchor.crt``/``anchor.key`` (the anchor's key may be moved offline),
    ``issuer.crt``/``issuer.key`` and ``trust-bundle.pem`` (every anchor trusted
    now). Keys are written mode 0600, every file atomically.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.anchor_cert = self.path / "anchor.crt"
        self.anchor_key = self.path / "anchor.key"
        self.issuer_cert = self.path / "issuer.crt"
        self.issuer_key = self.path / "issuer.key"
        self.bundle = self.path / "trust-bundle.pem"
        self.pending_anchor_cert = self.path / "anchor-next.crt"
        self.pending_anchor_key = self.path / "anchor-next.key"

    def files(self) -> tuple[Path, ...]:
        return (self.anchor_cert, self.anchor_key, self.issuer_cert, self.issuer_key,
                self.bundle)

    def init(self, trust_domain: str, *, anchor_lifetime: timedelta,
             issuer_lifetime: timedelta, now: datetime, force: bool = False
             ) -> tuple[CertKey, CertKey]:
        """Create a new anchor, an issuer under it and a bundle of that anchor.

        Returns ``(anchor, issuer)``. Refuses to replace existing files unless ``force``.
        """
        existing = [str(p) for p in self.files() if p.exists()]
        if existing and not force:
            raise TrustSetupError(f"{self.path} already holds {', '.join(existing)}; "
                                  "refusing to replace a trust anchor (peers would stop "
                                  "trusting each other). Use --force to replace it, or "
                                  "`meshgate identity rotate` to rotate without downtime")
        anchor = new_anchor(trust_domain, lifetime=anchor_lifetime, now=now)
        issuer = new_issuer(anchor, trust_domain, lifetime=issuer_lifetime, now=now)
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.save_anchor(anchor)
        self.save_issuer(issuer)
        self.save_bundle(TrustBundle((anchor.cert,)))
        return anchor, issuer

    def _read(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError as e:
            raise TrustSetupError(f"{path} is missing; create the issuer directory with "
                                  f"`meshgate identity init --out {self.path}`") from e
        except OSError as e:
            raise TrustSetupError(f"cannot read {path}: {e.strerror}") from e

    def _pair(self, cert_path: Path, key_path: Path) -> CertKey:
        cert_data, key_data = self._read(cert_path), self._read(key_path)
        try:
            cert = load_certs(cert_data)[0]
        except TrustSetupError as e:
            raise TrustSetupError(f"{cert_path}: {e}") from e
        try:
            key = load_key(key_data)
        except TrustSetupError as e:
            raise TrustSetupError(f"{key_path}: {e}") from e
        if not is_ca(cert):
            raise TrustSetupError(f"{cert_path} holds {describe(cert)}, which is not a CA "
                                  "certificate")
        if not _same_key(cert, key):
            raise TrustSetupError(f"{key_path} does not belong to {cert_path} "
                                  f"({describe(cert)}): their public keys differ; restore "
                                  "the matching pair")
        return CertKey(cert, key)

    def load_anchor(self) -> CertKey:
        return self._pair(self.anchor_cert, self.anchor_key)

    def load_anchor_cert(self) -> x509.Certificate:
        """The anchor certificate alone: its key may have been moved offline."""
        data = self._read(self.anchor_cert)
        try:
            return load_certs(data)[0]
        except TrustSetupError as e:
            raise TrustSetupError(f"{self.anchor_cert}: {e}") from e

    def save_pending_anchor(self, anchor: CertKey) -> None:
        """Keep the next anchor of a rotation in ``anchor-next.crt``/``.key``."""
        write_atomic(self.pending_anchor_key, key_pem(anchor.key), mode=0o600)
        write_atomic(self.pending_anchor_cert, cert_pem(anchor.cert), mode=0o644)

    def load_pending_anchor(self) -> CertKey:
        return self._pair(self.pending_anchor_cert, self.pending_anchor_key)

    def promote_pending_anchor(self) -> None:
        """Make the pending anchor the anchor (``anchor-next.*`` replaces ``anchor.*``)."""
        self.load_pending_anchor()
        os.replace(self.pending_anchor_key, self.anchor_key)
        os.replace(self.pending_anchor_cert, self.anchor_cert)
        fsync_dir(self.path)

    def load_issuer(self) -> CertKey:
        """The issuer, checked against its key and the anchors of ``trust-bundle.pem``.

        Validity dates are not checked here; `sign_leaf` refuses an expired issuer.
        """
        issuer = self._pair(self.issuer_cert, self.issuer_key)
        bundle = self.load_bundle()
        if bundle.signer_of(issuer.cert) is None:
            raise TrustSetupError(
                f"{self.issuer_cert} ({describe(issuer.cert)}, issued by "
                f"{issuer.cert.issuer.rfc4514_string()}) does not chain to any anchor in "
                f"{self.bundle}, which holds "
                f"{', '.join(map(describe, bundle.anchors))}; add its anchor to the bundle "
                "or issue a new issuer under a trusted anchor")
        return issuer

    def load_bundle(self) -> TrustBundle:
        data = self._read(self.bundle)
        try:
            return TrustBundle.from_pem(data)
        except TrustSetupError as e:
            raise TrustSetupError(f"{self.bundle}: {e}") from e

    def save_bundle(self, bundle: TrustBundle) -> None:
        write_atomic(self.bundle, bundle.to_pem(), mode=0o644)

    def save_anchor(self, anchor: CertKey) -> None:
        write_atomic(self.anchor_key, key_pem(anchor.key), mode=0o600)
        write_atomic(self.anchor_cert, cert_pem(anchor.cert), mode=0o644)

    def save_issuer(self, issuer: CertKey) -> None:
        write_atomic(self.issuer_key, key_pem(issuer.key), mode=0o600)
        write_atomic(self.issuer_cert, cert_pem(issuer.cert), mode=0o644)

    def issuer_chain_pem(self) -> bytes:
        """The issuer certificate PEM: the chain the identity service sends with a leaf."""
        data = self._read(self.issuer_cert)
        try:
            certs = load_certs(data)
        except TrustSetupError as e:
            raise TrustSetupError(f"{self.issuer_cert}: {e}") from e
        return b"".join(map(cert_pem, certs))
