"""ExternalWorkloads: VMs enrolled in the mesh, as the control plane reads them.

This module owns the names the control plane, the gateway and the VM agent
share (the CRD's group, version and plural, the Ready condition the agent
heartbeats, the managed-by value of the slices made from workloads) and what
is read from one ExternalWorkload object, without I/O.

`Heartbeats` says whether a workload's heartbeat is fresh. It remembers, by
the reader's own clock, when it last saw the Ready condition's
``lastProbeTime`` change; the VM's clock is never compared with ours, so skew
between them does not matter. What it sees first counts as just seen, so a
restarted controller gives every workload a full window before it ages out.

The EndpointSlices made from workloads are computed in
`mesh.control.workloadslices` and written by `mesh.control.workloads`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

GROUP = "workload.meshgate.io"
VERSION = "v1beta1"
KIND = "ExternalWorkload"
PLURAL = "externalworkloads"
API_VERSION = f"{GROUP}/{VERSION}"
MANAGED_BY = "meshgate-external-workloads-controller"
"""The ``endpointslice.kubernetes.io/managed-by`` value of the slices of this controller."""
READY = "Ready"
"""The condition type the VM agent heartbeats: status "True", a fresh lastProbeTime."""
LEFT_REASON = "Left"
"""The Ready condition's reason once the agent has left (`meshgate vm leave`)."""
INBOUND_PORT = 4143
"""The VM proxy's inbound port: where the mesh reaches an ExternalWorkload."""
DEFAULT_INTERVAL = 10.0
DEFAULT_MISSED = 3

Obj = Mapping[str, Any]
ObjKey = tuple[str, str]
"""(namespace, name)"""


def key_of(obj: Obj) -> ObjKey:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def ready_condition(obj: Obj) -> Obj | None:
    """The workload's Ready condition, if it has one."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == READY:
            return cond
    return None


def workload_ips(obj: Obj) -> list[str]:
    """The workload's IP addresses, in order, those that are no address left out."""
    out = []
    for entry in (obj.get("spec") or {}).get("workloadIPs") or []:
        ip = entry.get("ip") if isinstance(entry, Mapping) else None
        try:
            out.append(str(ipaddress.ip_address(str(ip))))
        except ValueError:
            continue
    return out


def workload_identity(obj: Obj) -> str:
    """``spec.meshTLS.identity`` as written ("" when absent); not checked here."""
    mesh_tls = (obj.get("spec") or {}).get("meshTLS") or {}
    return str(mesh_tls.get("identity") or "") if isinstance(mesh_tls, Mapping) else ""


def workload_ports(obj: Obj) -> dict[str, int]:
    """The workload's named TCP ports: name -> number."""
    names: dict[str, int] = {}
    for port in (obj.get("spec") or {}).get("ports") or []:
        if (isinstance(port, Mapping) and port.get("name") and isinstance(port.get("port"), int)
                and (port.get("protocol") or "TCP") == "TCP"):
            names[str(port["name"])] = int(port["port"])
    return names


class Heartbeats:
    """When each workload's heartbeat was last seen to change, by our own clock.

    A workload is fresh while less than ``interval * missed`` seconds have passed
    since then.
    """

    def __init__(self, *, interval: float = DEFAULT_INTERVAL,
                 missed: int = DEFAULT_MISSED) -> None:
        if interval <= 0 or missed < 1:
            raise ValueError("the heartbeat interval must be positive and missed at least 1")
        self.window = interval * missed
        self._seen: dict[ObjKey, tuple[str, float]] = {}
        """Workload -> (the lastProbeTime last seen, when it was first seen with it)."""

    def observe(self, obj: Obj, now: float) -> None:
        """Take the workload as an informer delivered it."""
        cond = ready_condition(obj) or {}
        probe = str(cond.get("lastProbeTime") or "")
        key = key_of(obj)
        before = self._seen.get(key)
        if before is None or before[0] != probe:
            self._seen[key] = (probe, now)

    def forget(self, key: ObjKey) -> None:
        self._seen.pop(key, None)

    def fresh(self, key: ObjKey, now: float) -> bool:
        seen = self._seen.get(key)
        return seen is not None and now - seen[1] < self.window

    def expires(self, key: ObjKey, now: float) -> float | None:
        """Seconds until the workload's heartbeat goes stale, None when it is already."""
        seen = self._seen.get(key)
        if seen is None:
            return None
        left = seen[1] + self.window - now
        return left if left > 0 else None


def workload_ready(obj: Obj, heartbeats: Heartbeats, now: float) -> bool:
    """Ready: its Ready condition says "True", not left, and its heartbeat is fresh."""
    cond = ready_condition(obj)
    if cond is None or cond.get("status") != "True" or cond.get("reason") == LEFT_REASON:
        return False
    return heartbeats.fresh(key_of(obj), now)
