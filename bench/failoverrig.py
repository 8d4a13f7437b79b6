"""The three clusters that bench/failover.py measures, and the faults it makes.

``fbeast``, ``fbwest`` and ``fbcentral`` (`cluster up --multicluster`) on a WAN of
their own, east linked to west and to central (east imports both), a ``web``
Service in each, exported by west and central, and east's annotated
``failover.meshgate.io/clusters: "fbwest,fbcentral"`` with a short failback. Web
pods run a small app that answers GET and POST with its pod's name, so each
answer says which cluster served it: two in east, one in west, one in central.
East's ``client`` pod is where the load runs (its proxy is the one that fails
over). `Rig.down` removes whatever of it was made.

Faults: east's web pods stopped and started again, west's gateway taken down (its
Deployment scaled to nothing) and brought back (`cluster up` again applies meshgate's
manifests again, one replica), west
partitioned and healed (localcluster.wanlink), and netem loss or delay on west's
WAN link (localcluster.wanlink.set_link; refused on a kernel without netem).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from dataplane import BenchError
from kubernetes import client
from kubernetes.client.rest import ApiException
from pyroute2 import netns as pyroute_netns
from vmrig import Teardown, stop, wait_until

from localcluster import wanlink
from localcluster.pods import container_log, in_pod_argv, run_pod_argv
from localcluster.up import find
from mesh.inject import PROXY_CONTAINER
from mesh.kube import api_client

EAST, WEST, CENTRAL = "fbeast", "fbwest", "fbcentral"
CLUSTERS = (EAST, WEST, CENTRAL)
WAN, WAN_CIDR = "mg-fbwan", "172.31.248.0/24"
CIDRS = {EAST: ("10.212.0.0/16", "10.213.0.0/16"), WEST: ("10.214.0.0/16", "10.215.0.0/16"),
         CENTRAL: ("10.216.0.0/16", "10.217.0.0/16")}
WEB_PODS = {EAST: ("east-web-1", "east-web-2"), WEST: ("west-web-1",),
            CENTRAL: ("central-web-1",)}
DOMAIN = "cluster.local"
WEB_HOST = f"web.default.svc.{DOMAIN}"
CLIENT = "client"
KUBECTL = str(Path(sys.executable).parent / "kubectl")

APP = """
import os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def answer(self):
        body = f"hello from {os.environ.get('POD_NAME', '?')}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.answer()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.answer()

    def log_message(self, format, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Hello).serve_forever()
"""
"""The web pods' app: GET and POST answered with ``hello from <pod>`` (the demo app
answers GET only); no Nagle wait between its head and body."""


def service_yaml(cluster: str, *, failback: str) -> str:
    """`web` in `cluster`: exported by west and central; in east, failing over to west,
    then central."""
    if cluster == EAST:
        meta = (f"annotations: {{failover.meshgate.io/clusters: \"{WEST},{CENTRAL}\", "
                f"failover.meshgate.io/policy: \"failback={failback}\"}}")
    else:
        meta = "labels: {mirror.meshgate.io/exported: \"true\"}"
    return f"""
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
  {meta}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"""


@dataclass
class Rig:
    """The clusters, their pods and the load's process; `down` removes what was made."""

    base: Path
    failback: str
    pods: dict[tuple[str, str], subprocess.Popen[bytes]] = field(default_factory=dict)
    load: subprocess.Popen[bytes] | None = None
    started: list[str] = field(default_factory=list)

    def state(self, cluster: str) -> Path:
        return self.base / cluster

    def kubeconfig(self, cluster: str) -> Path:
        return self.state(cluster) / "kubeconfig"

    def meshgate(self, *args: str, timeout: float = 180) -> str:
        proc = subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True,
                              text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise BenchError(f"meshgate {shlex.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}{proc.stderr}")
        return proc.stdout

    def kubectl(self, cluster: str, *args: str, stdin: str | None = None) -> str:
        proc = subprocess.run([KUBECTL, "--kubeconfig", str(self.kubeconfig(cluster)), *args],
                              input=stdin, capture_output=True, text=True, timeout=30,
                              check=False)
        if proc.returncode != 0:
            raise BenchError(f"kubectl {shlex.join(args)} in {cluster}: {proc.stderr.strip()}")
        return proc.stdout

    # -- up -------------------------------------------------------------------------------

    def up(self) -> None:
        anchor = self.base / "anchor"
        self.meshgate("identity", "init", "--trust-domain", DOMAIN, "--out", str(anchor))
        for cluster in CLUSTERS:
            self.started.append(cluster)
            self.cluster_up(cluster)
        for remote in (WEST, CENTRAL):
            address = find(remote).wan_address
            docs = self.meshgate("multicluster", "link", "--kubeconfig",
                                 str(self.kubeconfig(remote)), "--cluster-name", remote,
                                 "--gateway-address", str(address), "--api-server",
                                 f"https://{address}:6443")
            self.kubectl(EAST, "apply", "-f", "-", stdin=docs)
        for cluster in CLUSTERS:
            self.kubectl(cluster, "apply", "-f", "-",
                         stdin=service_yaml(cluster, failback=self.failback))
        for cluster in CLUSTERS:
            self.start_web(cluster)
        self.run_pods(EAST, {CLIENT: (("sleep", "infinity"), "frontend", (), None)})
        for remote in (WEST, CENTRAL):
            wait_until(functools.partial(self.mirror_ready, remote), 90,
                       f"{EAST} to mirror {remote}'s web with a ready endpoint", interval=0.3)

    def cluster_up(self, cluster: str) -> None:
        """`cluster up`; for a cluster that is up, it applies meshgate's manifests again
        (a Deployment scaled down is scaled back up)."""
        pods, services = CIDRS[cluster]
        self.meshgate("cluster", "up", "--name", cluster, "--state-dir",
                      str(self.state(cluster)), "--pod-cidr", pods, "--service-cidr",
                      services, "--identity-dir", str(self.base / "anchor"), "--multicluster",
                      "--wan", WAN, "--wan-cidr", WAN_CIDR)

    def mirror_ready(self, remote: str) -> bool:
        api = client.DiscoveryV1Api(api_client(self.kubeconfig(EAST)))
        found = api.list_namespaced_endpoint_slice(
            "default", label_selector=f"kubernetes.io/service-name=web-{remote}").items
        return any(ep.conditions and ep.conditions.ready
                   for s in found for ep in s.endpoints or [])

    # -- pods -----------------------------------------------------------------------------

    def start_web(self, cluster: str) -> float:
        """Start `cluster`'s web pods; the time the first of them was Ready."""
        app = (sys.executable, "-c", APP, "8080")
        return self.run_pods(cluster, {name: (app, "web", ("app=web",), 8080)
                                       for name in WEB_PODS[cluster]})

    def run_pods(self, cluster: str,
                 pods: dict[str, tuple[tuple[str, ...], str, tuple[str, ...], int | None]]
                 ) -> float:
        """Start the pods (name -> command, service account, labels, port) at once; the
        time the first was Ready, once all are."""
        for name, (command, sa, labels, port) in pods.items():
            argv = run_pod_argv(cluster, name, command, service_account=sa, labels=labels,
                                port=port)
            with open(self.base / f"pod-{cluster}-{name}.log", "ab") as out:
                self.pods[cluster, name] = subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        core = client.CoreV1Api(api_client(self.kubeconfig(cluster)))
        ready: dict[str, float] = {}

        def all_ready() -> bool:
            for name in pods:
                if name in ready:
                    continue
                if self.pods[cluster, name].poll() is not None:
                    raise BenchError(f"pod {name} in {cluster} exited; see "
                                     f"{self.base / f'pod-{cluster}-{name}.log'}")
                if pod_ready(core, name):
                    ready[name] = time.monotonic()
            return len(ready) == len(pods)

        wait_until(all_ready, 90, f"pods {', '.join(pods)} in {cluster} to be ready",
                   interval=0.05)
        return min(ready.values())

    def stop_web(self, cluster: str) -> None:
        """SIGTERM each web pod's run-pod, which deletes its Pod (the kubelet stops the
        app and the proxy, as for `kubectl delete pod`), and wait until it is gone."""
        procs = [self.pods.pop((cluster, name)) for name in WEB_PODS[cluster]]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        # One SIGTERM each: run-pod deletes the Pod and waits until the kubelet has
        # removed it, with the default handler back only then, so a second one would end
        # it half way.
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def start_load(self, script: str, args: list[str], out: IO[bytes], err: IO[bytes]
                   ) -> subprocess.Popen[bytes]:
        """`script` run by this interpreter in east's client pod; its stdin is a pipe, to
        be closed to end it."""
        argv = in_pod_argv(find(EAST), "default", CLIENT, [sys.executable, "-c", script,
                                                            *args])
        self.load = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                     start_new_session=True)
        return self.load

    def client_proxy_log(self) -> Path:
        return container_log(find(EAST), "default", CLIENT, PROXY_CONTAINER)

    # -- faults ---------------------------------------------------------------------------

    def kill_gateway(self, cluster: str) -> None:
        """The gateway down until `cluster_up`: its Deployment scaled to nothing (a
        killed process alone the kubelet would start again at once)."""
        subprocess.run([str(Path(sys.executable).parent / "kubectl"), "--kubeconfig",
                        str(self.kubeconfig(cluster)), "-n", "meshgate", "scale",
                        "deploy/meshgate-gateway", "--replicas=0"], check=True,
                       capture_output=True, timeout=30)

    def partition(self, cluster: str) -> None:
        wanlink.partition(WAN, f"cluster/{cluster}")

    def heal(self, cluster: str) -> None:
        wanlink.heal(WAN, f"cluster/{cluster}")

    def set_link(self, cluster: str, *, delay_ms: float | None = None,
                 loss_pct: float | None = None) -> None:
        wanlink.set_link(WAN, f"cluster/{cluster}", delay_ms=delay_ms, loss_pct=loss_pct)

    # -- down -----------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Remove everything; what could not be removed, in words."""
        teardown = Teardown()
        step = teardown.step
        if self.load is not None:
            step("stop the load", functools.partial(stop, self.load, 10))
        for (cluster, name), proc in self.pods.items():
            step(f"stop pod {name} in {cluster}", functools.partial(stop, proc, 30))
        for cluster in reversed(self.started):
            step(f"cluster down {cluster}", functools.partial(cluster_down, cluster))
        return teardown.done(ours())


def cluster_down(cluster: str, attempts: int = 2) -> None:
    """`cluster down`, once more if it fails (it resumes where the last one stopped)."""
    for attempt in range(attempts):
        proc = subprocess.run([sys.executable, "-m", "mesh.cli", "cluster", "down", "--name",
                               cluster], capture_output=True, text=True, timeout=120,
                              check=False)
        if proc.returncode == 0 or "no cluster named" in proc.stderr:
            return
        if attempt == attempts - 1:
            raise BenchError(f"exited {proc.returncode}: "
                             f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        print(f"cleanup: cluster down {cluster} exited {proc.returncode} "
              f"({(proc.stderr.strip().splitlines() or ['?'])[-1]}); once more",
              file=sys.stderr)


def pod_ready(core: client.CoreV1Api, name: str) -> bool:
    try:
        status = core.read_namespaced_pod(name, "default").status
    except ApiException as e:
        if e.status == 404:  # run-pod has not created it yet
            return False
        raise
    return status is not None and any(c.type == "Ready" and c.status == "True"
                                      for c in status.conditions or [])


def ours() -> list[str]:
    return [n for n in pyroute_netns.listnetns()
            if n == WAN or any(n.startswith(f"mg-{c}-") for c in CLUSTERS)]
