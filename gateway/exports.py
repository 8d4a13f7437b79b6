"""What the gateway lets through: the exported Services of its cluster, their meshed
endpoints, and the pod-port policies that say which callers may reach them.

`Exports` is fed watch events as plain dicts (Services, EndpointSlices, Pods,
ExternalWorkloads and the policy.meshgate.io resources) and answers, without
I/O, the two questions each connection asks:

- `route`: the Service the transport header names exists, carries the exported
  label, and is not a mirror reached from another gateway (a loop); and who the
  caller is: the mTLS peer, or the caller a trusted gateway forwarded in field
  100 (`mesh.proxy.inbound.caller_of`, the rule inbound proxies apply). A VM of
  this cluster reaches the cluster's pods through this gateway: a peer (not a
  forwarded caller) whose identity is the ``spec.meshTLS.identity`` of one of
  the cluster's ExternalWorkloads may reach every Service, exported or not;
- `choose`: a meshed endpoint of that Service port (balanced), the Pod behind
  it, and whether that Pod port's `PortPolicy` admits the caller.

Each refusal is a `Refused` with a `Reason`, which the gateway counts and logs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from enum import StrEnum

from mesh.authz import AccessPolicy, Decision
from mesh.control.externalworkloads import workload_identity, workload_ports
from mesh.control.policy import PolicyIndex, Workload, port_names
from mesh.discovery.index import (
    Change,
    DestinationIndex,
    ObjKey,
    ServiceRemoved,
    ServiceUpdated,
)
from mesh.identity.names import Identity
from mesh.informer import DELETED, Obj
from mesh.proxy.balancer import Balancer, EndpointState, Pick
from mesh.proxy.discovery import EndpointSpec, ServiceSpec, split_host_port
from mesh.proxy.inbound import BadCaller, Caller, ForgedCaller, caller_of, is_trusted_gateway
from mesh.proxy.transport_header import TransportHeader

log = logging.getLogger(__name__)

MIRRORED_LABEL = "mirror.meshgate.io/mirrored-service"
"""Set to "true" on the local mirror of a remote cluster's Service."""


class Reason(StrEnum):
    """Why the gateway closed a connection: the ``reason`` label of gateway_refused."""

    TLS_HANDSHAKE = "tls-handshake"
    NO_TRANSPORT_ALPN = "no-transport-alpn"
    NO_IDENTITY = "no-identity"
    BAD_HEADER = "bad-header"
    HEADER_TIMEOUT = "header-timeout"
    FORGED_CALLER = "forged-caller"
    """Field 100 from a peer that is not a trusted gateway."""
    BAD_CALLER = "bad-caller"
    """Field 100 from a trusted gateway that is not an identity name."""
    BAD_ASSERTION = "bad-assertion"
    """A caller assertion that does not verify or does not name the caller."""
    UNKNOWN_SERVICE = "unknown-service"
    UNKNOWN_PORT = "unknown-port"
    NOT_EXPORTED = "not-exported"
    LOOP = "loop"
    """A gateway forwarding to a mirror Service, that is to yet another gateway; or an
    HTTP request whose Forwarded header names this gateway already."""
    BAD_REQUEST = "bad-request"
    """Bytes that are not HTTP/1 requests on a connection whose header said HTTP/1."""
    NO_ENDPOINTS = "no-endpoints"
    UNAUTHORIZED = "unauthorized"
    CONNECT_FAILED = "connect-failed"


@dataclass(frozen=True)
class Refused:
    reason: Reason
    detail: str
    target: str = ""
    """``name:port`` as the header gave it, for logs (never a metric label)."""
    service: str = ""
    """The target Service's name once it is known to exist: the dst_service label."""
    caller: str = ""
    asserted: str = ""
    """The caller a refused assertion claimed, for logs."""


@dataclass(frozen=True)
class Route:
    """A connection the gateway may forward, before an endpoint is chosen."""

    service: ServiceSpec
    key: ObjKey
    """The Service's (namespace, name)."""
    caller: Caller

    @property
    def target(self) -> str:
        return f"{self.service.name}:{self.service.host_port[1]}"


@dataclass(frozen=True)
class Target:
    """The endpoint chosen for a route; report the attempt's outcome on `pick`."""

    pick: Pick
    pod: ObjKey
    """The Pod (or ExternalWorkload) behind the endpoint."""
    decision: Decision


class Exports:
    def __init__(self, identity: Identity, *, cluster_domain: str = "cluster.local",
                 exported_label: str = "mirror.meshgate.io/exported=true",
                 trusted_gateways: Sequence[str] = (),
                 default_policy: AccessPolicy = AccessPolicy.ALL_AUTHENTICATED) -> None:
        self.identity = identity
        self.cluster_domain = cluster_domain.rstrip(".")
        key, _, value = exported_label.partition("=")
        self.exported = (key, value)
        self.trusted_gateways = tuple(trusted_gateways)
        self.index = DestinationIndex(trust_domain=identity.trust_domain,
                                      cluster_domain=self.cluster_domain,
                                      control_ns=identity.control_ns)
        self.policy = PolicyIndex(identity.trust_domain, default_policy=default_policy,
                                  control_ns=identity.control_ns)
        self._services: dict[ObjKey, Obj] = {}
        self._pods: dict[ObjKey, Obj] = {}
        self._workloads: dict[ObjKey, Obj] = {}
        """ExternalWorkload -> its spec.meshTLS.identity: this cluster's VMs."""
        self._balancers: dict[tuple[str, int], Balancer] = {}
        """(service name, service port) -> a balancer over its meshed endpoints."""
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener` after each change to what decides routes (Services, their
        endpoints, Pods, policy resources)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    # -- feeding ---------------------------------------------------------------------

    def service_event(self, event: str, obj: Obj) -> None:
        _remember(self._services, event, obj)
        self._apply(self.index.service_event(event, obj))
        self._changed()

    def slice_event(self, event: str, obj: Obj) -> None:
        self._apply(self.index.slice_event(event, obj))
        self._changed()

    def pod_event(self, event: str, obj: Obj) -> None:
        _remember(self._pods, event, obj)
        self._apply(self.index.pod_event(event, obj))
        self._changed()

    def workload_event(self, event: str, obj: Obj) -> None:
        """An ExternalWorkload (a VM of this cluster) was added, changed or deleted."""
        _remember(self._workloads, event, obj)
        # Its endpoints become meshed ones once its identity is known: VMs reach each other.
        self._apply(self.index.workload_event(event, obj))
        self._changed()

    def is_local_workload(self, identity: str) -> bool:
        """Whether `identity` is that of an ExternalWorkload of this cluster (a VM)."""
        return any(workload_identity(vm) == identity for vm in self._workloads.values())

    def policy_event(self, kind: str, event: str, obj: Obj) -> None:
        self.policy.apply(kind, event, obj)  # logs the resources it must ignore
        self._changed()

    def _apply(self, changes: list[Change]) -> None:
        for change in changes:
            if isinstance(change, ServiceUpdated):
                spec = change.service
                key = (spec.name, spec.host_port[1])
                balancer = self._balancers.get(key)
                if balancer is None:
                    balancer = self._balancers[key] = Balancer(service=spec.name)
                # The caller's identity travels only over mTLS: unmeshed endpoints are out.
                balancer.update([ep for ep in spec.endpoints if ep.meshed])
            elif isinstance(change, ServiceRemoved):
                self._balancers.pop((change.name, split_host_port(change.address)[1]), None)

    # -- deciding --------------------------------------------------------------------

    def is_gateway(self, peer: str) -> bool:
        """A peer that forwards for others: a trusted gateway, or this gateway itself."""
        return peer == str(self.identity) or is_trusted_gateway(peer, self.trusted_gateways)

    def route(self, peer: str, header: TransportHeader) -> Route | Refused:
        """May `peer` reach what `header` names, and as which caller."""
        name = header.name.lower().rstrip(".")
        target = f"{name or '-'}:{header.port}"
        try:
            caller = caller_of(peer, header.caller, self.trusted_gateways)
        except ForgedCaller as e:
            return Refused(Reason.FORGED_CALLER, str(e), target, caller=peer)
        except BadCaller as e:
            return Refused(Reason.BAD_CALLER, str(e), target, caller=peer)
        who = caller.identity
        key = self.service_key(name)
        svc = self._services.get(key) if key is not None else None
        if key is None or svc is None:
            why = (f"no Service {name} in this cluster" if name else
                   "the transport header names no service")
            return Refused(Reason.UNKNOWN_SERVICE, why, target, caller=who)
        labels = (svc.get("metadata") or {}).get("labels") or {}
        if labels.get(MIRRORED_LABEL) == "true" and self.is_gateway(peer):
            return Refused(Reason.LOOP, f"gateway {peer} forwards to {name}, a mirror of a "
                           "remote Service, which would reach yet another gateway", target,
                           service=name, caller=who)
        label_key, label_value = self.exported
        # Only the peer itself counts: a forwarded caller is another cluster's.
        own_vm = caller.gateway is None and self.is_local_workload(peer)
        if labels.get(label_key) != label_value and not own_vm:
            return Refused(Reason.NOT_EXPORTED, f"Service {key[0]}/{key[1]} lacks the label "
                           f"{label_key}={label_value}", target, service=name, caller=who)
        spec = self.index.by_name(name, header.port)
        if spec is None:
            return Refused(Reason.UNKNOWN_PORT, f"Service {key[0]}/{key[1]} has no TCP port "
                           f"{header.port} with a cluster IP", target, service=name, caller=who)
        return Route(spec, key, caller)

    def choose(self, route: Route, *, avoid: Collection[EndpointState] = ()
               ) -> Target | Refused:
        """An endpoint for `route` whose Pod port admits the caller; `avoid` holds the
        endpoints this connection tried already."""
        spec, who = route.service, route.caller.identity
        balancer = self._balancers.get((spec.name, spec.host_port[1]))
        pick = balancer.pick(avoid=avoid) if balancer is not None else None
        if pick is None:
            return Refused(Reason.NO_ENDPOINTS, f"{spec.name} has no ready meshed endpoint",
                           route.target, service=spec.name, caller=who)
        admitted = self._admit(route, pick.endpoint.spec)
        if isinstance(admitted, Refused):
            pick.released()
            return admitted
        pod_key, decision = admitted
        return Target(pick, pod_key, decision)

    def recheck(self, peer: str, header: TransportHeader, endpoint: EndpointSpec
                ) -> Refused | None:
        """Why a connection relayed earlier to `endpoint` may not go on under what is
        known now (the Service unexported or gone, the endpoint's policy leaving the
        caller out), or None when it may."""
        route = self.route(peer, header)
        if isinstance(route, Refused):
            return route
        admitted = self._admit(route, endpoint)
        return admitted if isinstance(admitted, Refused) else None

    def _admit(self, route: Route, endpoint: EndpointSpec) -> tuple[ObjKey, Decision] | Refused:
        """The Pod or ExternalWorkload behind `endpoint`, and its port's decision for the
        route's caller."""
        spec, who = route.service, route.caller.identity
        key = self.index.endpoint_pod(route.key, endpoint)
        pod = self._pods.get(key) if key is not None else None
        if key is not None and pod is not None:
            what, obj, kind, names = "pod", pod, Workload.POD, port_names(pod)
        else:
            key = self.index.endpoint_workload(route.key, endpoint)
            vm = self._workloads.get(key) if key is not None else None
            if key is None or vm is None:
                return Refused(Reason.NO_ENDPOINTS, f"endpoint {endpoint.address} of "
                               f"{spec.name} is no Pod or ExternalWorkload the gateway knows, "
                               "so its policy cannot be read", route.target,
                               service=spec.name, caller=who)
            what, obj, kind, names = "externalworkload", vm, Workload.EXTERNAL, \
                workload_ports(vm)
        labels = (obj.get("metadata") or {}).get("labels") or {}
        policy = self.policy.for_port(key[0], labels, endpoint.target_port,
                                      port_names=names, kind=kind)
        decision = policy.allows(who)
        if not decision.allowed:
            return Refused(Reason.UNAUTHORIZED, f"{what} {key[0]}/{key[1]} port "
                           f"{endpoint.target_port}: {decision.reason}", route.target,
                           service=spec.name, caller=who)
        return key, decision

    def service_key(self, name: str) -> ObjKey | None:
        """(namespace, name) of ``<svc>.<ns>.svc.<cluster-domain>``; None for other names."""
        suffix = f".svc.{self.cluster_domain}"
        if not name.endswith(suffix):
            return None
        svc, dot, ns = name.removesuffix(suffix).partition(".")
        if not dot or not svc or not ns or "." in ns:
            return None
        return ns, svc


def _remember(store: dict[ObjKey, Obj], event: str, obj: Obj) -> None:
    meta = obj.get("metadata") or {}
    key = (str(meta.get("namespace") or ""), str(meta.get("name")))
    if event == DELETED:
        store.pop(key, None)
    else:
        store[key] = obj
