"""The kubelet's Node: registered as kube's kubelet registers itself (name,
addresses, capacity and allocatable, node info, conditions), created if missing
and otherwise refreshed, with the Ready condition's heartbeat renewed."""

from __future__ import annotations

import copy
import os
import platform
from pathlib import Path
from typing import Any

from localcluster.discovery import KUBE_VERSION
from localcluster.errors import ApiError
from localcluster.registry import Registry, WriteOptions, now_rfc3339

MAX_PODS = 110
MANAGER = WriteOptions(field_manager="kubelet")
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def node_name(cluster: str) -> str:
    """The node's name, as kind names a one-node cluster's."""
    return f"{cluster}-control-plane"


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _memory_ki() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


def node_status(name: str, address: str, now: str) -> dict[str, Any]:
    arch = ARCH.get(platform.machine(), platform.machine())
    capacity = {"cpu": str(os.cpu_count() or 1), "memory": f"{_memory_ki()}Ki",
                "pods": str(MAX_PODS)}
    conditions = [
        ("MemoryPressure", "False", "KubeletHasSufficientMemory",
         "kubelet has sufficient memory available"),
        ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        ("PIDPressure", "False", "KubeletHasSufficientPID",
         "kubelet has sufficient PID available"),
        ("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
    ]
    return {
        "addresses": [{"type": "InternalIP", "address": address},
                      {"type": "Hostname", "address": name}],
        "capacity": capacity, "allocatable": dict(capacity),
        "conditions": [{"type": t, "status": s, "lastHeartbeatTime": now,
                        "lastTransitionTime": now, "reason": r, "message": m}
                       for t, s, r, m in conditions],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {"machineID": _read("/etc/machine-id"),
                     "systemUUID": _read("/etc/machine-id"),
                     "bootID": _read("/proc/sys/kernel/random/boot_id"),
                     "kernelVersion": platform.release(), "osImage": "Linux",
                     "containerRuntimeVersion": "meshgate://" + KUBE_VERSION["gitVersion"],
                     "kubeletVersion": KUBE_VERSION["gitVersion"], "kubeProxyVersion": "",
                     "operatingSystem": "linux", "architecture": arch},
    }


async def register(registry: Registry, name: str, address: str) -> None:
    """Create the Node, or refresh its status keeping each condition's transition time."""
    rt = registry.catalog.lookup("", "v1", "nodes")
    if rt is None:
        return
    status = node_status(name, address, now_rfc3339(registry.clock))
    current = registry.store.get(rt.key, "", name)
    if current is None:
        arch = status["nodeInfo"]["architecture"]
        try:
            await registry.create(rt, "", {"metadata": {"name": name, "labels": {
                "kubernetes.io/arch": arch, "kubernetes.io/os": "linux",
                "kubernetes.io/hostname": name, "beta.kubernetes.io/arch": arch,
                "beta.kubernetes.io/os": "linux",
                "node-role.kubernetes.io/control-plane": ""}}, "spec": {}}, MANAGER)
        except ApiError as e:
            if e.code != 409:
                raise
        current = registry.store.get(rt.key, "", name)
        if current is None:
            return
    before = {c["type"]: c for c in (current.get("status") or {}).get("conditions") or []}
    for cond in status["conditions"]:
        old = before.get(cond["type"])
        if old is not None and old.get("status") == cond["status"]:
            cond["lastTransitionTime"] = old.get("lastTransitionTime", cond[
                "lastTransitionTime"])
    body = copy.deepcopy(current)
    body["status"] = {**(current.get("status") or {}), **status}
    body["metadata"].pop("resourceVersion", None)
    await registry.update(rt, "", name, body, MANAGER, subresource="status")
