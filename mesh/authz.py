"""What an inbound proxy applies on each connection: a pod port's `PortPolicy`,
its decision for a client identity (`PortPolicy.allows`, with a reason), and the
JSON form in which the control plane (mesh.control.policy) streams it to proxies.

Proxies import this module, so it loads nothing heavy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

import msgspec

from mesh.errors import ProtocolError
from mesh.structs import FieldError, explain

WIRE_VERSION = 1


class AccessPolicy(StrEnum):
    """Which clients a port admits when no AuthorizationPolicy authorizes them."""

    DENY = "deny"
    ALL_AUTHENTICATED = "all-authenticated"
    ALL_UNAUTHENTICATED = "all-unauthenticated"

    def admits(self, identity: str | None) -> bool:
        if self is AccessPolicy.ALL_UNAUTHENTICATED:
            return True
        return self is AccessPolicy.ALL_AUTHENTICATED and identity is not None


class ProxyProtocol(StrEnum):
    """How the inbound proxy treats a port's connections (Linkerd's proxyProtocol)."""

    UNKNOWN = "unknown"
    HTTP1 = "HTTP/1"
    HTTP2 = "HTTP/2"
    GRPC = "gRPC"
    OPAQUE = "opaque"
    TLS = "TLS"


def identity_matches(pattern: str, identity: str) -> bool:
    """``*`` matches every identity, ``*.suffix`` every one ending in ``.suffix``."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return identity.endswith(suffix) and len(identity) > len(suffix)
    return identity == pattern


def _client(identity: str | None) -> str:
    return identity if identity is not None else "an unauthenticated client"


# ---------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    """One line: ``allowed: ...`` or ``denied: ...``, naming the Server and policy."""


@dataclass(frozen=True)
class Requirement:
    """One required authentication of an AuthorizationPolicy, as identity patterns."""

    ref: str
    """What it came from: ``MeshTLSAuthentication ns/name`` or ``ServiceAccount ns/name``."""
    identities: tuple[str, ...]
    """Empty when the reference names nothing usable: then no one satisfies it."""

    def admits(self, identity: str | None) -> bool:
        return identity is not None and any(identity_matches(p, identity)
                                            for p in self.identities)


@dataclass(frozen=True)
class Authorization:
    """An AuthorizationPolicy as it applies to one Server: every requirement must hold."""

    policy: str
    """``namespace/name`` of the AuthorizationPolicy."""
    requirements: tuple[Requirement, ...]

    def admits(self, identity: str | None) -> bool:
        return all(r.admits(identity) for r in self.requirements)


@dataclass(frozen=True)
class PortPolicy:
    """Who may connect to one port of one pod; `allows` decides per connection."""

    port: int
    server: str | None = None
    """``namespace/name`` of the Server that selects the port; None: the default applies."""
    protocol: ProxyProtocol = ProxyProtocol.UNKNOWN
    access: AccessPolicy = AccessPolicy.DENY
    """The Server's accessPolicy, or the cluster's default policy when there is no Server."""
    authorizations: tuple[Authorization, ...] = ()
    conflicts: tuple[str, ...] = ()
    """Younger Servers that also select this port and were overruled by `server`."""

    @property
    def identities(self) -> frozenset[str]:
        """Every identity pattern an authorization of this port names."""
        return frozenset(p for a in self.authorizations for r in a.requirements
                         for p in r.identities)

    def allows(self, identity: str | None) -> Decision:
        """The decision for a client with this mTLS identity (None or "": no identity)."""
        identity = identity or None
        client = _client(identity)
        if self.server is None:
            if self.access.admits(identity):
                return Decision(True, f"allowed: no Server selects port {self.port}; the "
                                      f"default policy {self.access} admits {client}")
            return Decision(False, f"denied: no Server selects port {self.port}; the default "
                                   f"policy {self.access} refuses {client}")
        for authorization in self.authorizations:
            if authorization.admits(identity):
                return Decision(True, f"allowed: AuthorizationPolicy {authorization.policy} "
                                      f"on Server {self.server} authorizes {client}")
        if self.access.admits(identity):
            return Decision(True, f"allowed: no AuthorizationPolicy on Server {self.server} "
                                  f"authorizes {client}, but its accessPolicy {self.access} "
                                  "admits it")
        considered = (", ".join(a.policy for a in self.authorizations)
                      or "the Server has none")
        return Decision(False, f"denied: no AuthorizationPolicy on Server {self.server} "
                               f"authorizes {client} (policies: {considered}; accessPolicy "
                               f"{self.access})")

    def to_json(self) -> str:
        """The compact JSON form streamed to inbound proxies; `from_json` reads it back."""
        return json.dumps({
            "v": WIRE_VERSION, "port": self.port, "server": self.server,
            "protocol": str(self.protocol), "access": str(self.access),
            "authorizations": [
                {"policy": a.policy,
                 "require": [{"ref": r.ref, "identities": list(r.identities)}
                             for r in a.requirements]}
                for a in self.authorizations],
            "conflicts": list(self.conflicts),
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | bytes) -> PortPolicy:
        """Read `to_json`'s form; ProtocolError names what is wrong with it."""
        try:
            wire = msgspec.json.decode(data, type=_WirePolicy)
        except msgspec.ValidationError as e:
            where, reason = explain(e, model=_WirePolicy)
            raise ProtocolError("port policy from the control plane is malformed: "
                                f"{where or '<root>'}: {reason}") from e
        except msgspec.DecodeError as e:
            raise ProtocolError(f"port policy from the control plane is malformed: {e}") from e
        return cls(
            port=wire.port, server=wire.server, protocol=wire.protocol, access=wire.access,
            authorizations=tuple(
                Authorization(a.policy, tuple(Requirement(r.ref, r.identities)
                                              for r in a.require))
                for a in wire.authorizations),
            conflicts=wire.conflicts)


# Unknown fields are ignored, so a newer control plane may add some.

class _WireRequirement(msgspec.Struct, frozen=True):
    ref: str
    identities: tuple[str, ...]


class _WireAuthorization(msgspec.Struct, frozen=True):
    policy: str
    require: tuple[_WireRequirement, ...]


class _WirePolicy(msgspec.Struct, frozen=True, kw_only=True):
    v: Literal[1]
    port: int
    server: str | None
    protocol: ProxyProtocol
    access: AccessPolicy
    authorizations: tuple[_WireAuthorization, ...] = ()
    conflicts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise FieldError("port", f"must be from 1 to 65535, got {self.port}")
