"""The destination index: what each Service port resolves to, as the proxy's
`ServiceSpec`, kept current from Services, EndpointSlices, Pods and
ExternalWorkloads.

The index is fed watch events as plain dicts (`service_event`, `slice_event`,
`pod_event`, `workload_event`) and answers with the `Change`s they cause; it
does no I/O, so it is tested with dicts and served by whoever feeds it. Updates
are incremental: a Service or EndpointSlice event recomputes that one Service,
and a Pod (or ExternalWorkload) event recomputes only the Services whose slices
point at it (``targetRef``), and only when what the index reads from it (a
Pod's inbound port annotation and ServiceAccount, a workload's identity)
changed.

One `ServiceSpec` per Service port (TCP only; headless and ExternalName
Services have no address to redirect and are skipped): named
``<svc>.<ns>.svc.<cluster-domain>``, at ``<clusterIP>:<port>``, opaque when
the Service's ``config.meshgate.io/opaque-ports`` annotation lists the port
(by number, range or name). Its endpoints are the ready endpoints of the
Service's slices, on the slice port of the same name. A meshed Pod (annotation
``meshgate.io/inbound-port``) is reached on that port with the identity of its
ServiceAccount, but for the ports its ``config.meshgate.io/skip-inbound-ports``
lists; an unmeshed one (or a skipped port) directly on the target port, without
identity.
An endpoint whose Pod the index has not seen (yet, or any more) is left out
until the Pod shows up: reaching a meshed Pod in plain text would fail. An
endpoint whose targetRef is an ExternalWorkload (a VM) is reached on the VM
proxy's inbound port (4143) with the workload's ``spec.meshTLS.identity``, once
the index has seen the workload; one whose identity is no identity name is left
out, with a warning.

A Service annotated ``failover.meshgate.io/clusters`` has its endpoints in
priority groups: its own, then its mirrors' gateway endpoints, in the order
`mesh.discovery.failover` computes. Mirror Service and slice events recompute
the local Service the mirror stands for too.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mesh.control.externalworkloads import INBOUND_PORT as WORKLOAD_INBOUND_PORT
from mesh.control.externalworkloads import KIND as WORKLOAD_KIND
from mesh.control.externalworkloads import workload_identity
from mesh.discovery import failover
from mesh.discovery.failover import CLUSTER_LABEL, REMOTE_NAME_ANNOTATION, MirrorRef
from mesh.errors import IdentityError
from mesh.identity.names import DEFAULT_CONTROL_NS, Identity
from mesh.informer import DELETED
from mesh.portlist import port_ranges, ports
from mesh.proxy.discovery import EndpointSpec, ServiceSpec, canonical_address
from mesh.structs import FieldError

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
INBOUND_PORT_ANNOTATION = "meshgate.io/inbound-port"
OPAQUE_PORTS_ANNOTATION = "config.meshgate.io/opaque-ports"
SKIP_INBOUND_ANNOTATION = "config.meshgate.io/skip-inbound-ports"
# What the mirror controller (mirror/) puts on the EndpointSlices of a mirror Service,
# whose endpoints are a linked cluster's gateway.
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MIRROR_MANAGER = "mirror.meshgate.io"
GATEWAY_IDENTITY_ANNOTATION = "mirror.meshgate.io/remote-gateway-identity"

Obj = Mapping[str, Any]
ObjKey = tuple[str, str]
"""(namespace, name)"""
Address = tuple[str, int]
"""A canonical (host, port), as `canonical_address` spells it."""
RefKey = tuple[str, str, str]
"""(kind, namespace, name) of an endpoint's targetRef: a Pod or an ExternalWorkload."""


@dataclass(frozen=True)
class ServiceUpdated:
    """A service port appeared or changed; `service` is its whole new state."""

    service: ServiceSpec


@dataclass(frozen=True)
class ServiceRemoved:
    """A service port went away (its Service was deleted, lost the port or its VIP)."""

    address: str
    name: str


Change = ServiceUpdated | ServiceRemoved


@dataclass(frozen=True)
class _PodView:
    """What the index reads from a Pod; Pod events that leave it alone change nothing."""

    inbound_port: int | None
    service_account: str
    skip_inbound: frozenset[int] = frozenset()
    """Ports reached directly, not through the pod's proxy (annotation
    ``config.meshgate.io/skip-inbound-ports``)."""


@dataclass(frozen=True)
class _WorkloadView:
    """What the index reads from an ExternalWorkload: its identity, if it is usable."""

    identity: str | None


def address_key(change: Change) -> Address:
    """The canonical VIP:port a change is about."""
    if isinstance(change, ServiceUpdated):
        return canonical_address(*change.service.host_port)
    host, _, port = change.address.rpartition(":")
    return canonical_address(host.strip("[]"), int(port))


class DestinationIndex:
    def __init__(self, *, trust_domain: str, cluster_domain: str = "cluster.local",
                 control_ns: str = DEFAULT_CONTROL_NS, cluster_name: str = "") -> None:
        self.trust_domain = trust_domain
        self.cluster_name = cluster_name
        self.cluster_domain = cluster_domain.rstrip(".")
        self.control_ns = control_ns
        self._services: dict[ObjKey, Obj] = {}
        self._slices: dict[ObjKey, dict[str, Obj]] = {}
        """Service key -> slice name -> slice."""
        self._slice_owner: dict[ObjKey, ObjKey] = {}
        """Slice key -> the Service key its label named when last seen."""
        self._pods: dict[ObjKey, _PodView] = {}
        self._workloads: dict[ObjKey, _WorkloadView] = {}
        self._refs: dict[RefKey, set[ObjKey]] = {}
        """Pod or ExternalWorkload -> Services whose slices reference it."""
        self._service_refs: dict[ObjKey, set[RefKey]] = {}
        self._specs: dict[ObjKey, dict[Address, ServiceSpec]] = {}
        self._by_address: dict[Address, ServiceSpec] = {}
        self._by_name: dict[tuple[str, int], ServiceSpec] = {}
        self._mirror_refs: dict[ObjKey, MirrorRef] = {}
        """Mirror Service -> the remote Service it stands for."""
        self._mirrors: dict[tuple[ObjKey, str], set[ObjKey]] = {}
        """(local Service, cluster) -> mirrors of it from that cluster, in its namespace."""
        self._failover_problems: dict[ObjKey, list[str]] = {}
        """What was last logged of a Service's failover annotations (logged once)."""

    # -- lookups -------------------------------------------------------------------

    def services(self) -> list[ServiceSpec]:
        return list(self._by_address.values())

    def by_address(self, host: str, port: int) -> ServiceSpec | None:
        """The service whose VIP:port is ``host:port``."""
        return self._by_address.get(canonical_address(host, port))

    def by_name(self, name: str, port: int) -> ServiceSpec | None:
        """The service ``name`` (``<svc>.<ns>.svc.<domain>``) on VIP port ``port``."""
        return self._by_name.get((name.lower().rstrip("."), port))

    def __len__(self) -> int:
        return len(self._by_address)

    def endpoint_pod(self, service: ObjKey, endpoint: EndpointSpec) -> ObjKey | None:
        """The Pod behind `endpoint` of the Service `service` (namespace, name), as its
        EndpointSlices' targetRefs say; None for endpoints that are no Pod."""
        for kind, pod_key in self._targets_at(service, endpoint):
            pod = self._pods.get(pod_key) if kind == "Pod" else None
            # Pods may share an address (host networking): the inbound port tells them apart.
            if pod is not None and (endpoint.identity is None or
                                    pod.inbound_port == endpoint.host_port[1]):
                return pod_key
        return None

    def endpoint_workload(self, service: ObjKey, endpoint: EndpointSpec) -> ObjKey | None:
        """The ExternalWorkload (a VM) behind `endpoint` of the Service `service`; None for
        endpoints that are none."""
        for kind, key in self._targets_at(service, endpoint):
            if kind == WORKLOAD_KIND and key in self._workloads:
                return key
        return None

    def _targets_at(self, service: ObjKey, endpoint: EndpointSpec
                    ) -> Iterator[tuple[str, ObjKey]]:
        """(kind, key) of what the Service's EndpointSlices say is at `endpoint`'s address."""
        host = canonical_address(endpoint.host_port[0], 0)[0]
        for slice_name in sorted(self._slices.get(service, {})):
            for ep in self._slices[service][slice_name].get("endpoints") or []:
                ref = ep.get("targetRef") or {}
                if ep.get("addresses") and \
                        canonical_address(str(ep["addresses"][0]), 0)[0] == host:
                    yield (str(ref.get("kind") or ""),
                           (str(ref.get("namespace") or service[0]), str(ref.get("name"))))

    # -- events --------------------------------------------------------------------

    def service_event(self, event: str, obj: Obj) -> list[Change]:
        key = _key(obj)
        served_before = self._served_by(key)
        if event == DELETED:
            self._services.pop(key, None)
        else:
            self._services[key] = obj
        self._note_mirror(key, None if event == DELETED else failover.mirror_ref(obj))
        changes = self._recompute(key)
        # A mirror that stands for another Service now leaves the old one's groups.
        if served_before is not None and served_before != self._served_by(key):
            changes += self._recompute_one(served_before)
        return changes

    def slice_event(self, event: str, obj: Obj) -> list[Change]:
        key = _key(obj)
        owner = self._slice_owner.pop(key, None)
        changes: list[Change] = []
        if owner is not None:
            self._slices.get(owner, {}).pop(key[1], None)
            if not self._slices.get(owner):
                self._slices.pop(owner, None)
        service = ((obj.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
        new_owner = (key[0], service) if service and event != DELETED else None
        if new_owner is not None:
            self._slices.setdefault(new_owner, {})[key[1]] = obj
            self._slice_owner[key] = new_owner
        # A slice relabelled to another Service leaves its old one too.
        for svc in dict.fromkeys(k for k in (owner, new_owner) if k is not None):
            changes += self._recompute(svc)
        return changes

    def pod_event(self, event: str, obj: Obj) -> list[Change]:
        key = _key(obj)
        view, problem = (None, None) if event == DELETED else _pod_view(obj)
        if self._pods.get(key) == view:
            return []
        if problem:
            log.warning("pod annotation unusable pod=%s/%s cause=%s", key[0], key[1], problem)
        if view is None:
            self._pods.pop(key, None)
        else:
            self._pods[key] = view
        return self._recompute_referring(("Pod", *key))

    def workload_event(self, event: str, obj: Obj) -> list[Change]:
        """An ExternalWorkload (a VM) was added, changed or deleted."""
        key = _key(obj)
        view = None if event == DELETED else self._workload_view(key, obj)
        if self._workloads.get(key) == view:
            return []
        if view is None:
            self._workloads.pop(key, None)
        else:
            self._workloads[key] = view
        return self._recompute_referring((WORKLOAD_KIND, *key))

    def _workload_view(self, key: ObjKey, obj: Obj) -> _WorkloadView:
        name = workload_identity(obj)
        try:
            identity = Identity.parse(name)
            if identity.trust_domain != self.trust_domain:
                raise IdentityError(f"it is of trust domain {identity.trust_domain}, not "
                                    f"{self.trust_domain}")
        except IdentityError as e:
            log.warning("external workload endpoints skipped workload=%s/%s identity=%r "
                        "cause=%s", key[0], key[1], name, e)
            return _WorkloadView(None)
        return _WorkloadView(identity.dns_name)

    def _recompute_referring(self, ref: RefKey) -> list[Change]:
        changes: list[Change] = []
        for svc in sorted(self._refs.get(ref, ())):
            changes += self._recompute(svc)
        return changes

    # -- failover: which mirrors stand for which Service --------------------------------

    def _note_mirror(self, key: ObjKey, ref: MirrorRef | None) -> None:
        old = self._mirror_refs.pop(key, None)
        if old is not None:
            where = ((key[0], old.name), old.cluster)
            self._mirrors.get(where, set()).discard(key)
            if not self._mirrors.get(where, True):
                del self._mirrors[where]
        # Only a mirror in the namespace of the Service it stands for is its failover.
        if ref is not None and ref.namespace == key[0]:
            self._mirror_refs[key] = ref
            self._mirrors.setdefault(((key[0], ref.name), ref.cluster), set()).add(key)

    def _served_by(self, key: ObjKey) -> ObjKey | None:
        """The local Service whose failover groups the mirror `key` may be in."""
        ref = self._mirror_refs.get(key)
        return (key[0], ref.name) if ref is not None else None

    def _mirror_of(self, key: ObjKey, cluster: str) -> ObjKey | None:
        found = sorted(self._mirrors.get((key, cluster), ()))
        return found[0] if found else None

    def _failover_plan(self, key: ObjKey, svc: Obj) -> failover.FailoverPlan | None:
        plan, problems = failover.plan(svc, local_cluster=self.cluster_name,
                                       mirror_of=lambda c: self._mirror_of(key, c))
        lines = [p.line(key) for p in problems]
        before = self._failover_problems.get(key, [])
        for line in lines:
            if line not in before:  # each problem once, not on every endpoint change
                log.warning("%s", line)
        if lines:
            self._failover_problems[key] = lines
        else:
            self._failover_problems.pop(key, None)
        return plan

    def _grouped(self, plan: failover.FailoverPlan, local: list[EndpointSpec],
                 port: Obj) -> list[EndpointSpec]:
        groups = []
        for group in plan.groups:
            if group.mirror is None:
                groups.append(local)
                continue
            mirror_port = _same_port(self._services.get(group.mirror), port)
            groups.append([] if mirror_port is None else [
                ep for ep in self._endpoints(group.mirror, mirror_port[0], mirror_port[1])
                if ep.authority is not None])  # only the mirror controller's slices
        return failover.ranked(groups)

    # -- computing one Service -----------------------------------------------------

    def _recompute(self, key: ObjKey) -> list[Change]:
        """Recompute `key`, and the Service it is a failover mirror of, if it is one."""
        changes = self._recompute_one(key)
        served = self._served_by(key)
        if served is not None and served != key:
            changes += self._recompute_one(served)
        return changes

    def _recompute_one(self, key: ObjKey) -> list[Change]:
        svc = self._services.get(key)
        if svc is None:
            self._failover_problems.pop(key, None)
        new = self._build(key, svc) if svc is not None else {}
        old = self._specs.pop(key, {})
        if new:
            self._specs[key] = new
        self._track_refs(key, svc is not None)
        changes: list[Change] = []
        for addr, spec in old.items():
            if addr not in new:
                if self._by_address.get(addr) is spec:
                    del self._by_address[addr]
                if self._by_name.get((spec.name, addr[1])) is spec:
                    del self._by_name[(spec.name, addr[1])]
                changes.append(ServiceRemoved(spec.address, spec.name))
        for addr, spec in new.items():
            before = old.get(addr)
            if before is not None and before == spec:
                new[addr] = before  # keep the object clients' caches already hold
                continue
            self._by_address[addr] = spec
            self._by_name[(spec.name, addr[1])] = spec
            changes.append(ServiceUpdated(spec))
        return changes

    def _track_refs(self, key: ObjKey, exists: bool) -> None:
        """Remember which Pods and ExternalWorkloads this Service's slices name, so
        their events find it."""
        now: set[RefKey] = set()
        if exists:
            for slice_obj in self._slices.get(key, {}).values():
                for ep in slice_obj.get("endpoints") or []:
                    ref = ep.get("targetRef") or {}
                    if ref.get("kind") in ("Pod", WORKLOAD_KIND) and ref.get("name"):
                        now.add((ref["kind"], ref.get("namespace") or key[0], ref["name"]))
        before = self._service_refs.pop(key, set())
        if now:
            self._service_refs[key] = now
        for ref in before - now:
            services = self._refs.get(ref)
            if services is not None:
                services.discard(key)
                if not services:
                    del self._refs[ref]
        for ref in now - before:
            self._refs.setdefault(ref, set()).add(key)

    def _build(self, key: ObjKey, svc: Obj) -> dict[Address, ServiceSpec]:
        spec = svc.get("spec") or {}
        vip = spec.get("clusterIP")
        if not vip or vip == "None" or spec.get("type") == "ExternalName":
            return {}  # headless or ExternalName: no address for the proxy to take
        try:
            ipaddress.ip_address(vip)
        except ValueError:
            log.warning("service skipped service=%s/%s cause=clusterIP %r is not an IP address",
                        key[0], key[1], vip)
            return {}
        ports = [p for p in spec.get("ports") or [] if (p.get("protocol") or "TCP") == "TCP"
                 and isinstance(p.get("port"), int)]
        annotations = (svc.get("metadata") or {}).get("annotations") or {}
        opaque = _opaque_ports(annotations.get(OPAQUE_PORTS_ANNOTATION), ports, key)
        name = f"{key[1]}.{key[0]}.svc.{self.cluster_domain}"
        plan = self._failover_plan(key, svc)
        out: dict[Address, ServiceSpec] = {}
        for port in ports:
            number = int(port["port"])
            endpoints = self._endpoints(key, port.get("name") or "", number)
            if plan is not None:
                endpoints = self._grouped(plan, endpoints, port)
            try:
                built = ServiceSpec(name=name, address=_join(vip, number),
                                    opaque=number in opaque, endpoints=endpoints,
                                    failback_s=plan.policy.failback_s if plan else None)
            except FieldError as e:
                log.warning("service port skipped service=%s/%s port=%d cause=%s", key[0],
                            key[1], number, e)
                continue
            out[canonical_address(vip, number)] = built
        return out

    def _endpoints(self, key: ObjKey, port_name: str, service_port: int
                   ) -> list[EndpointSpec]:
        found: dict[tuple[str, int], EndpointSpec] = {}
        slices = self._slices.get(key, {})
        for slice_name in sorted(slices):
            slice_obj = slices[slice_name]
            target = _slice_port(slice_obj, port_name)
            if target is None:
                continue  # these endpoints do not serve this Service port
            gateway = _gateway_of(slice_obj, key)
            for ep in slice_obj.get("endpoints") or []:
                built = (self._endpoint(key, slice_name, ep, target) if gateway is None else
                         _through_gateway(gateway, ep, target, service_port, key, slice_name))
                if built is not None:
                    found.setdefault((built.address, built.target_port), built)
        return [found[k] for k in sorted(found)]

    def _endpoint(self, key: ObjKey, slice_name: str, ep: Obj, target: int
                  ) -> EndpointSpec | None:
        # Kubernetes: an unknown (absent) ready condition is to be read as ready.
        if (ep.get("conditions") or {}).get("ready") is False:
            return None
        addresses = ep.get("addresses") or []
        if not addresses:
            return None
        host = str(addresses[0])
        ref = ep.get("targetRef") or {}
        identity: str | None = None
        port = target
        if ref.get("kind") == "Pod":
            pod_key = (ref.get("namespace") or key[0], str(ref.get("name")))
            pod = self._pods.get(pod_key)
            if pod is None:
                return None  # not seen yet, or gone: its slice will follow
            if pod.inbound_port is not None and target not in pod.skip_inbound:
                try:
                    identity = Identity(pod_key[0], pod.service_account, self.trust_domain,
                                        self.control_ns).dns_name
                except IdentityError as e:
                    log.warning("endpoint skipped pod=%s/%s cause=%s", *pod_key, e)
                    return None
                port = pod.inbound_port
        elif ref.get("kind") == WORKLOAD_KIND:
            workload = self._workloads.get((ref.get("namespace") or key[0],
                                            str(ref.get("name"))))
            if workload is None or workload.identity is None:
                return None  # not seen yet, gone, or no identity to check it by
            identity, port = workload.identity, WORKLOAD_INBOUND_PORT
        try:
            return EndpointSpec(address=_join(host, port), target_port=target,
                                identity=identity, zone=str(ep.get("zone") or ""),
                                cluster=self.cluster_name)
        except FieldError as e:
            log.warning("endpoint skipped service=%s/%s slice=%s address=%s cause=%s", key[0],
                        key[1], slice_name, host, e)
            return None


@dataclass(frozen=True)
class _Gateway:
    """A mirror Service's slice: its endpoints are a linked cluster's gateway."""

    identity: str
    cluster: str
    remote_name: str


def _gateway_of(slice_obj: Obj, key: ObjKey) -> _Gateway | None:
    """The gateway behind a slice the mirror controller wrote, else None. Only slices
    managed by the mirror controller are trusted to name a gateway identity."""
    meta = slice_obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(MANAGED_BY_LABEL) != MIRROR_MANAGER:
        return None
    annotations = meta.get("annotations") or {}
    identity = annotations.get(GATEWAY_IDENTITY_ANNOTATION)
    remote = annotations.get(REMOTE_NAME_ANNOTATION)
    if not identity or not remote:
        log.warning("mirror slice skipped service=%s/%s slice=%s cause=no %s or %s "
                    "annotation", key[0], key[1], meta.get("name"), GATEWAY_IDENTITY_ANNOTATION,
                    REMOTE_NAME_ANNOTATION)
        return None
    return _Gateway(str(identity), str(labels.get(CLUSTER_LABEL) or ""), str(remote))


def _through_gateway(gateway: _Gateway, ep: Obj, gateway_port: int, service_port: int,
                     key: ObjKey, slice_name: str) -> EndpointSpec | None:
    """A gateway endpoint: dialled with mTLS as the gateway, and told the remote name
    and port of the service in the transport header."""
    if (ep.get("conditions") or {}).get("ready") is False or not ep.get("addresses"):
        return None
    host = str(ep["addresses"][0])
    try:
        return EndpointSpec(address=_join(host, gateway_port), target_port=service_port,
                            identity=gateway.identity, cluster=gateway.cluster,
                            authority=gateway.remote_name)
    except FieldError as e:
        log.warning("endpoint skipped service=%s/%s slice=%s address=%s cause=%s", key[0],
                    key[1], slice_name, host, e)
        return None


def _pod_view(pod: Obj) -> tuple[_PodView, str | None]:
    """What the index reads from a Pod, and why its annotation was unusable, if it was."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    sa = str((pod.get("spec") or {}).get("serviceAccountName") or "default")
    raw = annotations.get(INBOUND_PORT_ANNOTATION)
    if raw is None:
        return _PodView(None, sa), None
    skip: frozenset[int] = frozenset()
    problem = None
    try:
        skip = frozenset(ports(port_ranges(str(annotations.get(SKIP_INBOUND_ANNOTATION, "")))))
    except ValueError as e:  # every port through the proxy, as without the annotation
        problem = f"annotation {SKIP_INBOUND_ANNOTATION}: {e}"
    text = str(raw).strip()
    if text.isascii() and text.isdigit() and 1 <= int(text) <= 65535:
        return _PodView(int(text), sa, skip), problem
    return _PodView(None, sa), (f"annotation {INBOUND_PORT_ANNOTATION}={raw!r} is not a port "
                                "number: the pod is treated as not meshed")


def _key(obj: Obj) -> ObjKey:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name"))


def _slice_port(slice_obj: Obj, name: str) -> int | None:
    """The slice's port for the Service port called ``name`` ("" when unnamed)."""
    for p in slice_obj.get("ports") or []:
        if (p.get("name") or "") == name and (p.get("protocol") or "TCP") == "TCP":
            port = p.get("port")
            return port if isinstance(port, int) and 1 <= port <= 65535 else None
    return None


def _same_port(mirror: Obj | None, port: Obj) -> tuple[str, int] | None:
    """(name, number) of the mirror Service's port that stands for the local `port`:
    the one of the same name, or of the same number when the local port is unnamed."""
    for p in ((mirror or {}).get("spec") or {}).get("ports") or []:
        if not isinstance(p.get("port"), int) or (p.get("protocol") or "TCP") != "TCP":
            continue
        if (port.get("name") and p.get("name") == port["name"]) or \
                (not port.get("name") and p["port"] == port["port"]):
            return str(p.get("name") or ""), int(p["port"])
    return None


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _opaque_ports(value: Any, ports: Iterable[Obj], key: ObjKey) -> set[int]:
    """The Service port numbers the annotation marks opaque; it lists port numbers,
    ``low-high`` ranges and port names, comma separated."""
    if not value:
        return set()
    names = {int(p["port"]): str(p.get("name") or "") for p in ports}
    out: set[int] = set()
    for item in (part.strip() for part in str(value).split(",")):
        low, dash, high = item.partition("-")
        if item.isascii() and item.isdigit():
            out.update(n for n in names if n == int(item))
        elif dash and low.isascii() and low.isdigit() and high.isascii() and high.isdigit():
            out.update(n for n in names if int(low) <= n <= int(high))
        elif item and item in names.values():
            out.update(n for n, name in names.items() if name == item)
        elif item:
            log.warning("opaque port ignored service=%s/%s annotation=%s item=%r cause=not a "
                        "port, range or port name of the Service", key[0], key[1],
                        OPAQUE_PORTS_ANNOTATION, item)
    return out

