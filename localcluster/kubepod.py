"""`cluster run-pod` on a cluster whose control plane is meshgate's manifests: the
pod goes through the API as any user's would. Its manifest (restartPolicy Never, the
command in a container of meshgate's image, so the kubelet runs it as this machine's
installation, POD_NAME, POD_NAMESPACE, POD_IP and SERVICE_ACCOUNT from the downward
API, a readiness probe that each ``--port`` accepts connections) is injected by
mesh.inject with the settings `meshgate inject` reads from the cluster, created, and
run by the node's kubelet; run-pod follows the command's output, waits for it to
end, returns its exit code and deletes the Pod, which the kubelet stops and removes
with its sandbox, also when run-pod is stopped by a signal or fails.

On a multicluster cluster the pod carries ``config.meshgate.io/trusted-gateways``
naming the gateway's identity (the same in every cluster under one trust anchor), so
that its proxy authorizes the caller a gateway forwards rather than the gateway.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localcluster.up import ClusterError, ClusterSpec
from mesh.image import reference
from mesh.inject import CONFIG_PREFIX, Outcome, inject

if TYPE_CHECKING:
    from localcluster.pods import PodRequest

log = logging.getLogger(__name__)

APP = "app"
"""The name of the command's container."""
GRACE_SECONDS = 5
"""The pod's terminationGracePeriodSeconds: a stopped command gets SIGTERM, then SIGKILL
this long after."""
POLL = 0.2
GONE_TIMEOUT = 60.0
"""How long the kubelet may take to stop the containers and remove the sandbox."""
LOG_TRIES = 10
PORTS_OPEN = """import socket, sys
for port in sys.argv[1:]:
    try:
        socket.create_connection(("127.0.0.1", int(port)), 1).close()
    except OSError as e:
        sys.exit(f"port {port}: {e.strerror or e}")
"""
STARTING = (None, "ContainerCreating", "PodInitializing")
"""Reasons a container waits that are not a failure."""
TRUSTED_GATEWAYS = CONFIG_PREFIX + "trusted-gateways"


def manifest(req: PodRequest, *, trusted_gateways: tuple[str, ...] = (),
             pythonpath: str | None = None) -> dict[str, Any]:
    """The Pod `req` asks for, before injection."""
    def field(name: str, path: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}

    env = [field("POD_NAME", "metadata.name"), field("POD_NAMESPACE", "metadata.namespace"),
           field("POD_IP", "status.podIP"),
           field("SERVICE_ACCOUNT", "spec.serviceAccountName")]
    if pythonpath:  # the command runs as this machine's installation, run-pod's own
        env.append({"name": "PYTHONPATH", "value": pythonpath})
    container: dict[str, Any] = {"name": APP, "image": reference(),
                                 "command": list(req.command), "env": env}
    if req.ports:
        container["ports"] = [{"containerPort": p} for p in req.ports]
        # Ready once every port accepts a connection on the pod's loopback, where the
        # proxy forwards (a tcpSocket probe would dial the pod's IP, which an app
        # bound to 127.0.0.1 never answers).
        container["readinessProbe"] = {"exec": {"command": [
            sys.executable, "-c", PORTS_OPEN, *map(str, req.ports)]},
            "periodSeconds": 1, "failureThreshold": 1}
    meta: dict[str, Any] = {"name": req.name, "namespace": req.namespace}
    if req.labels:
        meta["labels"] = dict(req.labels)
    if trusted_gateways:
        meta["annotations"] = {TRUSTED_GATEWAYS: ",".join(trusted_gateways)}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {
        "serviceAccountName": req.service_account, "restartPolicy": "Never",
        "terminationGracePeriodSeconds": GRACE_SECONDS, "containers": [container]}}


def injected(spec: ClusterSpec, req: PodRequest) -> dict[str, Any]:
    """The Pod as `meshgate inject` renders it for this cluster."""
    from mesh.injectcmd import settings

    gateways: tuple[str, ...] = ()
    if spec.wan is not None:
        from localcluster.multicluster import gateway_identity

        gateways = (gateway_identity(spec.trust_domain).dns_name,)
    body = manifest(req, trusted_gateways=gateways, pythonpath=os.environ.get("PYTHONPATH"))
    out, reports = inject(body, settings(spec.kubeconfig, cluster_domain=spec.cluster_domain))
    if [r.outcome for r in reports] != [Outcome.INJECTED]:
        raise ClusterError(f"pod {req.namespace}/{req.name} was not injected: "
                           f"{'; '.join(map(str, reports))}")
    return out


def exit_code(pod: Any) -> int | None:
    """The command's exit code once its container has terminated, else None."""
    statuses = (pod.status.container_statuses if pod.status else None) or []
    for cs in statuses:
        if cs.name == APP and cs.state is not None and cs.state.terminated is not None:
            return int(cs.state.terminated.exit_code)
    return None


def failed_sidecar(pod: Any) -> str | None:
    """The injected container that failed before the command started, if one did."""
    status = pod.status
    if status is None or exit_code(pod) is not None:
        return None
    for cs in status.init_container_statuses or []:
        for state in (cs.state, cs.last_state):
            term = state.terminated if state is not None else None
            if term is not None and term.exit_code != 0:
                return str(cs.name)
    return None


def not_startable(pod: Any) -> str | None:
    """Why the kubelet cannot start the command's container, if it says it cannot."""
    statuses = (pod.status.container_statuses if pod.status else None) or []
    for cs in statuses:
        waiting = cs.state.waiting if cs.name == APP and cs.state is not None else None
        if waiting is not None and waiting.reason not in STARTING:
            return f"{waiting.reason}: {waiting.message or ''}".rstrip(": ")
    return None


class KubePod:
    """One run of the pod: create, follow, wait, delete."""

    def __init__(self, spec: ClusterSpec, req: PodRequest, core: Any, pid_file: Path,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec, self.req, self.core, self.pid_file = spec, req, core, pid_file
        self.clock = clock
        self.created = False
        self.stopping = threading.Event()
        self.follower: threading.Thread | None = None

    def run(self) -> int:
        from kubernetes.client.rest import ApiException

        req = self.req
        body = injected(self.spec, req)
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT,
                                                                    signal.SIGTERM)}
        try:
            try:
                self.core.create_namespaced_pod(req.namespace, body)
            except ApiException as e:
                if e.status == 409:
                    raise ClusterError(f"pod {req.namespace}/{req.name} already exists; "
                                       "delete it or choose another --name") from None
                raise
            self.created = True
            # `cluster down` stops run-pod by this file, before the API server goes.
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
            self.pid_file.write_text(f"{os.getpid()}\n")
            return self._wait()
        finally:
            try:
                self._delete()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping.set()

    def _read(self) -> Any:
        """The Pod; None once it is gone. ClusterError if the API server is away."""
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return self.core.read_namespaced_pod(self.req.name, self.req.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise ClusterError(f"cannot read pod {self.req.namespace}/{self.req.name}: "
                               f"{e.status} {e.reason}") from None
        except (HTTPError, OSError) as e:
            raise ClusterError(f"lost the API server of cluster {self.spec.name!r} while "
                               f"pod {self.req.namespace}/{self.req.name} ran ({e})") from None

    def _wait(self) -> int:
        """Until the command's container has terminated: its exit code."""
        deleted = False
        while True:
            if self.stopping.is_set() and not deleted:
                self._request_delete()  # the kubelet sends the command SIGTERM
                deleted = True
            pod = self._read()
            if pod is None:
                if deleted:  # stopped, and gone before we saw its status: as if killed
                    self._join_follower()  # what it wrote until then, all of it
                    return 128 + signal.SIGTERM
                raise ClusterError(f"pod {self.req.namespace}/{self.req.name} was deleted "
                                   "before its command ended")
            self._follow_when_started(pod)
            code = exit_code(pod)
            if code is not None:
                self._join_follower()
                return code
            if not deleted and (name := failed_sidecar(pod)) is not None:
                raise ClusterError(f"pod {self.req.namespace}/{self.req.name}: container "
                                   f"{name} failed: {self._last_words(name)}")
            if not deleted and (why := not_startable(pod)) is not None:
                raise ClusterError(f"pod {self.req.namespace}/{self.req.name}: the command "
                                   f"cannot start: {why}")
            self.stopping.wait(POLL)

    def _follow_when_started(self, pod: Any) -> None:
        if self.follower is not None or pod.status is None:
            return
        for cs in pod.status.container_statuses or []:
            if cs.name == APP and cs.state is not None and (cs.state.running or
                                                            cs.state.terminated):
                self.follower = threading.Thread(target=self._follow, name="logs",
                                                 daemon=True)
                self.follower.start()

    def _follow(self) -> None:
        """The command's output on our stdout, as `kubectl logs -f` shows it."""
        try:
            stream = self.core.read_namespaced_pod_log(
                self.req.name, self.req.namespace, container=APP, follow=True,
                _preload_content=False)
            for chunk in stream.stream(4096):
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
        except Exception as e:  # the output is a courtesy; the exit code is what counts
            log.debug("pod output not followed: %s", e)

    def _join_follower(self) -> None:
        if self.follower is not None:
            self.follower.join(5)

    def _last_words(self, container: str) -> str:
        """The last line the failed container wrote (its output may reach the log a
        moment after its status says it ended: a few tries, this run's or the last)."""
        from kubernetes.client.rest import ApiException

        for _ in range(LOG_TRIES):
            for previous in (False, True):
                try:
                    text = str(self.core.read_namespaced_pod_log(
                        self.req.name, self.req.namespace, container=container,
                        previous=previous))
                except ApiException:
                    continue
                lines = [line.strip() for line in text.splitlines() if line.strip()]
                if lines:
                    return lines[-1]
            time.sleep(POLL)
        return "(it wrote nothing)"

    def _request_delete(self) -> None:
        """Ask for the Pod's deletion (with its grace period); ClusterError if refused
        or the API server is away."""
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            self.core.delete_namespaced_pod(self.req.name, self.req.namespace)
        except ApiException as e:
            if e.status != 404:
                raise ClusterError(f"cannot delete pod {self.req.namespace}/{self.req.name}"
                                   f": {e.status} {e.reason}") from None
        except (HTTPError, OSError) as e:
            raise ClusterError(f"cannot delete pod {self.req.namespace}/{self.req.name}: "
                               f"the API server of cluster {self.spec.name!r} is away "
                               f"({e})") from None

    def _delete(self) -> None:
        """Delete the Pod and wait until the kubelet has removed it (its containers
        stopped, its sandbox gone)."""

        if not self.created:
            return
        self.created = False
        self.pid_file.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.pid_file.parent.rmdir()
        with contextlib.suppress(ClusterError):
            self._request_delete()
        deadline = self.clock() + GONE_TIMEOUT
        while self.clock() < deadline:
            try:
                if self._read() is None:
                    return
            except ClusterError:
                return  # the API server is gone: `cluster down` removes the rest
            time.sleep(POLL)
        log.warning("pod %s/%s still there after %.0fs", self.req.namespace, self.req.name,
                    GONE_TIMEOUT)
