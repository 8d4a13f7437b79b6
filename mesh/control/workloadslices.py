"""The EndpointSlices of a Service made from the ExternalWorkloads its selector matches,
computed without I/O (`desired_slices`), for the controller in `mesh.control.workloads`.

One endpoint per workload IP: ``addresses: [ip]``, ``conditions.ready`` while the
workload is ready (`mesh.control.externalworkloads.workload_ready`: its Ready
condition says "True" and its heartbeat is fresh), and ``targetRef`` naming the
ExternalWorkload. Each Service port's targetPort (a number, or the name of one of
the workload's ``spec.ports``) is resolved on the workload; workloads that resolve
the ports alike share a slice. A workload without an IP has no endpoint.

The slices carry ``kubernetes.io/service-name`` and
``endpointslice.kubernetes.io/managed-by=meshgate-external-workloads-controller``:
ownership lives on the objects, so a restarted controller finds its own (and its
orphans) by label, and no other endpoints controller takes them for its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mesh.control.externalworkloads import (
    KIND,
    MANAGED_BY,
    Heartbeats,
    Obj,
    ObjKey,
    key_of,
    workload_ips,
    workload_ports,
    workload_ready,
)
from mesh.discovery.index import MANAGED_BY_LABEL, SERVICE_NAME_LABEL


def selects(service: Obj, workload: Obj) -> bool:
    """Whether the Service's selector picks the workload (same namespace, every label)."""
    selector = (service.get("spec") or {}).get("selector")
    if not selector or key_of(service)[0] != key_of(workload)[0]:
        return False
    labels = (workload.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def wants_slices(service: Obj) -> bool:
    spec = service.get("spec") or {}
    return bool(spec.get("selector")) and spec.get("type") != "ExternalName"


@dataclass(frozen=True, order=True)
class _Port:
    name: str
    port: int
    protocol: str
    app_protocol: str


def _resolve(target: Any, names: Mapping[str, int]) -> int | None:
    if isinstance(target, int) and not isinstance(target, bool):
        return target
    if isinstance(target, str):
        return int(target) if target.isdigit() else names.get(target)
    return None


def _ports(service: Obj, workload: Obj) -> tuple[_Port, ...]:
    """The Service's ports as the workload serves them (ports it cannot resolve left out)."""
    names = workload_ports(workload)
    out = []
    for sp in (service.get("spec") or {}).get("ports") or []:
        resolved = _resolve(sp.get("targetPort", sp.get("port")), names)
        if resolved is not None:
            out.append(_Port(str(sp.get("name") or ""), resolved,
                             str(sp.get("protocol") or "TCP"), str(sp.get("appProtocol") or "")))
    return tuple(out)


def slice_name(service: str, ports: tuple[_Port, ...], address_type: str) -> str:
    digest = hashlib.sha256(repr((ports, address_type)).encode()).hexdigest()[:8]
    # Distinct from the names kube's (and localcluster's) controller gives its slices.
    return f"{service[:50]}-ew-{digest}"


def desired_slices(service: Obj, workloads: Iterable[Obj], *, heartbeats: Heartbeats,
                   now: float) -> dict[str, dict[str, Any]]:
    """The EndpointSlices of `service`, by name, from the workloads (of any namespace:
    those it does not select are skipped). A Service without a selector has none."""
    if not wants_slices(service):
        return {}
    meta = service.get("metadata") or {}
    ns, svc = key_of(service)
    groups: dict[tuple[tuple[_Port, ...], str], list[dict[str, Any]]] = {}
    for wl in sorted(workloads, key=key_of):
        if not selects(service, wl):
            continue
        ports = _ports(service, wl)
        ready = workload_ready(wl, heartbeats, now)
        for ip in workload_ips(wl):
            family = "IPv6" if ":" in ip else "IPv4"
            groups.setdefault((ports, family), []).append({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready, "terminating": False},
                "targetRef": _ref(wl),
            })
    labels = {SERVICE_NAME_LABEL: svc, MANAGED_BY_LABEL: MANAGED_BY}
    owner = {"apiVersion": "v1", "kind": "Service", "name": svc,
             "uid": str(meta.get("uid") or ""), "controller": True,
             "blockOwnerDeletion": True}
    out: dict[str, dict[str, Any]] = {}
    for (ports, family), endpoints in sorted(groups.items()):
        name = slice_name(svc, ports, family)
        out[name] = {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": labels,
                         "ownerReferences": [owner] if meta.get("uid") else []},
            "addressType": family,
            "endpoints": endpoints,
            "ports": [_port_entry(p) for p in ports],
        }
    return out


def _ref(workload: Obj) -> dict[str, str]:
    ns, name = key_of(workload)
    ref = {"kind": KIND, "namespace": ns, "name": name}
    uid = (workload.get("metadata") or {}).get("uid")
    if uid:
        ref["uid"] = str(uid)
    return ref


def _port_entry(port: _Port) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": port.name, "port": port.port, "protocol": port.protocol}
    if port.app_protocol:
        entry["appProtocol"] = port.app_protocol
    return entry


def owned(slice_obj: Obj) -> bool:
    labels = (slice_obj.get("metadata") or {}).get("labels") or {}
    return labels.get(MANAGED_BY_LABEL) == MANAGED_BY


def owner_service(slice_obj: Obj) -> ObjKey | None:
    """The Service a slice of this controller belongs to, by its label."""
    meta = slice_obj.get("metadata") or {}
    svc = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    return (str(meta.get("namespace") or ""), str(svc)) if svc and owned(slice_obj) else None


def up_to_date(current: Obj, desired: Obj) -> bool:
    """Whether a slice in the cluster already says all that `desired` says (the server
    may have added defaults of its own)."""
    cur_labels = (current.get("metadata") or {}).get("labels") or {}
    want_labels = (desired.get("metadata") or {}).get("labels") or {}
    return (all(cur_labels.get(k) == v for k, v in want_labels.items())
            and all(_holds(current.get(k), desired.get(k))
                    for k in ("addressType", "endpoints", "ports")))


def _holds(have: Any, want: Any) -> bool:
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(_holds(have.get(k), v)
                                                 for k, v in want.items())
    if isinstance(want, list):
        return (isinstance(have, list) and len(have) == len(want)
                and all(_holds(h, w) for h, w in zip(have, want, strict=True)))
    return bool(have == want)
