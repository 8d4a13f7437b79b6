"""Identity failures, each worded so that a person can act on it: which side,
which peer, which identity was expected and which was presented, until when
the presented chain is valid, and which trust anchor was missing."""

from __future__ import annotations

from mesh.errors import IdentityError


class PeerIdentityMismatch(IdentityError):
    """The peer's chain is trusted but names another identity than expected."""


class UntrustedChain(IdentityError):
    """The peer's chain does not lead to any anchor in the trust bundle."""


class CertificateExpired(IdentityError):
    """A certificate in the chain is expired or not yet valid (clock skew is named)."""


class IssuanceRefused(IdentityError):
    """The identity service refused a certificate request; ``reason`` is its code."""

    def __init__(self, message: str, *, reason: str, status: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


class ServiceUnavailable(IdentityError):
    """The identity service could not be reached or answered with a server error."""


class TrustSetupError(IdentityError):
    """Anchor, issuer or trust bundle files are missing, malformed or inconsistent."""
