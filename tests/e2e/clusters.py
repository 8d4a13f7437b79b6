"""Embedded clusters on one WAN for the multi-cluster end-to-end tests, driven as a
user drives them: `meshgate cluster up --multicluster` with a shared trust anchor,
`meshgate multicluster link` applied with kubectl, pods started with `meshgate
cluster run-pod`, commands run inside pods, proxy metrics read from the admin port,
WAN partitions and their healing.

`clusters(...)` is the context manager a module fixture wraps: it refuses to start
over namespaces an earlier run left behind, and on the way out (even after a
failure) heals what it partitioned, stops the pods it started, takes every cluster
down and checks that nothing of them is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families
from pyroute2 import netns

from localcluster.pods import in_pod, in_pod_argv, run_pod_argv
from localcluster.up import find
from mesh.kube import api_client
from tests.cluster import wait_for
from tests.e2e.pod_scripts import GET

KUBECTL = str(Path(sys.executable).parent / "kubectl")
DEMO_APP = (sys.executable, "-m", "localcluster.demoapp", "--port", "8080")
"""A pod's command that answers on 8080 naming the pod (localcluster.demoapp)."""


@dataclass(frozen=True)
class Topology:
    """What a module's clusters are called and where they sit: names unique to the
    module, so that tests and demos running at the same time never meet."""

    wan: str
    wan_cidr: str
    cidrs: Mapping[str, tuple[str, str]]
    """Cluster name -> (pod CIDR, service CIDR)."""
    extra_namespaces: tuple[str, ...] = ()
    """Prefixes of further namespaces the module may create (a cluster it tries to add)."""

    def ours(self) -> list[str]:
        """The network namespaces of these clusters and their WAN that exist now."""
        prefixes = tuple(f"mg-{name}-" for name in (*self.cidrs, *self.extra_namespaces))
        return [n for n in netns.listnetns() if n.startswith(prefixes) or n == self.wan]


@dataclass
class Clusters:
    base: Path
    env: dict[str, str]
    topology: Topology
    pods: dict[tuple[str, str], subprocess.Popen[bytes]] = field(default_factory=dict)
    partitioned: set[str] = field(default_factory=set)

    @property
    def wan(self) -> str:
        return self.topology.wan

    def state(self, cluster: str) -> Path:
        return self.base / cluster

    def kubeconfig(self, cluster: str) -> Path:
        return self.state(cluster) / "kubeconfig"

    def meshgate(self, *args: str, check: bool = True, input: str | None = None,
                 timeout: float = 90) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "mesh.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"meshgate {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def kubectl(self, cluster: str, *args: str, input: str | None = None) -> str:
        proc = subprocess.run([KUBECTL, "--kubeconfig", str(self.kubeconfig(cluster)), *args],
                              capture_output=True, text=True, timeout=30, input=input)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def up(self, cluster: str, *extra: str) -> subprocess.CompletedProcess[str]:
        pods, services = self.topology.cidrs[cluster]
        return self.meshgate("cluster", "up", "--name", cluster, "--state-dir",
                             str(self.state(cluster)), "--pod-cidr", pods, "--service-cidr",
                             services, "--identity-dir", str(self.base / "anchor"),
                             "--multicluster", "--wan", self.wan, "--wan-cidr",
                             self.topology.wan_cidr, *extra)

    def wan_address(self, cluster: str) -> str:
        spec = find(cluster)
        assert spec.wan_address is not None
        return spec.wan_address

    def link(self, importing: str, exporting: str, *, probe_period: str = "") -> None:
        """`importing` imports from `exporting`; `probe_period` replaces the Link's
        gateway probe period (3 s) for tests that wait on the control plane's view."""
        # No address flags: the gateway's from its Service, the API server's from
        # kube-public/cluster-info (the kubeconfig names the host's loopback listener).
        docs = self.meshgate("multicluster", "link", "--kubeconfig",
                             str(self.kubeconfig(exporting)), "--cluster-name",
                             exporting).stdout
        if probe_period:
            parsed = list(yaml.safe_load_all(docs))
            for doc in parsed:
                if doc.get("kind") == "Link":
                    doc["spec"]["probeSpec"]["period"] = probe_period
            docs = yaml.safe_dump_all(parsed, sort_keys=False)
        self.kubectl(importing, "apply", "-f", "-", input=docs)

    def core(self, cluster: str) -> client.CoreV1Api:
        return client.CoreV1Api(api_client(self.kubeconfig(cluster)))

    def log_of(self, cluster: str, pod: str) -> Path:
        """Where the output of the pod's `run-pod` (and of its command) goes."""
        return self.base / f"run-pod-{cluster}-{pod}.log"

    def run_pod(self, cluster: str, name: str, *command: str, sa: str,
                labels: tuple[str, ...] = (), port: int | None = None) -> None:
        """Start a pod and wait until it is Ready; its output is appended to `log_of`."""
        argv = run_pod_argv(cluster, name, command, service_account=sa, labels=labels,
                            port=port)
        log = self.log_of(cluster, name)
        with open(log, "ab") as out:
            proc = self.pods[(cluster, name)] = subprocess.Popen(
                argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"run-pod {name} in {cluster} exited:\n{log.read_text()}")
            pod = self.core(cluster).read_namespaced_pod(name, "default")
            return any(c.type == "Ready" and c.status == "True"
                       for c in (pod.status.conditions or []))

        wait_for(ready, timeout=40, interval=0.2, what=f"pod {name} in {cluster} to be ready")

    def stop_pod(self, cluster: str, name: str) -> None:
        """Stop the pod's `run-pod` process, which removes the pod, and wait for it."""
        proc = self.pods.pop((cluster, name))
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def stop_pods(self) -> None:
        for proc in self.pods.values():
            proc.send_signal(signal.SIGTERM)
        for cluster, name in list(self.pods):
            self.stop_pod(cluster, name)

    def in_pod(self, cluster: str, pod: str, code: str, *args: str) -> str:
        """Run the Python program `code` with `args` inside the pod; its output."""
        proc = in_pod(find(cluster), "default", pod, [sys.executable, "-c", code, *args])
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def start_in_pod(self, cluster: str, pod: str, code: str, *args: str
                     ) -> subprocess.Popen[str]:
        """Start the Python program `code` inside the pod in the background, with pipes
        to its stdin and stdout (its stderr goes to the pod's log)."""
        argv = in_pod_argv(find(cluster), "default", pod, [sys.executable, "-c", code, *args])
        with open(self.log_of(cluster, pod), "ab") as log:
            return subprocess.Popen(argv, env=self.env, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=log, text=True,
                                    start_new_session=True)

    def metrics(self, cluster: str, pod: str) -> str:
        """The pod's proxy metrics, as its admin port serves them."""
        return self.in_pod(cluster, pod, GET, "http://127.0.0.1:4191/metrics")

    def metric(self, cluster: str, pod: str, name: str, **labels: str) -> float:
        return value(self.metrics(cluster, pod), name, **labels)

    def partition(self, cluster: str) -> None:
        self.partitioned.add(cluster)
        self.meshgate("cluster", "wan", "partition", "--name", cluster, "--wan", self.wan)

    def heal(self, cluster: str) -> None:
        self.meshgate("cluster", "wan", "heal", "--name", cluster, "--wan", self.wan)
        self.partitioned.discard(cluster)


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` in the metrics `text` that carry `labels`."""
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@contextlib.contextmanager
def clusters(base: Path, topology: Topology) -> Iterator[Clusters]:
    """A run directory and a trust anchor of their own for the clusters of
    `topology`, which the caller brings up; everything is removed on the way out."""
    env = {**os.environ, "MESHGATE_RUN_DIR": str(base / "run"), "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    previous = os.environ.get("MESHGATE_RUN_DIR")
    os.environ["MESHGATE_RUN_DIR"] = env["MESHGATE_RUN_DIR"]
    left = topology.ours()
    assert not left, f"namespaces of an earlier run are in the way: {left}"
    c = Clusters(base, env, topology)
    try:
        c.meshgate("identity", "init", "--trust-domain", "cluster.local", "--out",
                   str(base / "anchor"))
        yield c
    finally:
        for cluster in list(c.partitioned):
            c.meshgate("cluster", "wan", "heal", "--name", cluster, "--wan", c.wan,
                       check=False)
        c.stop_pods()
        failed = [down for cluster in topology.cidrs
                  if (down := c.meshgate("cluster", "down", "--name", cluster,
                                         check=False)).returncode != 0]
        if previous is None:
            del os.environ["MESHGATE_RUN_DIR"]
        else:
            os.environ["MESHGATE_RUN_DIR"] = previous
        left = topology.ours()
        assert not left, f"left behind: {left}; " + "; ".join(
            f"{' '.join(d.args[3:])}: {d.stderr.strip()}" for d in failed)
