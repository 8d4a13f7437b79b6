"""Mirror Services and their EndpointSlices: their names, their labels and
annotations, and the objects the controller writes, computed from a remote
Service, the Link's spec and the gateway's endpoints. Pure logic, no I/O.

Ownership is written on the objects, never kept only in memory: a mirror
carries ``mirror.meshgate.io/mirrored-service=true``, the cluster it mirrors
(``mirror.meshgate.io/cluster-name``) and the remote Service's fully-qualified
name (``mirror.meshgate.io/remote-svc-fq-name``), so a restarted controller
knows which local objects are its own and what they stand for.
"""

from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mesh.discovery.failover import MIRRORED_LABEL
from mesh.discovery.index import (
    CLUSTER_LABEL,
    GATEWAY_IDENTITY_ANNOTATION,
    MANAGED_BY_LABEL,
    MIRROR_MANAGER,
    REMOTE_NAME_ANNOTATION,
    SERVICE_NAME_LABEL,
)
from mirror.link import LinkSpec

Obj = Mapping[str, Any]

# The keys the destination index reads from a mirror and its EndpointSlices are the index's.
PREFIX = "mirror.meshgate.io/"
REMOTE_DISCOVERY_LABEL = PREFIX + "remote-discovery"
"""On mirrors whose endpoints are discovered in the remote cluster, not at its gateway."""
REMOTE_SERVICE_LABEL = PREFIX + "remote-service"
REMOTE_VERSION_ANNOTATION = PREFIX + "remote-resource-version"
REMOTE_FQ_NAME_ANNOTATION = REMOTE_NAME_ANNOTATION
FULL_NAME_ANNOTATION = PREFIX + "full-mirror-name"
"""The name `<service>-<cluster>` a mirror would have had, when it had to be shortened."""
MANAGED_BY = MIRROR_MANAGER

MAX_NAME = 63
_HASH_CHARS = 8
_NEVER_COPIED = (
    PREFIX + "*",  # the remote cluster's own mirror markers (exported, ...) stay there
    "kubectl.kubernetes.io/last-applied-configuration",  # describes the remote object
    "service.kubernetes.io/topology-aware-hints",  # zones are not multicluster-aware
    "service.kubernetes.io/topology-mode",
)


@dataclass(frozen=True, order=True)
class RemoteKey:
    """A remote Service: (namespace, name) in the linked cluster."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, order=True)
class Placement:
    """Where a remote Service's mirror lives in the local cluster."""

    namespace: str
    name: str
    full_name: str
    """``<service>-<cluster>``; differs from `name` when that had to be shortened."""

    @property
    def truncated(self) -> bool:
        return self.name != self.full_name

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, order=True)
class GatewayEndpoint:
    """One address of the remote gateway, and whether its probe says it is alive."""

    address: str
    ready: bool


def mirror_name(service: str, cluster: str) -> tuple[str, str]:
    """(name, full name): ``<service>-<cluster>``, shortened to 63 characters when
    longer by keeping its start and appending 8 hex digits of its SHA-256."""
    full = f"{service}-{cluster}"
    if len(full) <= MAX_NAME:
        return full, full
    digest = hashlib.sha256(full.encode()).hexdigest()[:_HASH_CHARS]
    return f"{full[:MAX_NAME - _HASH_CHARS - 1].rstrip('-')}-{digest}", full


def placement(key: RemoteKey, link: LinkSpec) -> Placement:
    name, full = mirror_name(key.name, link.target_cluster_name)
    return Placement(link.local_namespace(key.namespace), name, full)


def remote_key(obj: Obj) -> RemoteKey | None:
    """The remote Service a local mirror (or its slice) stands for, from its
    fully-qualified-name annotation ``<name>.<namespace>.svc.<domain>``."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    name, _, rest = str(annotations.get(REMOTE_FQ_NAME_ANNOTATION) or "").partition(".")
    namespace = rest.partition(".")[0]
    return RemoteKey(namespace, name) if name and namespace else None


def owned(obj: Obj, cluster: str) -> bool:
    """Whether a local object is a mirror (or mirror slice) of `cluster`."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return labels.get(MIRRORED_LABEL) == "true" and labels.get(CLUSTER_LABEL) == cluster


def is_mirror(obj: Obj) -> bool:
    """A mirror of any cluster; mirrors are never mirrored again (two-way links)."""
    return ((obj.get("metadata") or {}).get("labels") or {}).get(MIRRORED_LABEL) == "true"


def _excluded(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def copied(values: Mapping[str, str] | None, excluded: Sequence[str]) -> dict[str, str]:
    """Labels or annotations of a remote Service that its mirror carries: all but
    meshgate's own mirror keys, a few cluster-local ones, and those the Link
    excludes (exact keys or shell-style patterns such as ``example.com/*``)."""
    patterns = (*_NEVER_COPIED, *excluded)
    return {k: str(v) for k, v in (values or {}).items() if not _excluded(k, patterns)}


def remote_discovery(remote: Obj, link: LinkSpec) -> bool:
    labels = (remote.get("metadata") or {}).get("labels") or {}
    return link.remote_discovery_selector is not None and \
        link.remote_discovery_selector.matches(labels)


def mirror_service(remote: Obj, link: LinkSpec) -> dict[str, Any]:
    """The local mirror Service of `remote`: no selector, the remote's ports
    (``targetPort`` = ``port``), its labels and annotations as `copied`, plus
    the mirror's own."""
    meta = remote.get("metadata") or {}
    key = RemoteKey(str(meta.get("namespace")), str(meta.get("name")))
    where = placement(key, link)
    cluster = link.target_cluster_name
    labels = copied(meta.get("labels"), link.excluded_labels)
    labels.update({MIRRORED_LABEL: "true", CLUSTER_LABEL: cluster})
    if remote_discovery(remote, link):
        labels.update({REMOTE_DISCOVERY_LABEL: cluster, REMOTE_SERVICE_LABEL: key.name})
    annotations = copied(meta.get("annotations"), link.excluded_annotations)
    annotations.update({
        REMOTE_VERSION_ANNOTATION: str(meta.get("resourceVersion") or ""),
        REMOTE_FQ_NAME_ANNOTATION: f"{key.name}.{key.namespace}.svc."
                                   f"{link.target_cluster_domain}",
    })
    if where.truncated:
        annotations[FULL_NAME_ANNOTATION] = where.full_name
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": where.name, "namespace": where.namespace, "labels": labels,
                     "annotations": annotations},
        "spec": {"type": "ClusterIP", "ports": mirror_ports(remote)},
    }


def mirror_ports(remote: Obj) -> list[dict[str, Any]]:
    out = []
    for p in (remote.get("spec") or {}).get("ports") or []:
        if not isinstance(p.get("port"), int):
            continue
        port: dict[str, Any] = {"port": p["port"], "protocol": p.get("protocol") or "TCP",
                                "targetPort": p["port"]}
        if p.get("name"):
            port["name"] = p["name"]
        if p.get("appProtocol"):
            port["appProtocol"] = p["appProtocol"]
        out.append(port)
    return out


def mirror_slices(service: Obj, link: LinkSpec, gateway: Sequence[GatewayEndpoint], *,
                  owner_uid: str | None = None) -> dict[str, dict[str, Any]]:
    """The EndpointSlices of a mirror Service, by name: the gateway's addresses
    on `gatewayPort` for every Service port (by port name), ready as the probe
    says. One slice per address family; an IPv4 slice with no endpoints when
    the gateway has no address yet. Remote-discovery mirrors have none."""
    meta = service.get("metadata") or {}
    labels = meta.get("labels") or {}
    if REMOTE_DISCOVERY_LABEL in labels:
        return {}
    name, namespace = str(meta["name"]), str(meta["namespace"])
    ports = [{"name": p.get("name") or "", "port": link.gateway_port,
              "protocol": p.get("protocol") or "TCP"}
             for p in (service.get("spec") or {}).get("ports") or []]
    annotations = {REMOTE_FQ_NAME_ANNOTATION:
                   str((meta.get("annotations") or {}).get(REMOTE_FQ_NAME_ANNOTATION) or "")}
    if link.gateway_identity:
        annotations[GATEWAY_IDENTITY_ANNOTATION] = link.gateway_identity
    families: dict[str, list[GatewayEndpoint]] = {"IPv4": []}
    for ep in gateway:
        family = "IPv6" if ipaddress.ip_address(ep.address).version == 6 else "IPv4"
        families.setdefault(family, []).append(ep)
    out: dict[str, dict[str, Any]] = {}
    for family, endpoints in families.items():
        if family == "IPv6" and not endpoints:
            continue
        slice_name = name if family == "IPv4" else f"{name}-ipv6"
        body: dict[str, Any] = {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": slice_name, "namespace": namespace,
                "labels": {SERVICE_NAME_LABEL: name, MANAGED_BY_LABEL: MANAGED_BY,
                           MIRRORED_LABEL: "true", CLUSTER_LABEL: link.target_cluster_name},
                "annotations": annotations,
            },
            "addressType": family,
            "endpoints": [{"addresses": [ep.address],
                           "conditions": {"ready": ep.ready, "serving": ep.ready,
                                          "terminating": False}}
                          for ep in sorted(endpoints)],
            "ports": ports,
        }
        if owner_uid:
            body["metadata"]["ownerReferences"] = [{
                "apiVersion": "v1", "kind": "Service", "name": name, "uid": owner_uid,
                "controller": True, "blockOwnerDeletion": True}]
        out[slice_name] = body
    return out


# -- comparing and patching ---------------------------------------------------------

_SERVICE_FIELDS = ("type", "ports", "selector")
_SLICE_FIELDS = ("addressType", "endpoints", "ports")


def _meta_same(current: Obj, desired: Obj, *, owners: bool = False) -> bool:
    have, want = current.get("metadata") or {}, desired.get("metadata") or {}
    keys = ("labels", "annotations", "ownerReferences") if owners else ("labels", "annotations")
    return all(_owner_uids(have.get(k)) == _owner_uids(want.get(k)) if k == "ownerReferences"
               else (have.get(k) or {}) == (want.get(k) or {}) for k in keys)


def _owner_uids(refs: Any) -> list[str]:
    return sorted(str(r.get("uid")) for r in refs or [])


def _port_view(ports: Any) -> list[tuple[Any, ...]]:
    return [(p.get("name") or "", p.get("port"), p.get("protocol") or "TCP",
             p.get("targetPort", p.get("port")), p.get("appProtocol") or "")
            for p in ports or []]


def service_up_to_date(current: Obj, desired: Obj) -> bool:
    have, want = current.get("spec") or {}, desired.get("spec") or {}
    return (_meta_same(current, desired)
            and (have.get("type") or "ClusterIP") == want.get("type")
            and _port_view(have.get("ports")) == _port_view(want.get("ports"))
            and not have.get("selector"))


def slice_up_to_date(current: Obj, desired: Obj) -> bool:
    return _meta_same(current, desired, owners=True) and all(
        _endpoints_view(current.get(k)) == _endpoints_view(desired.get(k)) if k == "endpoints"
        else current.get(k) == desired.get(k) for k in _SLICE_FIELDS)


def _endpoints_view(endpoints: Any) -> list[tuple[Any, ...]]:
    return [(tuple(e.get("addresses") or ()), bool((e.get("conditions") or {}).get("ready")),
             bool((e.get("conditions") or {}).get("serving")))
            for e in endpoints or []]


def _map_patch(have: Any, want: Mapping[str, str]) -> dict[str, str | None]:
    """A merge patch turning the map `have` into `want` (keys it lacks are nulled)."""
    patch: dict[str, str | None] = {k: None for k in (have or {}) if k not in want}
    patch.update(want)
    return patch


def merge_patch(current: Obj, desired: Obj, fields: Sequence[str]) -> dict[str, Any]:
    """A JSON merge patch that makes `current` what `desired` says in its labels,
    annotations, owner references and the named top-level or spec fields."""
    have, want = current.get("metadata") or {}, desired.get("metadata") or {}
    meta: dict[str, Any] = {
        "labels": _map_patch(have.get("labels"), want.get("labels") or {}),
        "annotations": _map_patch(have.get("annotations"), want.get("annotations") or {}),
    }
    if "ownerReferences" in want:
        meta["ownerReferences"] = want["ownerReferences"]
    patch: dict[str, Any] = {"metadata": meta}
    if "spec" in desired:
        patch["spec"] = {f: desired["spec"].get(f) for f in fields}
    else:
        patch.update({f: desired.get(f) for f in fields})
    return patch


def service_patch(current: Obj, desired: Obj) -> dict[str, Any]:
    return merge_patch(current, desired, _SERVICE_FIELDS)


def slice_patch(current: Obj, desired: Obj) -> dict[str, Any]:
    """addressType cannot change: a slice of the wrong family is replaced instead."""
    return merge_patch(current, desired, ("endpoints", "ports"))
