"""Authorization policy: the policy.meshgate.io resources, and who may call which pod port.

`PolicyIndex` is fed raw Server, MeshTLSAuthentication and AuthorizationPolicy
objects as an informer delivers them, and answers `PolicyIndex.for_port` with
the `PortPolicy` (mesh.authz) of one pod port, which is what proxies apply, or
of one ExternalWorkload (VM) port (``kind=Workload.EXTERNAL``). A Server selects
pods (``podSelector``) or ExternalWorkloads (``externalWorkloadSelector``),
exactly one of the two. A
resource that cannot be used is ignored and kept, with one-line reasons, in
`PolicyIndex.invalid`; nothing in an object's content makes `apply` raise. The
CRDs are installed by mesh.control.crds.

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

import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

import msgspec

from mesh.authz import AccessPolicy, Authorization, PortPolicy, ProxyProtocol, Requirement
from mesh.identity.names import DEFAULT_CONTROL_NS, Identity, InvalidName, check_trust_domain
from mesh.selector import LabelSelector
from mesh.structs import FieldError, convert, explain

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


_PORT_NAME = re.compile(r"^([a-z0-9]+-)*[a-z0-9]*[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_IDENTITY = re.compile(r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class _Spec(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    pass


def _port(value: int | str) -> None:
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise FieldError("port", f"must be a port number from 1 to 65535, got {value}")
    elif len(value) > 15 or not _PORT_NAME.match(value):
        raise FieldError("port", "must be a port name of at most 15 lowercase letters, digits "
                         "and single inner hyphens, with at least one letter (e.g. http), got "
                         f"{value!r}")


class Workload(StrEnum):
    """What a Server selects: pods, or ExternalWorkloads (VMs)."""

    POD = "pod"
    EXTERNAL = "externalworkload"


class _ServerSpec(_Spec, frozen=True, kw_only=True):
    pod_selector: LabelSelector | None = None
    external_workload_selector: LabelSelector | None = None
    port: int | str
    proxy_protocol: ProxyProtocol = ProxyProtocol.UNKNOWN
    access_policy: AccessPolicy = AccessPolicy.DENY

    def __post_init__(self) -> None:
        _port(self.port)
        if (self.pod_selector is None) == (self.external_workload_selector is None):
            raise FieldError("", "give exactly one of podSelector and externalWorkloadSelector")

    def selector(self, kind: Workload) -> LabelSelector | None:
        """The selector for workloads of `kind`; None when the Server selects the other kind."""
        return self.pod_selector if kind is Workload.POD else self.external_workload_selector


class _IdentityRef(_Spec, frozen=True, kw_only=True):
    group: Literal[""] = ""
    kind: Literal["ServiceAccount", "Namespace"]
    name: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    namespace: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "Namespace" and self.name is None:
            raise FieldError("name", "required when kind is Namespace")


def _identity_pattern(value: str) -> bool:
    return len(value) <= 253 and _IDENTITY.match(value) is not None


class _MeshTLSSpec(_Spec, frozen=True, kw_only=True):
    identities: tuple[str, ...] = ()
    identity_refs: tuple[_IdentityRef, ...] = ()

    def __post_init__(self) -> None:
        for i, value in enumerate(self.identities):
            if not _identity_pattern(value):
                raise FieldError(f"identities[{i}]", "must be an identity name such as web."
                                 "default.serviceaccount.identity.meshgate.cluster.local, "
                                 f"\"*\", or \"*.\" and a suffix of one (got {value!r})")
        if not self.identities and not self.identity_refs:
            raise FieldError("", "identities or identityRefs must name at least one identity")


class _TargetRef(_Spec, frozen=True, kw_only=True):
    group: Literal["", "policy.meshgate.io"] = ""
    kind: Literal["Server", "Namespace"]
    name: Annotated[str, msgspec.Meta(min_length=1)]

    def __post_init__(self) -> None:
        if self.kind == "Namespace" and self.group:
            raise FieldError("group", "must be empty when kind is Namespace")


class _AuthenticationRef(_Spec, frozen=True, kw_only=True):
    group: Literal["", "policy.meshgate.io"] = ""
    kind: Literal["MeshTLSAuthentication", "ServiceAccount"]
    name: Annotated[str, msgspec.Meta(min_length=1)]
    namespace: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "ServiceAccount" and self.group:
            raise FieldError("group", "must be empty when kind is ServiceAccount")


class _AuthorizationSpec(_Spec, frozen=True, kw_only=True):
    target_ref: _TargetRef
    required_authentication_refs: tuple[_AuthenticationRef, ...]


_SPECS: dict[str, type[_Spec]] = {SERVER: _ServerSpec, MESH_TLS_AUTHENTICATION: _MeshTLSSpec,
                                  AUTHORIZATION_POLICY: _AuthorizationSpec}


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

    def selects(self, kind: Workload, labels: Mapping[str, str]) -> bool:
        selector = self.spec.selector(kind)
        return selector is not None and selector.matches(labels)

    def port_number(self, names: Mapping[str, int]) -> int | None:
        wanted = self.spec.port
        return names.get(wanted) if isinstance(wanted, str) else wanted


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
        raw = _without_nulls(obj["spec"])
        try:
            spec = convert(raw, _SPECS[kind])
        except msgspec.ValidationError as e:
            where, reason = explain(e, raw, _SPECS[kind])
            return None, [f"spec.{where}: {reason}" if where else f"spec: {reason}"]
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
                 port_names: Mapping[str, int] | None = None,
                 kind: Workload = Workload.POD) -> PortPolicy:
        """The policy of `port` on a pod (or, by `kind`, an ExternalWorkload) with these
        labels; `port_names` maps its named ports to their numbers."""
        names = port_names or {}
        servers = sorted(
            (s for s in self._records[SERVER].get(namespace, {}).values()
             if isinstance(s, _Server) and s.selects(kind, pod_labels)
             and s.port_number(names) == port),
            key=lambda s: (s.created, s.name))
        if not servers:
            return PortPolicy(port=port, access=self.default_policy)
        server = servers[0]
        return PortPolicy(port=port, server=server.key, protocol=server.spec.proxy_protocol,
                          access=server.spec.access_policy,
                          authorizations=tuple(self._authorizations(server)),
                          conflicts=tuple(s.key for s in servers[1:]))

    def pod_policies(self, namespace: str, pod_labels: Mapping[str, str], *,
                     port_names: Mapping[str, int] | None = None,
                     kind: Workload = Workload.POD) -> list[PortPolicy]:
        """The policy of every port of the pod (or, by `kind`, ExternalWorkload) that some
        Server selects; every other port has the default policy."""
        names = port_names or {}
        ports: set[int] = set()
        for server in self._records[SERVER].get(namespace, {}).values():
            if isinstance(server, _Server) and server.selects(kind, pod_labels):
                number = server.port_number(names)
                if number is not None:
                    ports.add(number)
        return [self.for_port(namespace, pod_labels, port, port_names=names, kind=kind)
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


def port_names(pod: Mapping[str, Any]) -> dict[str, int]:
    """The pod's named container ports, for `PolicyIndex.for_port`."""
    names: dict[str, int] = {}
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") and isinstance(port.get("containerPort"), int):
                names[port["name"]] = port["containerPort"]
    return names
