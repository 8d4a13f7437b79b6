"""Identity names: how a workload's identity is written in certificates.

A workload is a ServiceAccount. Its identity appears in a leaf certificate as
the Linkerd-style DNS name ``<sa>.<ns>.serviceaccount.identity.<control-ns>.<trust-domain>``
and as the SPIFFE URI ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509

from mesh.errors import IdentityError

DEFAULT_CONTROL_NS = "meshgate"
SERVICE_AUDIENCE = "identity.meshgate.io"
"""The audience of ServiceAccount tokens that the identity service accepts."""
IDENTITY_SERVICE_ACCOUNT = "meshgate-identity"
GATEWAY_SERVICE_ACCOUNT = "meshgate-gateway"
"""The multicluster gateway's ServiceAccount, in the control namespace."""
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_MARKER = ".serviceaccount.identity."


class InvalidName(IdentityError):
    """A string is not a well-formed identity name or trust domain."""


def check_trust_domain(domain: str) -> str:
    if not domain or len(domain) > 253 or not _DOMAIN.match(domain):
        raise InvalidName(f"trust domain {domain!r} must be a lowercase DNS name such as "
                          "cluster.local")
    return domain


@dataclass(frozen=True, order=True)
class Identity:
    """A workload identity: one ServiceAccount in one trust domain."""

    namespace: str
    service_account: str
    trust_domain: str
    control_ns: str = DEFAULT_CONTROL_NS

    def __post_init__(self) -> None:
        for what, value in (("namespace", self.namespace),
                            ("service account", self.service_account),
                            ("control namespace", self.control_ns)):
            if not value or len(value) > 63 or not _LABEL.match(value):
                raise InvalidName(f"{what} {value!r} must be a lowercase DNS label")
        check_trust_domain(self.trust_domain)

    @property
    def dns_name(self) -> str:
        return (f"{self.service_account}.{self.namespace}{_MARKER}{self.control_ns}."
                f"{self.trust_domain}")

    @property
    def spiffe_uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.dns_name

    @classmethod
    def parse(cls, name: str) -> Identity:
        """Read a DNS identity name back into its parts."""
        head, marker, tail = name.partition(_MARKER)
        sa, _, ns = head.partition(".")
        control_ns, _, domain = tail.partition(".")
        if not marker or not sa or not ns or not control_ns or not domain:
            raise InvalidName(f"{name!r} is not an identity name; expected "
                              "<sa>.<ns>.serviceaccount.identity.<control-ns>.<trust-domain>")
        return cls(ns, sa, domain, control_ns)

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> Identity:
        """The identity a certificate names in its DNS SAN."""
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound as e:
            raise InvalidName(f"certificate {cert.subject.rfc4514_string()!r} names no "
                              "identity: it has no subjectAltName") from e
        for dns in san.get_values_for_type(x509.DNSName):
            if _MARKER in dns:
                return cls.parse(dns)
        raise InvalidName(f"certificate {cert.subject.rfc4514_string()!r} names no identity: "
                          f"its DNS names are {san.get_values_for_type(x509.DNSName)}")


def presented_name(cert: x509.Certificate) -> str:
    """What a certificate calls itself, for messages: its identity, else its first SAN/CN."""
    try:
        return str(Identity.from_certificate(cert))
    except InvalidName:
        pass
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in san.get_values_for_type(x509.DNSName)]
        names += [str(v) for v in san.get_values_for_type(x509.UniformResourceIdentifier)]
        if names:
            return names[0]
    except x509.ExtensionNotFound:
        pass
    return cert.subject.rfc4514_string() or "<no name>"


def service_identity(trust_domain: str, control_ns: str = DEFAULT_CONTROL_NS) -> Identity:
    """The identity the identity service itself presents; its clients check for it."""
    return Identity(control_ns, IDENTITY_SERVICE_ACCOUNT, trust_domain, control_ns)
