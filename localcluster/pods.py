"""`cluster run-pod`: what a kubelet and Linkerd's injector do together for one pod.

On a cluster whose control plane is meshgate's manifests, the Pod goes through the
API, injected, and the node's kubelet runs it (localcluster.kubepod). With the
daemons control plane, run-pod plays both parts itself: a network namespace with
an address on the cluster's bridge, the service range made local (so the sidecar's
redirected listeners receive service traffic), a resolv.conf naming the cluster
DNS, the ServiceAccount, a Pod object and a token bound to it, the sidecar proxy,
then the command. The Pod turns Ready once the proxy and the app's ports answer,
and everything is removed when the command ends.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localcluster import namespaces, netns
from localcluster.kubelet.kubelet import MIRROR_ANNOTATION
from localcluster.kubepod import KubePod
from localcluster.rootless import meshgate_argv
from localcluster.up import ClusterError, ClusterSpec, find, launch
from mesh.errors import ConfigError

log = logging.getLogger(__name__)

INBOUND_PORT = 4143
OUTBOUND_PORT = 4140
ADMIN_PORT = 4191
_LABEL_KEY = "meshgate.io"
_SIGNAL_SLICE_S = 0.5
"""How long, at most, a stop signal waits for the pod's main thread to act on it."""


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
    key = _pod_key(req.namespace, req.name)
    pod_dir = spec.state_dir / "pods" / key
    with api_client(spec.kubeconfig) as api:
        core = k8s.CoreV1Api(api)
        _require_namespace(core, req.namespace)
        _ensure_service_account(core, req)
        if spec.control_plane == "manifests":  # the kubelet runs it, injected
            return KubePod(spec, req, core, pod_dir / "run-pod.pid").run()
        pod = _PodRun(spec, req, key, pod_dir, core)
        try:
            return pod.run()
        finally:
            pod.cleanup()


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


def _pod_key(namespace: str, pod: str) -> str:
    """The pod's name in the cluster's network (namespaces are not a network idea)."""
    return f"{namespace}-{pod}"


class _PodRun:
    def __init__(self, spec: ClusterSpec, req: PodRequest, key: str, pod_dir: Path,
                 core: Any) -> None:
        self.spec, self.req, self.key, self.dir, self.core = spec, req, key, pod_dir, core
        self.net = spec.network
        self.created_pod = False
        self.added_netns = False
        self.proxy: subprocess.Popen[bytes] | None = None
        self.app: subprocess.Popen[bytes] | None = None
        self.stop = threading.Event()

    def run(self) -> int:
        req = self.req
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "run-pod.pid").write_text(f"{os.getpid()}\n")
        pod = netns.add_pod(self.net, self.key)
        self.added_netns = True
        uid = self._create_pod(str(pod.ip))
        token = self._token(uid)
        token_path = self.dir / "token"
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        config = self._proxy_config(token_path)
        self.proxy = self._start_proxy(config)
        self.app = subprocess.Popen(netns.pod_command(self.net, self.key, list(req.command)),
                                    env={**os.environ, "POD_NAME": req.name,
                                         "POD_NAMESPACE": req.namespace, "POD_IP": str(pod.ip),
                                         "SERVICE_ACCOUNT": req.service_account})
        watcher = threading.Thread(target=self._readiness, name="readiness", daemon=True)
        watcher.start()
        previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGINT,
                                                                       signal.SIGTERM)}
        try:
            code = self._wait_app()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop.set()
        return code

    def _wait_app(self) -> int:
        """The app's exit status. The kernel may hand SIGTERM to any thread (the readiness
        watcher's, say); a main thread blocked in waitpid() would then never run
        `_forward`, and the pod would outlive its stop. Waiting in slices, the main thread
        runs Python's handlers within one."""
        assert self.app is not None
        while True:
            try:
                return self.app.wait(_SIGNAL_SLICE_S)
            except subprocess.TimeoutExpired:
                continue

    def _forward(self, signum: int, frame: object) -> None:
        if self.app is not None and self.app.poll() is None:
            self.app.send_signal(signal.SIGTERM)

    def _create_pod(self, ip: str) -> str:
        from kubernetes import client as k8s
        from kubernetes.client.rest import ApiException

        req = self.req
        body = k8s.V1Pod(
            metadata=k8s.V1ObjectMeta(
                name=req.name, namespace=req.namespace, labels=dict(req.labels),
                annotations={MIRROR_ANNOTATION: "run-pod",
                             f"{_LABEL_KEY}/inbound-port": str(INBOUND_PORT),
                             f"{_LABEL_KEY}/admin-port": str(ADMIN_PORT)}),
            spec=k8s.V1PodSpec(
                service_account_name=req.service_account,
                containers=[k8s.V1Container(
                    name="app", image="local", command=list(req.command),
                    ports=[k8s.V1ContainerPort(container_port=p) for p in req.ports])]))
        try:
            created = self.core.create_namespaced_pod(req.namespace, body)
        except ApiException as e:
            if e.status == 409:
                raise ClusterError(f"pod {req.namespace}/{req.name} already exists; delete it "
                                   "or choose another --name") from None
            raise
        self.created_pod = True
        self._set_status(ip=ip, ready=False)
        return str(created.metadata.uid)

    def _set_status(self, *, ip: str | None = None, ready: bool) -> None:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        status: dict[str, Any] = {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                            "lastTransitionTime": now}],
            "containerStatuses": [{"name": "app", "ready": ready, "restartCount": 0,
                                   "image": "local", "imageID": "", "started": True,
                                   "state": {"running": {"startedAt": now}}}]}
        if ip is not None:
            status["podIP"] = ip
            status["podIPs"] = [{"ip": ip}]
        self.core.patch_namespaced_pod_status(self.req.name, self.req.namespace,
                                              {"status": status},
                                              _content_type="application/merge-patch+json")

    def _token(self, uid: str) -> str:
        from kubernetes import client as k8s

        from mesh.identity.names import SERVICE_AUDIENCE

        review = self.core.create_namespaced_service_account_token(
            self.req.service_account, self.req.namespace, k8s.AuthenticationV1TokenRequest(
                spec=k8s.V1TokenRequestSpec(
                    audiences=[SERVICE_AUDIENCE], expiration_seconds=24 * 3600,
                    bound_object_ref=k8s.V1BoundObjectReference(
                        kind="Pod", api_version="v1", name=self.req.name, uid=uid))))
        return str(review.status.token)

    def _proxy_config(self, token_path: Path) -> Path:
        from mesh.identity.names import Identity

        spec = self.spec
        identity = Identity(self.req.namespace, self.req.service_account, spec.trust_domain)
        config = {
            "identity": {"name": identity.dns_name,
                         "trustBundle": str(spec.identity_dir / "trust-bundle.pem"),
                         "server": spec.control_url, "tokenFile": str(token_path)},
            "destination": {"server": spec.control_url},
            "workload": {"namespace": self.req.namespace, "pod": self.req.name},
            "inbound": {"listen": f"0.0.0.0:{INBOUND_PORT}", **self._trusted_gateways()},
            "outbound": {"listen": f"127.0.0.1:{OUTBOUND_PORT}"},
            "admin": {"listen": f"0.0.0.0:{ADMIN_PORT}"},
        }
        path = self.dir / "proxy.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def _trusted_gateways(self) -> dict[str, list[str]]:
        """On a multicluster node, the gateway (this cluster's, and those of clusters
        sharing its anchor, which have the same name) forwards callers from other
        clusters: the proxy takes the caller it names as the one to authorize."""
        if self.spec.wan is None:
            return {}
        from localcluster.multicluster import gateway_identity

        return {"trustedGateways": [gateway_identity(self.spec.trust_domain).dns_name]}

    def _start_proxy(self, config: Path) -> subprocess.Popen[bytes]:
        argv = meshgate_argv(("proxy", "run", "--config", str(config)))
        return launch(netns.pod_command(self.net, self.key, argv), self.dir / "proxy.log",
            ready=" ready (pid ", detach=False,
            what=f"the sidecar proxy of {self.req.namespace}/{self.req.name}")

    def _readiness(self) -> None:
        """Ready while the proxy is ready and every declared port accepts connections."""
        ready = False
        while not self.stop.wait(0.2):
            now = self._probe()
            if now != ready:
                try:
                    self._set_status(ready=now)
                    ready = now
                except Exception as e:  # the API may be briefly away; try again
                    log.warning("pod %s/%s: cannot update readiness: %s", self.req.namespace,
                                self.req.name, e)

    def _probe(self) -> bool:
        if self.proxy is None or self.proxy.poll() is not None:
            return False
        ports = [(ADMIN_PORT, b"GET /ready HTTP/1.0\r\n\r\n"),
                 *((p, None) for p in self.req.ports)]
        for port, request in ports:
            try:
                with _pod_socket(self.spec.network, self.key) as s:
                    s.settimeout(1.0)
                    s.connect(("127.0.0.1", port))
                    if request is not None:
                        s.sendall(request)
                        if b" 200 " not in s.recv(64).split(b"\r\n", 1)[0] + b" ":
                            return False
            except OSError:
                return False
        return True

    def cleanup(self) -> None:
        self.stop.set()
        for proc in (self.app, self.proxy):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.created_pod:
            from kubernetes.client.rest import ApiException

            with contextlib.suppress(ApiException, OSError):
                self.core.delete_namespaced_pod(self.req.name, self.req.namespace,
                                                grace_period_seconds=0)
        if self.added_netns:
            netns.remove_pod(self.net, self.key)
        shutil.rmtree(self.dir, ignore_errors=True)


def in_pod(spec: ClusterSpec, namespace: str, pod: str, argv: Sequence[str], *,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `argv` inside a running pod (its network and resolv.conf), as `kubectl exec`."""
    return subprocess.run(in_pod_argv(spec, namespace, pod, argv), capture_output=True,
                          text=True, timeout=timeout, check=False)


def in_pod_argv(spec: ClusterSpec, namespace: str, pod: str, argv: Sequence[str]
                ) -> list[str]:
    """The command line that runs `argv` inside a running pod, to `Popen` one that lasts."""
    return netns.pod_command(spec.network, _sandbox(spec, namespace, pod), list(argv))


def _sandbox(spec: ClusterSpec, namespace: str, pod: str) -> str:
    """The pod's name in the cluster network: the kubelet's sandbox of the Pod (named
    after its uid), or run-pod's own for a pod it runs itself."""
    if spec.control_plane != "manifests":
        return _pod_key(namespace, pod)
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    from localcluster.kubelet.worker import sandbox_key
    from mesh.kube import api_client

    with api_client(spec.kubeconfig) as api:
        try:
            found = k8s.CoreV1Api(api).read_namespaced_pod(pod, namespace)
        except ApiException as e:
            if e.status == 404:
                raise ClusterError(f"cluster {spec.name!r} has no pod {namespace}/{pod}"
                                   ) from None
            raise
    assert found.metadata is not None
    return sandbox_key(namespace, pod, str(found.metadata.uid))


@contextlib.contextmanager
def _pod_socket(net: netns.ClusterNetwork, key: str) -> Iterator[socket.socket]:
    sock = namespaces.socket_in_namespace(net.pod_netns(key))
    try:
        yield sock
    finally:
        sock.close()


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
