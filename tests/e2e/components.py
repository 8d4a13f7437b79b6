"""meshgate's own Pods on an embedded cluster (`cluster up` installs the control plane,
gateway and mirror controller from meshgate's manifests): which processes run in them,
for tests that kill one and watch the kubelet and the ReplicaSet bring it back."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from kubernetes import client

from localcluster import netns
from localcluster.kubelet.reap import processes_in
from localcluster.up import ClusterSpec
from mesh.kube import api_client

NAMESPACE = "meshgate"


def pods(spec: ClusterSpec, deployment: str) -> list[client.V1Pod]:
    """The running Pods of one of meshgate's Deployments (meshgate-control,
    meshgate-gateway, meshgate-mirror), not being deleted."""
    core = client.CoreV1Api(api_client(spec.kubeconfig))
    found = core.list_namespaced_pod(
        NAMESPACE, label_selector=f"app.kubernetes.io/name={deployment}").items
    return [p for p in found if p.metadata.deletion_timestamp is None
            and p.status.phase == "Running" and p.status.pod_ip]


def restarts(spec: ClusterSpec, deployment: str) -> int:
    """The restart count of the Deployment's running Pod's first container."""
    return sum(s.restart_count for p in pods(spec, deployment)
               for s in (p.status.container_statuses or [])[:1])


def processes(spec: ClusterSpec, deployment: str, *, argv_has: str = "") -> list[int]:
    """The pids of the processes in the Deployment's running Pods whose command line
    contains `argv_has` (NUL-separated arguments, as /proc/PID/cmdline has them)."""
    by_ip = {str(p.ip): p.netns for p in netns.list_pods(spec.network)}
    found = []
    for pod in pods(spec, deployment):
        namespace = by_ip.get(pod.status.pod_ip)
        if namespace is None:
            continue
        for pid in processes_in(namespace):
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if argv_has.encode() in cmdline:
                    found.append(pid)
    return sorted(found)


def kill(spec: ClusterSpec, deployment: str, *, argv_has: str = "") -> list[int]:
    """SIGKILL the matching processes of the Deployment's Pods; their pids."""
    pids = processes(spec, deployment, argv_has=argv_has)
    assert pids, f"no process of {deployment} has {argv_has!r} in its command line"
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids
