"""Trust bundles: the set of trust anchors a workload accepts peers under.

A bundle may hold several anchors at once, which is what makes anchor rotation
possible without downtime: the new anchor is added everywhere first, issuers
move to it, and only then is the old one removed. `TrustBundle.verify` checks a
presented chain with the strict verifier of ``cryptography.x509.verification``
and turns its failures into `CertificateExpired` or `UntrustedChain` messages
that say which certificate, which anchor and what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from mesh.identity.errors import CertificateExpired, TrustSetupError, UntrustedChain
from mesh.identity.names import presented_name

# A certificate this close to one of its validity boundaries most likely fails
# because one of the two hosts has a wrong clock, not because it was not renewed.
SKEW_WINDOW = timedelta(minutes=10)


def fingerprint(cert: x509.Certificate) -> str:
    """The SHA-256 fingerprint of a certificate's DER encoding, lowercase hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def describe(cert: x509.Certificate) -> str:
    """A short name for a CA certificate in messages: ``CN (sha256 1a2b3c4d…)``."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(cns[0].value) if cns else (cert.subject.rfc4514_string() or "<no subject>")
    return f"{name} (sha256 {fingerprint(cert)[:8]}…)"


def rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bc.ca


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer``'s name and key signed ``cert`` (no policy or time checks)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _key_id(cert: x509.Certificate) -> str | None:
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return aki.key_identifier.hex() if aki.key_identifier else None


def _subject_key_id(cert: x509.Certificate) -> str | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
    except x509.ExtensionNotFound:
        return None


def _may_have_issued(anchor: x509.Certificate, cert: x509.Certificate) -> bool:
    """Whether the names and key identifiers say ``anchor`` is ``cert``'s issuer."""
    if anchor.subject != cert.issuer:
        return False
    want, have = _key_id(cert), _subject_key_id(anchor)
    return want is None or have is None or want == have


@dataclass(frozen=True)
class TrustBundle:
    """An immutable, non-empty set of trust anchors (CA certificates)."""

    anchors: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        if not self.anchors:
            raise TrustSetupError("a trust bundle needs at least one anchor; an empty bundle "
                                  "would trust no peer")
        for cert in self.anchors:
            if not is_ca(cert):
                raise TrustSetupError(f"{describe(cert)} cannot be a trust anchor: it is not a "
                                      "CA certificate (basicConstraints CA:TRUE is missing)")

    fingerprint = staticmethod(fingerprint)
    describe = staticmethod(describe)

    @classmethod
    def from_pem(cls, pem: bytes) -> TrustBundle:
        """Read one or more PEM CA certificates; duplicates are kept once."""
        try:
            certs = x509.load_pem_x509_certificates(pem)
        except ValueError as e:
            raise TrustSetupError(f"the trust bundle holds no readable PEM certificate ({e}); "
                                  "expected one or more -----BEGIN CERTIFICATE----- blocks "
                                  "of trust anchors") from e
        unique: dict[str, x509.Certificate] = {}
        for cert in certs:
            unique.setdefault(fingerprint(cert), cert)
        return cls(tuple(unique.values()))

    def to_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.anchors)

    def ssl_cadata(self) -> str:
        """PEM text for ``SSLContext.load_verify_locations(cadata=...)``."""
        return self.to_pem().decode("ascii")

    def signer_of(self, cert: x509.Certificate) -> x509.Certificate | None:
        """The anchor that signed ``cert`` directly (an issuer), or None."""
        return next((a for a in self.anchors if issued_by(cert, a)), None)

    def contains(self, cert: x509.Certificate) -> bool:
        fp = fingerprint(cert)
        return any(fingerprint(a) == fp for a in self.anchors)

    def with_anchor(self, cert: x509.Certificate) -> TrustBundle:
        """This bundle plus ``cert``; the same bundle when it is already there."""
        if self.contains(cert):
            return self
        return TrustBundle((*self.anchors, cert))

    def without_anchor(self, anchor: str | x509.Certificate) -> TrustBundle:
        """This bundle minus one anchor, given as a certificate or a fingerprint prefix.

        A prefix must be at least 8 hex digits (colons allowed) and match exactly
        one anchor; removing the last anchor is refused.
        """
        if isinstance(anchor, x509.Certificate):
            if not self.contains(anchor):
                raise TrustSetupError(f"{describe(anchor)} is not in the trust bundle; it "
                                      f"holds {self._listing()}")
            prefix = fingerprint(anchor)
        else:
            prefix = anchor.replace(":", "").lower()
            if len(prefix) < 8 or any(ch not in "0123456789abcdef" for ch in prefix):
                raise TrustSetupError(f"{anchor!r} is not a fingerprint prefix; give at least "
                                      f"8 hex digits of the SHA-256 fingerprint, as in "
                                      f"{self._listing()}")
        matches = [a for a in self.anchors if fingerprint(a).startswith(prefix)]
        if not matches:
            raise TrustSetupError(f"no anchor in the trust bundle has a fingerprint starting "
                                  f"with {prefix}; it holds {self._listing()}")
        if len(matches) > 1:
            raise TrustSetupError(f"fingerprint prefix {prefix} matches several anchors "
                                  f"({', '.join(map(describe, matches))}); give more digits")
        rest = tuple(a for a in self.anchors if a is not matches[0])
        if not rest:
            raise TrustSetupError(f"refusing to remove {describe(matches[0])}: it is the last "
                                  "anchor, and an empty bundle would trust no peer; add the "
                                  "new anchor first")
        return TrustBundle(rest)

    def verify(self, chain: Sequence[x509.Certificate], *, now: datetime) -> x509.Certificate:
        """Verify ``chain`` (leaf first, then intermediates) at ``now``; return its anchor.

        Uses the strict client verifier, so the leaf must carry the clientAuth EKU
        (meshgate leaves carry clientAuth and serverAuth). Raises `CertificateExpired`
        when a certificate of the chain or its anchor is outside its validity window
        and that is why it fails, and `UntrustedChain` otherwise.
        """
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware (UTC)")
        if not chain:
            raise UntrustedChain("the peer presented no certificate; it must present its "
                                 "leaf certificate and the issuer that signed it")
        try:
            verified = self._verify_at(chain, now)
        except VerificationError as e:
            raise self._explain(chain, now, str(e)) from e
        root = verified[-1]
        return next((a for a in self.anchors if a == root), root)

    def _verify_at(self, chain: Sequence[x509.Certificate], when: datetime
                   ) -> list[x509.Certificate]:
        verifier = (PolicyBuilder().store(Store(list(self.anchors))).time(when)
                    .build_client_verifier())
        return verifier.verify(chain[0], list(chain[1:])).chain

    def _explain(self, chain: Sequence[x509.Certificate], now: datetime,
                 reason: str) -> CertificateExpired | UntrustedChain:
        top = chain[-1]
        candidates = [a for a in self.anchors if _may_have_issued(a, top)]
        timed = [*chain, *(a for a in candidates if a not in chain)]
        outside = [c for c in timed
                   if not c.not_valid_before_utc <= now <= c.not_valid_after_utc]
        if outside:
            # Only blame time when the chain would verify at a moment all of it is valid.
            start = max(c.not_valid_before_utc for c in timed)
            end = min(c.not_valid_after_utc for c in timed)
            try:
                trusted_otherwise = start > end or bool(self._verify_at(chain, start))
            except VerificationError:
                trusted_otherwise = False
            if trusted_otherwise:
                # An expired issuer expires its leaves with it (they are clamped), so
                # name the expired certificate nearest the anchor; when the clock is
                # behind, the newest certificate, nearest the leaf.
                expired = [c for c in outside if now > c.not_valid_after_utc]
                return self._expired(chain, expired[-1] if expired else outside[0], now)
        leaf = presented_name(chain[0])
        if candidates:
            return UntrustedChain(
                f"the certificate chain of {leaf} leads to trust anchor "
                f"{', '.join(map(describe, candidates))}, which is in the trust bundle, but "
                f"does not verify: {reason}")
        key_id = _key_id(top)
        needs = f"{top.issuer.rfc4514_string() or '<empty name>'}" + (
            f" (authority key id {key_id})" if key_id else "")
        hint = ("" if is_ca(top) else
                "; if that is an intermediate issuer rather than an anchor, the peer must "
                "send it along with its leaf")
        return UntrustedChain(
            f"the certificate chain of {leaf} is not trusted: its top certificate "
            f"{_name_of(top, top is chain[0])} was issued by {needs}, which is not an anchor "
            f"in the trust bundle; the bundle holds {self._listing()}. Add that anchor to the "
            f"bundle (meshgate identity rotate) or re-issue the peer's certificate under a "
            f"trusted anchor{hint}")

    def _expired(self, chain: Sequence[x509.Certificate], cert: x509.Certificate,
                 now: datetime) -> CertificateExpired:
        role = ("leaf certificate" if cert is chain[0] else
                "trust anchor" if self.contains(cert) else "issuer certificate")
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        state = (f"is not valid until {rfc3339(start)}" if now < start
                 else f"expired at {rfc3339(end)}")
        skew = now < start or now - end <= SKEW_WINDOW
        if skew:
            advice = "check the clocks of both hosts (clock skew)"
        elif cert is chain[0]:
            advice = ("the peer must renew its certificate; check that it can reach the "
                      "identity service")
        else:
            advice = "rotate it (meshgate identity rotate)"
        return CertificateExpired(
            f"the {role} {_name_of(cert, cert is chain[0])} {state} (valid from "
            f"{rfc3339(start)} to {rfc3339(end)}, now {rfc3339(now)}); {advice}")

    def _listing(self) -> str:
        return ", ".join(describe(a) for a in self.anchors)


def _name_of(cert: x509.Certificate, leaf: bool) -> str:
    return presented_name(cert) if leaf else describe(cert)
