"""NodePort allocation for Services of type NodePort and LoadBalancer, as
kube-apiserver's service registry does it: every port gets a node port from
30000-32767 unless the request names one; a named port must be in range and
free; a port kept across an update keeps its node port; one freed by a type
change or a delete goes back to the pool.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from localcluster.errors import ApiError, Cause
from localcluster.store import Event, EventType, Store

NODE_PORT_RANGE = range(30000, 32768)
SERVICES_KEY = ("", "services")


def node_ports(svc: Mapping[str, Any] | None) -> set[int]:
    spec = (svc or {}).get("spec") or {}
    ports = {int(p["nodePort"]) for p in spec.get("ports") or [] if p.get("nodePort")}
    if spec.get("healthCheckNodePort"):
        ports.add(int(spec["healthCheckNodePort"]))
    return ports


def wants_node_ports(spec: Mapping[str, Any]) -> bool:
    kind = spec.get("type")
    return kind == "NodePort" or (
        kind == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts") is not False)


class NodePortAllocator:
    def __init__(self, store: Store) -> None:
        self.allocated: set[int] = set()
        for svc in store.items(SERVICES_KEY):
            self.allocated |= node_ports(svc)
        store.subscribe(self._observe)

    def _observe(self, ev: Event) -> None:
        if ev.key != SERVICES_KEY:
            return
        self.allocated -= node_ports(ev.prev)
        if ev.type is EventType.DELETED:
            self.allocated -= node_ports(ev.obj)
        else:
            self.allocated |= node_ports(ev.obj)

    def assign(self, svc: dict[str, Any], old: Mapping[str, Any] | None) -> None:
        """Fill in and check ``svc``'s node ports; raise kube's 422 on a taken or bad one."""
        spec = svc.setdefault("spec", {})
        name = svc["metadata"]["name"]
        ports = spec.get("ports") or []
        if not wants_node_ports(spec) and spec.get("type") != "LoadBalancer":
            return
        taken = self.allocated - node_ports(old)
        mine: set[int] = set()
        old_by_port = {(p.get("port"), p.get("protocol", "TCP")): p.get("nodePort")
                       for p in ((old or {}).get("spec") or {}).get("ports") or []}
        for i, port in enumerate(ports):
            wanted = port.get("nodePort") or old_by_port.get(
                (port.get("port"), port.get("protocol", "TCP")))
            if wanted:
                self._check(name, f"spec.ports[{i}].nodePort", int(wanted), taken)
                port["nodePort"] = int(wanted)
            elif wants_node_ports(spec):
                port["nodePort"] = self._pick(taken | mine)
            else:
                continue
            mine.add(port["nodePort"])
        if spec.get("type") == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local":
            wanted = spec.get("healthCheckNodePort") or ((old or {}).get("spec") or {}).get(
                "healthCheckNodePort")
            if wanted:
                self._check(name, "spec.healthCheckNodePort", int(wanted), taken | mine)
                spec["healthCheckNodePort"] = int(wanted)
            else:
                spec["healthCheckNodePort"] = self._pick(taken | mine)

    def _check(self, name: str, path: str, port: int, taken: set[int]) -> None:
        if port not in NODE_PORT_RANGE:
            raise ApiError.invalid("Service", name, [Cause(
                path, f"Invalid value: {port}: provided port is not in the valid range. The "
                f"range of valid ports is {NODE_PORT_RANGE.start}-{NODE_PORT_RANGE.stop - 1}")])
        if port in taken:
            raise ApiError.invalid("Service", name, [Cause(
                path, f"Invalid value: {port}: provided port is already allocated")])

    def _pick(self, taken: set[int]) -> int:
        for _ in range(64):
            candidate = random.randint(NODE_PORT_RANGE.start, NODE_PORT_RANGE.stop - 1)
            if candidate not in taken:
                return candidate
        for candidate in NODE_PORT_RANGE:
            if candidate not in taken:
                return candidate
        raise ApiError(500, "InternalError", "failed to allocate a nodePort: range is full")
