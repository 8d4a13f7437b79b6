"""Authorization policy: the policy.meshgate.io resources, and who may call which pod port.

This module owns:

- the CRDs in ``deploy/crds/policy.yaml``: `crd_documents` reads them and
  `install_crds` creates or updates them through the kubernetes client;
- `PolicyIndex`, fed raw Server, MeshTLSAuthentication and AuthorizationPolicy
  objects as an informer delivers them, which answers `PolicyIndex.for_port`
  with the `PortPolicy` of one pod port. A resource that cannot be used is
  ignored and kept, with one-line reasons, in `PolicyIndex.invalid`; nothing
  in an object's content makes `apply` raise;
- `PortPolicy`: the decision an inbound proxy makes on each connection
  (`PortPolicy.allows`) and its JSON form, streamed to proxies. Proxies import
  this module to read that JSON, so it loads neither the kubernetes client nor
  anything else heavy at import time.

The semantics are Linkerd's:

- no Server selects a pod port: the cluster's default policy decides;
- a Server selects it: a client is allowed when an AuthorizationPolicy that
  targets the Server, or the Server's namespace, authorizes it; otherwise the
  Server's accessPolicy decides, which denies unless it says otherwise;
- an AuthorizationPolicy authorizes a client that satisfies every one of its
  requiredAuthenticationRefs, so an empty list authorizes every client, meshed
  or not; a reference to a MeshTLSAuthentication that does not exist (or is
  invalid) is satisfied by no one;
- when several Servers select the same pod port, the oldest (creationTimestamp,
  then name) wins and the others are named in `PortPolicy.conflicts`.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from mesh.errors import MeshError, ProtocolError
from mesh.identity.names import DEFAULT_CONTROL_NS, Identity, InvalidName, check_trust_domain

log = logging.getLogger(__name__)

GROUP = "policy.meshgate.io"
VERSION = "v1alpha1"
SERVER = "Server"
MESH_TLS_AUTHENTICATION = "MeshTLSAuthentication"
AUTHORIZATION_POLICY = "AuthorizationPolicy"
PLURALS = {SERVER: "servers", MESH_TLS_AUTHENTICATION: "meshtlsauthentications",
           AUTHORIZATION_POLICY: "authorizationpolicies"}
"""The resource name of each kind, for CustomObjectsApi calls and informers."""
ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"

# deploy/ is not a package: it is found beside mesh/ in the (editable) checkout.
CRD_FILE = Path(__file__).resolve().parents[2] / "deploy" / "crds" / "policy.yaml"
WIRE_VERSION = 1

_PORT_NAME = re.compile(r"^([a-z0-9]+-)*[a-z0-9]*[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_IDENTITY = re.compile(r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class PolicyError(MeshError):
    """The policy CRDs could not be read or installed."""


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
            wire = _WirePolicy.model_validate_json(data)
        except ValidationError as e:
            raise ProtocolError("port policy from the control plane is malformed: "
                                + "; ".join(_reasons(e, ""))) from e
        return cls(
            port=wire.port, server=wire.server, protocol=wire.protocol, access=wire.access,
            authorizations=tuple(
                Authorization(a.policy, tuple(Requirement(r.ref, r.identities)
                                              for r in a.require))
                for a in wire.authorizations),
            conflicts=wire.conflicts)


class _Wire(BaseModel):
    # Unknown fields are ignored, so a newer control plane may add some.
    model_config = ConfigDict(extra="ignore", frozen=True)


class _WireRequirement(_Wire):
    ref: str
    identities: tuple[str, ...]


class _WireAuthorization(_Wire):
    policy: str
    require: tuple[_WireRequirement, ...]


class _WirePolicy(_Wire):
    v: Literal[1]
    port: int = Field(ge=1, le=65535)
    server: str | None
    protocol: ProxyProtocol
    access: AccessPolicy
    authorizations: tuple[_WireAuthorization, ...] = ()
    conflicts: tuple[str, ...] = ()


# ---------------------------------------------------------------- resource specs


class _Spec(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class _Expression(_Spec):
    key: str = Field(min_length=1)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _values_fit_operator(self) -> _Expression:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"values must not be empty when operator is {self.operator}")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"values must be empty when operator is {self.operator}")
        return self

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return labels.get(self.key) not in self.values
        return (self.key in labels) == (self.operator == "Exists")


class _Selector(_Spec):
    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")
    match_expressions: tuple[_Expression, ...] = Field((), alias="matchExpressions")

    def matches(self, labels: Mapping[str, str]) -> bool:
        return (all(labels.get(k) == v for k, v in self.match_labels.items())
                and all(e.matches(labels) for e in self.match_expressions))


def _port(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= 65535:
            raise ValueError("must be a port number from 1 to 65535")
    elif isinstance(value, str):
        if len(value) > 15 or not _PORT_NAME.match(value):
            raise ValueError("must be a port name of at most 15 lowercase letters, digits and "
                             "single inner hyphens, with at least one letter (e.g. http)")
    else:
        raise ValueError("must be a port number or a port name")
    return value


class _ServerSpec(_Spec):
    pod_selector: _Selector = Field(alias="podSelector")
    port: Annotated[int | str, BeforeValidator(_port)]
    proxy_protocol: ProxyProtocol = Field(ProxyProtocol.UNKNOWN, alias="proxyProtocol")
    access_policy: AccessPolicy = Field(AccessPolicy.DENY, alias="accessPolicy")


class _IdentityRef(_Spec):
    group: Literal[""] = ""
    kind: Literal["ServiceAccount", "Namespace"]
    name: str | None = Field(None, min_length=1)
    namespace: str | None = None

    @model_validator(mode="after")
    def _namespace_is_named(self) -> _IdentityRef:
        if self.kind == "Namespace" and self.name is None:
            raise ValueError("name is required when kind is Namespace")
        return self


def _identity_pattern(value: str) -> str:
    if len(value) > 253 or not _IDENTITY.match(value):
        raise ValueError("must be an identity name such as web.default.serviceaccount.identity."
                         "meshgate.cluster.local, \"*\", or \"*.\" and a suffix of one")
    return value


class _MeshTLSSpec(_Spec):
    identities: tuple[Annotated[str, AfterValidator(_identity_pattern)], ...] = ()
    identity_refs: tuple[_IdentityRef, ...] = Field((), alias="identityRefs")

    @model_validator(mode="after")
    def _names_someone(self) -> _MeshTLSSpec:
        if not self.identities and not self.identity_refs:
            raise ValueError("identities or identityRefs must name at least one identity")
        return self


class _TargetRef(_Spec):
    group: Literal["", "policy.meshgate.io"] = ""
    kind: Literal["Server", "Namespace"]
    name: str = Field(min_length=1)

    @model_validator(mode="after")
    def _group_fits_kind(self) -> _TargetRef:
        if self.kind == "Namespace" and self.group:
            raise ValueError("group must be empty when kind is Namespace")
        return self


class _AuthenticationRef(_Spec):
    group: Literal["", "policy.meshgate.io"] = ""
    kind: Literal["MeshTLSAuthentication", "ServiceAccount"]
    name: str = Field(min_length=1)
    namespace: str | None = None

    @model_validator(mode="after")
    def _group_fits_kind(self) -> _AuthenticationRef:
        if self.kind == "ServiceAccount" and self.group:
            raise ValueError("group must be empty when kind is ServiceAccount")
        return self


class _AuthorizationSpec(_Spec):
    target_ref: _TargetRef = Field(alias="targetRef")
    required_authentication_refs: tuple[_AuthenticationRef, ...] = Field(
        alias="requiredAuthenticationRefs")


_SPECS: dict[str, type[_Spec]] = {SERVER: _ServerSpec, MESH_TLS_AUTHENTICATION: _MeshTLSSpec,
                                  AUTHORIZATION_POLICY: _AuthorizationSpec}


def _path(parts: tuple[Any, ...]) -> str:
    out = ""
    for part in parts:
        out = f"{out}[{part}]" if isinstance(part, int) else f"{out}.{part}" if out else part
    return out


def _reasons(error: ValidationError, root: str) -> list[str]:
    """One line per failure: the field path, then what is wrong with it."""
    out = []
    for e in error.errors(include_url=False):
        where = _path((root, *e["loc"]) if root else tuple(e["loc"])) or "<root>"
        message = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        if e["type"] != "missing" and not isinstance(value, (dict, list, tuple)):
            message += f" (got {json.dumps(value, default=repr)})"
        out.append(f"{where}: {message}")
    return out


# ---------------------------------------------------------------- the index


@dataclass(frozen=True)
class InvalidResource:
    """A resource the index ignores, and why."""

    kind: str
    namespace: str
    name: str
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name} is ignored: {'; '.join(self.reasons)}"


@dataclass(frozen=True)
class _Server:
    namespace: str
    name: str
    created: datetime
    spec: _ServerSpec

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selects(self, labels: Mapping[str, str], port: int, names: Mapping[str, int]) -> bool:
        wanted = self.spec.port
        number = names.get(wanted) if isinstance(wanted, str) else wanted
        return number == port and self.spec.pod_selector.matches(labels)


@dataclass(frozen=True)
class _Authentication:
    identities: tuple[str, ...]


@dataclass(frozen=True)
class _Ref:
    kind: str
    namespace: str
    name: str
    identities: tuple[str, ...] = ()
    """A ServiceAccount's own identity; MeshTLSAuthentications are looked up when asked."""

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class _Policy:
    target_kind: str
    target_name: str
    refs: tuple[_Ref, ...]


_Record = _Server | _Authentication | _Policy


def _without_nulls(value: Any) -> Any:
    """kube drops the nulls of fields that are not nullable (and then defaults them)."""
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _created(meta: Mapping[str, Any]) -> datetime:
    stamp = meta.get("creationTimestamp")
    try:
        return datetime.strptime(str(stamp), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return datetime.max.replace(tzinfo=UTC)  # unknown age: count it as the youngest


class PolicyIndex:
    """The policy resources of a cluster, by namespace, and the port policies they make.

    `trust_domain` and `control_ns` turn ServiceAccount references into identity
    names; `default_policy` decides for ports that no Server selects.
    """

    def __init__(self, trust_domain: str, *,
                 default_policy: AccessPolicy = AccessPolicy.ALL_AUTHENTICATED,
                 control_ns: str = DEFAULT_CONTROL_NS) -> None:
        self.trust_domain = check_trust_domain(trust_domain)
        self.control_ns = control_ns
        self.default_policy = AccessPolicy(default_policy)
        # kind -> namespace -> name -> record
        self._records: dict[str, dict[str, dict[str, _Record]]] = {
            SERVER: {}, MESH_TLS_AUTHENTICATION: {}, AUTHORIZATION_POLICY: {}}
        self._invalid: dict[tuple[str, str, str], InvalidResource] = {}

    # -- changes ----------------------------------------------------------

    def apply(self, kind: str, event: str, obj: Mapping[str, Any]) -> set[str]:
        """Take one informer event; return the namespaces whose port policies may have
        changed (empty when the change makes no difference to any proxy)."""
        if kind not in self._records:
            raise ValueError(f"PolicyIndex does not index {kind!r}; it takes "
                             f"{', '.join(self._records)}")
        if event not in (ADDED, MODIFIED, DELETED):
            raise ValueError(f"unknown event {event!r}; expected ADDED, MODIFIED or DELETED")
        meta = obj.get("metadata")
        if not isinstance(meta, Mapping):
            meta = {}
        namespace = str(meta.get("namespace") or "")
        name = str(meta.get("name") or "")
        records = self._records[kind]
        before = records.get(namespace, {}).get(name)
        self._invalid.pop((kind, namespace, name), None)
        after: _Record | None = None
        if event != DELETED:
            after, reasons = self._parse(kind, namespace, name, obj)
            if after is None:
                invalid = InvalidResource(kind, namespace or "<none>", name or "<none>",
                                          tuple(reasons))
                self._invalid[(kind, namespace, name)] = invalid
                log.warning('policy resource ignored kind=%s name=%s/%s reason="%s"', kind,
                            invalid.namespace, invalid.name, "; ".join(reasons))
        in_namespace = records.setdefault(namespace, {})
        if after is None:
            in_namespace.pop(name, None)
        else:
            in_namespace[name] = after
        if not in_namespace:
            del records[namespace]
        if before == after:
            return set()
        if kind == MESH_TLS_AUTHENTICATION:
            return self._referring_namespaces(namespace, name)
        return {namespace}

    def _referring_namespaces(self, namespace: str, name: str) -> set[str]:
        return {policy_ns for policy_ns, policies in self._records[AUTHORIZATION_POLICY].items()
                for policy in policies.values() if isinstance(policy, _Policy)
                for ref in policy.refs
                if (ref.kind, ref.namespace, ref.name) == (MESH_TLS_AUTHENTICATION, namespace,
                                                          name)}

    def _parse(self, kind: str, namespace: str, name: str,
               obj: Mapping[str, Any]) -> tuple[_Record | None, list[str]]:
        missing = [f"metadata.{key}: required" for key, value in
                   (("namespace", namespace), ("name", name)) if not value]
        if missing:
            return None, missing
        if not isinstance(obj.get("spec"), Mapping):
            return None, ["spec: required: an object"]
        try:
            spec = _SPECS[kind].model_validate(_without_nulls(obj["spec"]))
        except ValidationError as e:
            return None, _reasons(e, "spec")
        try:
            if isinstance(spec, _ServerSpec):
                return _Server(namespace, name, _created(obj["metadata"]), spec), []
            if isinstance(spec, _MeshTLSSpec):
                return self._authentication(namespace, spec)
            assert isinstance(spec, _AuthorizationSpec)
            return self._policy(namespace, spec)
        except InvalidName as e:  # a name the schema let through but no identity can have
            return None, [str(e)]

    def _authentication(self, namespace: str,
                        spec: _MeshTLSSpec) -> tuple[_Record | None, list[str]]:
        identities = list(spec.identities)
        reasons = []
        for index, ref in enumerate(spec.identity_refs):
            ref_ns = (ref.name if ref.kind == "Namespace" else ref.namespace) or namespace
            try:
                identities.append(self._service_account(ref_ns, ref.name)
                                  if ref.kind == "ServiceAccount" and ref.name
                                  else self._any_service_account(ref_ns))
            except InvalidName as e:
                reasons.append(f"spec.identityRefs[{index}]: {e}")
        if reasons:
            return None, reasons
        return _Authentication(tuple(identities)), []

    def _policy(self, namespace: str,
                spec: _AuthorizationSpec) -> tuple[_Record | None, list[str]]:
        target = spec.target_ref
        if target.kind == "Namespace" and target.name != namespace:
            return None, [f"spec.targetRef.name: a Namespace target must be the policy's own "
                          f"namespace {namespace} (got {json.dumps(target.name)})"]
        refs = []
        for ref in spec.required_authentication_refs:
            ref_ns = ref.namespace or namespace
            identities = ((self._service_account(ref_ns, ref.name),)
                          if ref.kind == "ServiceAccount" else ())
            refs.append(_Ref(ref.kind, ref_ns, ref.name, identities))
        return _Policy(target.kind, target.name, tuple(refs)), []

    def _service_account(self, namespace: str, name: str) -> str:
        return Identity(namespace, name, self.trust_domain, self.control_ns).dns_name

    def _any_service_account(self, namespace: str) -> str:
        # Built from a real identity so that the namespace is checked like any other.
        some = Identity(namespace, "sa", self.trust_domain, self.control_ns).dns_name
        return "*" + some.removeprefix("sa")

    # -- queries ----------------------------------------------------------

    def for_port(self, namespace: str, pod_labels: Mapping[str, str], port: int, *,
                 port_names: Mapping[str, int] | None = None) -> PortPolicy:
        """The policy of `port` on a pod with these labels; `port_names` maps the pod's
        named container ports to their numbers."""
        names = port_names or {}
        servers = sorted(
            (s for s in self._records[SERVER].get(namespace, {}).values()
             if isinstance(s, _Server) and s.selects(pod_labels, port, names)),
            key=lambda s: (s.created, s.name))
        if not servers:
            return PortPolicy(port=port, access=self.default_policy)
        server = servers[0]
        return PortPolicy(port=port, server=server.key, protocol=server.spec.proxy_protocol,
                          access=server.spec.access_policy,
                          authorizations=tuple(self._authorizations(server)),
                          conflicts=tuple(s.key for s in servers[1:]))

    def pod_policies(self, namespace: str, pod_labels: Mapping[str, str], *,
                     port_names: Mapping[str, int] | None = None) -> list[PortPolicy]:
        """The policy of every port of the pod that some Server selects; every other port
        has the default policy."""
        names = port_names or {}
        ports: set[int] = set()
        for server in self._records[SERVER].get(namespace, {}).values():
            if isinstance(server, _Server) and server.spec.pod_selector.matches(pod_labels):
                wanted = server.spec.port
                number = names.get(wanted) if isinstance(wanted, str) else wanted
                if number is not None:
                    ports.add(number)
        return [self.for_port(namespace, pod_labels, port, port_names=names)
                for port in sorted(ports)]

    def _authorizations(self, server: _Server) -> Iterator[Authorization]:
        policies = self._records[AUTHORIZATION_POLICY].get(server.namespace, {})
        for name in sorted(policies):
            policy = policies[name]
            assert isinstance(policy, _Policy)
            if (policy.target_kind, policy.target_name) not in (
                    ("Server", server.name), ("Namespace", server.namespace)):
                continue
            yield Authorization(f"{server.namespace}/{name}",
                                tuple(Requirement(str(ref), self._identities(ref))
                                      for ref in policy.refs))

    def _identities(self, ref: _Ref) -> tuple[str, ...]:
        if ref.kind != MESH_TLS_AUTHENTICATION:
            return ref.identities
        found = self._records[MESH_TLS_AUTHENTICATION].get(ref.namespace, {}).get(ref.name)
        return found.identities if isinstance(found, _Authentication) else ()

    @property
    def invalid(self) -> list[InvalidResource]:
        """The resources ignored because they cannot be used, with why."""
        return sorted(self._invalid.values(), key=lambda r: (r.kind, r.namespace, r.name))

    def problems(self) -> list[str]:
        """Every ignored resource, and every policy that refers to something missing."""
        out = [str(r) for r in self.invalid]
        for namespace, policies in sorted(self._records[AUTHORIZATION_POLICY].items()):
            for name, policy in sorted(policies.items()):
                assert isinstance(policy, _Policy)
                where = f"AuthorizationPolicy {namespace}/{name}"
                if (policy.target_kind == "Server"
                        and policy.target_name not in self._records[SERVER].get(namespace, {})):
                    out.append(f"{where}: spec.targetRef: Server {namespace}/"
                               f"{policy.target_name} does not exist, so the policy has no "
                               "effect")
                for index, ref in enumerate(policy.refs):
                    if ref.kind == MESH_TLS_AUTHENTICATION and not self._identities(ref):
                        out.append(f"{where}: spec.requiredAuthenticationRefs[{index}]: {ref} "
                                   "does not exist or is invalid, so the policy authorizes "
                                   "no one")
        return out


# ---------------------------------------------------------------- the CRDs


def crd_documents() -> list[dict[str, Any]]:
    """The CustomResourceDefinitions of policy.meshgate.io, from deploy/crds/policy.yaml."""
    try:
        text = CRD_FILE.read_text()
    except OSError as e:
        raise PolicyError(f"cannot read the policy CRDs at {CRD_FILE}: {e.strerror}; meshgate "
                          "must be installed from its source tree (pip install -e .)") from e
    return [doc for doc in yaml.safe_load_all(text) if doc]


def install_crds(api_client: Any, *, timeout: float = 30.0) -> dict[str, str]:
    """Create or update the policy CRDs and wait until they are established.

    Returns what happened to each, by name: ``created``, ``updated`` or
    ``unchanged``. Running it again changes nothing.
    """
    # Imported here: proxies load this module and must not pay for the client.
    from kubernetes import client

    api = client.ApiextensionsV1Api(api_client)
    done = {doc["metadata"]["name"]: _install(api, doc) for doc in crd_documents()}
    deadline = time.monotonic() + timeout
    for name in done:
        while not _established(_read(api, name)):
            if time.monotonic() > deadline:
                raise PolicyError(f"CustomResourceDefinition {name} was not established "
                                  f"within {timeout:g}s; see its status.conditions")
            time.sleep(0.1)
    return done


def _install(api: Any, doc: dict[str, Any]) -> str:
    from kubernetes.client.rest import ApiException

    name = doc["metadata"]["name"]
    for _ in range(5):  # another writer may race us; each round re-reads what is there
        try:
            api.create_custom_resource_definition(doc)
            return "created"
        except ApiException as e:
            if e.status != 409:
                raise _api_error(name, "create", e) from e
        current = _read(api, name)
        if current is None:
            continue  # deleted since: create again
        if _contains(current, doc):
            return "unchanged"
        body = copy.deepcopy(doc)
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        try:
            api.replace_custom_resource_definition(name, body)
            return "updated"
        except ApiException as e:
            if e.status not in (404, 409):
                raise _api_error(name, "replace", e) from e
    raise PolicyError(f"CustomResourceDefinition {name} kept changing while it was installed; "
                      "run the install again")


def _read(api: Any, name: str) -> dict[str, Any] | None:
    from kubernetes.client.rest import ApiException

    try:
        resp = api.read_custom_resource_definition(name, _preload_content=False)
    except ApiException as e:
        if e.status == 404:
            return None
        raise _api_error(name, "read", e) from e
    body: dict[str, Any] = json.loads(resp.data)
    return body


def _established(crd: Mapping[str, Any] | None) -> bool:
    conditions = ((crd or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


def _contains(have: Any, want: Any) -> bool:
    """Whether `have` holds everything `want` says (the server may add defaults)."""
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(
            key in have and _contains(have[key], value) for key, value in want.items())
    if isinstance(want, list):
        return (isinstance(have, list) and len(have) == len(want)
                and all(_contains(h, w) for h, w in zip(have, want, strict=True)))
    return bool(have == want)


def _api_error(name: str, verb: str, e: Any) -> PolicyError:
    hint = {401: "the credential was refused", 403: "the credential may not do this; it needs "
            "create, get and update on customresourcedefinitions"}.get(e.status, "")
    detail = f"{e.status} {e.reason}" + (f": {hint}" if hint else "")
    return PolicyError(f"cannot {verb} CustomResourceDefinition {name} ({detail})")


__all__ = ["AUTHORIZATION_POLICY", "GROUP", "MESH_TLS_AUTHENTICATION", "PLURALS", "SERVER",
           "VERSION", "AccessPolicy", "Authorization", "Decision", "InvalidResource",
           "PolicyError", "PolicyIndex", "PortPolicy", "ProxyProtocol", "Requirement",
           "crd_documents", "identity_matches", "install_crds"]
