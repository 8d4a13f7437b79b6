"""The cluster's Node object: what a kubelet registers for this machine (name,
addresses, capacity, node info, conditions), written when the cluster starts
and refreshed on each start."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from localcluster.discovery import KUBE_VERSION
from localcluster.errors import ApiError
from localcluster.workloads.common import NODES, TYPES, Writer

MAX_PODS = 110
LEASES = TYPES[("coordination.k8s.io", "leases")]
LEASE_NAMESPACE = "kube-node-lease"
ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
        "s390x": "s390x"}


def node_name(cluster: str) -> str:
    """The node's name, as kind names a one-node cluster's."""
    return f"{cluster}-control-plane"


def _read(path: str, default: str = "") -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def _memory_ki() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


def _os_image() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return "Linux"


def _storage_ki(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_blocks * st.f_frsize // 1024


def node_object(name: str, *, address: str, state_dir: Path, now: str) -> dict[str, Any]:
    arch = ARCH.get(platform.machine(), platform.machine())
    capacity = {"cpu": str(os.cpu_count() or 1), "memory": f"{_memory_ki()}Ki",
                "pods": str(MAX_PODS), "ephemeral-storage": f"{_storage_ki(state_dir)}Ki",
                "hugepages-2Mi": "0"}
    conditions = [
        ("MemoryPressure", "False", "KubeletHasSufficientMemory",
         "kubelet has sufficient memory available"),
        ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
        ("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
    ]
    machine_id = _read("/etc/machine-id")
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "beta.kubernetes.io/arch": arch, "beta.kubernetes.io/os": "linux",
            "kubernetes.io/arch": arch, "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux", "node-role.kubernetes.io/control-plane": ""}},
        "spec": {},
        "status": {
            "addresses": [{"type": "InternalIP", "address": address},
                          {"type": "Hostname", "address": name}],
            "capacity": capacity, "allocatable": dict(capacity),
            "conditions": [{"type": t, "status": s, "lastHeartbeatTime": now,
                            "lastTransitionTime": now, "reason": r, "message": m}
                           for t, s, r, m in conditions],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": machine_id, "systemUUID": machine_id,
                "bootID": _read("/proc/sys/kernel/random/boot_id"),
                "kernelVersion": platform.release(), "osImage": _os_image(),
                "containerRuntimeVersion": "meshgate://" + KUBE_VERSION["gitVersion"],
                "kubeletVersion": KUBE_VERSION["gitVersion"], "kubeProxyVersion": "",
                "operatingSystem": "linux", "architecture": arch},
        },
    }


async def register_node(w: Writer, name: str, *, address: str, state_dir: Path) -> None:
    """Create the node, or refresh its status (addresses, capacity, conditions)."""
    want = node_object(name, address=address, state_dir=state_dir, now=w.stamp())
    current = w.store.get(NODES.key, "", name)
    if current is None:
        try:
            await w.registry.create(NODES, "", want)
        except ApiError as e:
            if e.code != 409:
                raise
        current = w.store.get(NODES.key, "", name)
        if current is None:
            return
    old_conditions = {c["type"]: c for c in (current.get("status") or {}).get("conditions") or []}
    for cond in want["status"]["conditions"]:
        before = old_conditions.get(cond["type"])
        if before is not None and before.get("status") == cond["status"]:
            cond["lastTransitionTime"] = before.get("lastTransitionTime", cond[
                "lastTransitionTime"])
    await w.update(NODES, current, lambda b: b.__setitem__("status", want["status"]),
                   status=True)
    await _renew_lease(w, current)


async def _renew_lease(w: Writer, node: dict[str, Any]) -> None:
    """The node's heartbeat Lease in kube-node-lease, as a kubelet keeps it."""
    name = node["metadata"]["name"]
    micro = w.stamp().replace("Z", ".000000Z")
    lease = w.store.get(LEASES.key, LEASE_NAMESPACE, name)
    if lease is None:
        try:
            await w.registry.create(LEASES, LEASE_NAMESPACE, {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "ownerReferences": [{
                    "apiVersion": "v1", "kind": "Node", "name": name,
                    "uid": node["metadata"]["uid"]}]},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                         "renewTime": micro}})
        except ApiError as e:
            if e.code != 409:
                raise
        return
    await w.update(LEASES, lease, lambda b: b["spec"].__setitem__("renewTime", micro))
