"""`cluster run-pod`: one command as a meshed pod, in the foreground, and `in_pod`, a
command inside a running pod's network, as `kubectl exec`.

The Pod goes through the API, injected as `meshgate inject` renders it, and the
node's kubelet runs it (localcluster.kubepod), whether the control plane runs as
meshgate's manifests or as daemons of `cluster up`: both serve the injected proxy's
headless Service, trust bundle and service CIDR.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localcluster import netns
from localcluster.kubepod import KubePod
from localcluster.rootless import meshgate_argv
from localcluster.up import ClusterError, ClusterSpec, find
from mesh.errors import ConfigError


@dataclass(frozen=True)
class PodRequest:
    cluster: str
    namespace: str
    name: str
    service_account: str
    command: tuple[str, ...]
    labels: tuple[tuple[str, str], ...] = ()
    ports: tuple[int, ...] = ()


def run_pod(req: PodRequest) -> int:
    """Run one pod in the foreground; returns the command's exit status."""
    from kubernetes import client as k8s

    from mesh.kube import api_client

    if not req.command:
        raise ConfigError("give the pod's command after --, e.g. -- python3 -m http.server")
    spec = find(req.cluster)
    pid_file = spec.state_dir / "pods" / f"{req.namespace}-{req.name}" / "run-pod.pid"
    with api_client(spec.kubeconfig) as api:
        core = k8s.CoreV1Api(api)
        _require_namespace(core, req.namespace)
        _ensure_service_account(core, req)
        return KubePod(spec, req, core, pid_file).run()


def _require_namespace(core: Any, namespace: str) -> None:
    from kubernetes.client.rest import ApiException

    try:
        core.read_namespace(namespace)
    except ApiException as e:
        if e.status == 404:
            raise ClusterError(f"namespace {namespace!r} does not exist; create it "
                               f"with `kubectl create namespace {namespace}`") from None
        raise


def _ensure_service_account(core: Any, req: PodRequest) -> None:
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    try:
        core.create_namespaced_service_account(req.namespace, k8s.V1ServiceAccount(
            metadata=k8s.V1ObjectMeta(name=req.service_account)))
    except ApiException as e:
        if e.status != 409:
            raise


def in_pod(spec: ClusterSpec, namespace: str, pod: str, argv: Sequence[str], *,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `argv` inside a running pod (its network and resolv.conf), as `kubectl exec`."""
    return subprocess.run(in_pod_argv(spec, namespace, pod, argv), capture_output=True,
                          text=True, timeout=timeout, check=False)


def in_pod_argv(spec: ClusterSpec, namespace: str, pod: str, argv: Sequence[str]
                ) -> list[str]:
    """The command line that runs `argv` inside a running pod, to `Popen` one that lasts."""
    return netns.pod_command(spec.network, _sandbox(spec, namespace, pod), list(argv))


def container_log(spec: ClusterSpec, namespace: str, pod: str, container: str) -> Path:
    """The file the kubelet writes the container's current run's output to (CRI
    format), for readers that follow it on this machine."""
    from localcluster.kubelet.worker import pod_dir

    found = _read_pod(spec, namespace, pod)
    statuses = [*(found.status.init_container_statuses or []),
                *(found.status.container_statuses or [])] if found.status else []
    restarts = next((s.restart_count for s in statuses if s.name == container), 0)
    return (pod_dir(spec.state_dir / "kubelet" / "pods", namespace, pod,
                    str(found.metadata.uid)) / container / f"{restarts}.log")


def _sandbox(spec: ClusterSpec, namespace: str, pod: str) -> str:
    """The pod's name in the cluster network: the kubelet's sandbox of the Pod, named
    after its uid."""
    from localcluster.kubelet.worker import sandbox_key

    return sandbox_key(namespace, pod, str(_read_pod(spec, namespace, pod).metadata.uid))


def _read_pod(spec: ClusterSpec, namespace: str, pod: str) -> Any:
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    from mesh.kube import api_client

    with api_client(spec.kubeconfig) as api:
        try:
            return k8s.CoreV1Api(api).read_namespaced_pod(pod, namespace)
        except ApiException as e:
            if e.status == 404:
                raise ClusterError(f"cluster {spec.name!r} has no pod {namespace}/{pod}"
                                   ) from None
            raise


def run_pod_argv(cluster: str, name: str, command: Sequence[str], *, service_account: str,
                 labels: Sequence[str] = (), port: int | None = None) -> list[str]:
    """The `meshgate cluster run-pod` command line for one pod running `command`."""
    args = ["cluster", "run-pod", "--cluster", cluster, "--name", name,
            "--service-account", service_account]
    for label in labels:
        args += ["--label", label]
    if port is not None:
        args += ["--port", str(port)]
    return meshgate_argv([*args, "--", *command])
