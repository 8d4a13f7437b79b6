"""The cluster and the VM that bench/vm.py measures, as tests/e2e/test_vm.py sets
them up: one multicluster cluster on a WAN of its own with the `web` pod (nginx on
127.0.0.1:8080 behind its proxy) and the `client` pod, and the VM on that WAN with
nginx on its loopback as its own app. `Rig.down` removes whatever of it was made.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dataplane import NGINX_CONF, BenchError
from kubernetes import client
from kubernetes.client.rest import ApiException
from pyroute2 import netns

from localcluster import vms
from localcluster.pods import in_pod, run_pod_argv
from localcluster.up import find
from mesh.kube import api_client

CLUSTER, VM, WORKLOAD = "vmbench", "vmbench-legacy", "legacy"
WAN, WAN_CIDR = "mg-vmbenchwan", "172.31.240.0/24"
PODS, SERVICES = "10.226.0.0/16", "10.227.0.0/16"
DOMAIN = "cluster.local"
WEB = f"http://web.default.svc.{DOMAIN}/"
LEGACY = f"http://legacy.default.svc.{DOMAIN}/"
STATE = "/var/lib/meshgate"  # in the VM: its private copy
KUBECTL = str(Path(sys.executable).parent / "kubectl")

SERVICES_YAML = f"""
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {WORKLOAD}, namespace: default}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: legacy, namespace: default}}
spec:
  selector: {{app: {WORKLOAD}}}
  ports: [{{name: http, port: 80, targetPort: http}}]
"""


@dataclass
class Rig:
    """The cluster, its pods, the VM and its app; `down` removes whatever was made."""

    base: Path
    pods: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    app: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None
    agent_log: Path | None = None
    joins: int = 0

    @property
    def kubeconfig(self) -> Path:
        return self.base / CLUSTER / "kubeconfig"

    def meshgate(self, *args: str, check: bool = True, timeout: float = 180
                 ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True,
                              text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise BenchError(f"meshgate {shlex.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}{proc.stderr}")
        return proc

    def in_vm(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(vms.exec_argv(VM, argv), capture_output=True, text=True,
                              timeout=timeout, check=False)

    def in_client(self, argv: list[str], timeout: float = 60
                  ) -> subprocess.CompletedProcess[str]:
        return in_pod(find(CLUSTER), "default", "client", argv, timeout=timeout)

    def up(self) -> None:
        anchor = self.base / "anchor"
        self.meshgate("identity", "init", "--trust-domain", DOMAIN, "--out", str(anchor))
        self.meshgate("cluster", "up", "--name", CLUSTER, "--state-dir",
                      str(self.base / CLUSTER), "--pod-cidr", PODS, "--service-cidr",
                      SERVICES, "--identity-dir", str(anchor), "--multicluster", "--wan", WAN,
                      "--wan-cidr", WAN_CIDR)
        applied = subprocess.run([KUBECTL, "--kubeconfig", str(self.kubeconfig), "apply",
                                  "-f", "-"], input=SERVICES_YAML, capture_output=True,
                                 text=True, timeout=30, check=False)
        if applied.returncode != 0:
            raise BenchError(f"kubectl apply failed: {applied.stderr}")
        self.run_pod("web-1", self.nginx("web-1"), sa="web", labels=("app=web",), port=8080)
        self.run_pod("client", ("sleep", "infinity"), sa="frontend")
        vms.create(VM, wan=WAN)
        with open(self.base / "vm-app.log", "wb") as out:
            self.app = subprocess.Popen(vms.exec_argv(VM, list(self.nginx("vm"))), stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def nginx(self, name: str) -> tuple[str, ...]:
        """nginx as bench/dataplane.py runs it (one worker, a 2-byte body) on
        127.0.0.1:8080: the demo app writes its headers and body apart, so Nagle and
        the proxy's delayed ACK hold each answer ~40 ms, whatever the path."""
        base = self.base / f"nginx-{name}"
        for d in ("logs", "tmp"):
            (base / d).mkdir(parents=True)
        conf = base / "nginx.conf"
        conf.write_text(NGINX_CONF.format(base=base, port=8080))
        return ("nginx", "-p", str(base), "-e", str(base / "logs/error.log"), "-c", str(conf))

    def run_pod(self, name: str, command: tuple[str, ...], *, sa: str,
                labels: tuple[str, ...] = (), port: int | None = None) -> None:
        argv = run_pod_argv(CLUSTER, name, command, service_account=sa, labels=labels,
                            port=port)
        with open(self.base / f"pod-{name}.log", "wb") as out:
            self.pods[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True)
        core = client.CoreV1Api(api_client(self.kubeconfig))

        def ready() -> bool:
            if self.pods[name].poll() is not None:
                raise BenchError(f"pod {name} exited; see {self.base / f'pod-{name}.log'}")
            try:
                status = core.read_namespaced_pod(name, "default").status
            except ApiException as e:
                if e.status == 404:  # run-pod has not created it yet
                    return False
                raise
            return status is not None and any(c.type == "Ready" and c.status == "True"
                                              for c in status.conditions or [])

        wait_until(ready, 60, f"pod {name} to be ready")

    def token(self) -> list[str]:
        """A fresh `vm join` line (argv after `meshgate`), as `vm token` prints it."""
        wan = find(CLUSTER).wan_address
        out = self.meshgate("vm", "token", "--kubeconfig", str(self.kubeconfig), "--namespace",
                            "default", "--workload", WORKLOAD, "--service-account", WORKLOAD,
                            "--label", f"app={WORKLOAD}", "--port", "http:8080",
                            "--control-plane", f"https://{wan}:8086", "--gateway",
                            f"{wan}:4143", "--api-server", f"https://{wan}:6443",
                            "--trust-anchor-out", str(self.base / "anchor.pem")).stdout
        line = shlex.split(out.strip())
        if line[:3] != ["meshgate", "vm", "join"]:
            raise BenchError(f"vm token printed no join line:\n{out}")
        return line[1:]

    def start_join(self, line: list[str], heartbeat: str | None) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "mesh.cli", *line, "--foreground", "--state-dir", STATE]
        if heartbeat:
            argv += ["--heartbeat", heartbeat]
        self.joins += 1
        self.agent_log = self.base / f"join-{self.joins}.log"
        with open(self.agent_log, "wb") as out:
            # nsenter execs the agent: this pid is the agent's.
            self.agent = subprocess.Popen(vms.exec_argv(VM, argv), stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        return self.agent

    def agent_output(self) -> str:
        return self.agent_log.read_text(errors="replace") if self.agent_log else ""

    def leave(self) -> None:
        if self.agent is not None:
            stop(self.agent, 30)
            self.agent = None
        left = self.in_vm([sys.executable, "-m", "mesh.cli", "vm", "leave", "--state-dir",
                           STATE])
        if left.returncode != 0:
            raise BenchError(f"vm leave exited {left.returncode}: {left.stderr}")

    def ready_endpoints(self) -> list[str]:
        api = client.DiscoveryV1Api(api_client(self.kubeconfig))
        found = api.list_namespaced_endpoint_slice(
            "default", label_selector="kubernetes.io/service-name=legacy").items
        return [ep.addresses[0] for s in found for ep in s.endpoints or []
                if ep.conditions and ep.conditions.ready]

    def down(self) -> list[str]:
        """Remove everything; what could not be removed, in words."""
        teardown = Teardown()
        step = teardown.step
        if self.agent is not None:
            step("stop the agent", functools.partial(stop, self.agent, 30))
        if vms.netns_name(VM) in netns.listnetns():
            step("vm leave", lambda: self.in_vm([sys.executable, "-m", "mesh.cli", "vm",
                                                 "leave", "--state-dir", STATE]))
        for name, proc in [*self.pods.items(), *([("vm app", self.app)] if self.app else [])]:
            step(f"stop {name}", functools.partial(stop, proc, 30))
        step("delete the VM", lambda: vms.delete(VM))
        step("cluster down", lambda: self.meshgate("cluster", "down", "--name", CLUSTER,
                                                   check=False))
        return teardown.done(ours())


class Teardown:
    """Taking a rig down: each step runs even if one before it failed, and what failed
    is kept, in words."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def step(self, what: str, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception as e:  # go on: every later step still has to run
            self.failures.append(f"{what}: {e}")

    def done(self, left: list[str]) -> list[str]:
        """The failures, with the rig's namespaces still there (`left`) as one more."""
        if left:
            self.failures.append(f"namespaces left behind: {' '.join(left)}")
        return self.failures


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def preflight(script: str, left: list[str], cluster: str) -> bool:
    """Root, and no namespaces of an earlier run (`left`); else say so and False."""
    if os.geteuid() != 0:
        print(f"{script} makes network namespaces: run it as root", file=sys.stderr)
        return False
    if left:
        print(f"namespaces of an earlier run are in the way: {' '.join(left)}; remove them "
              f"(`meshgate cluster down --name {cluster}`, `ip netns delete NAME`)",
              file=sys.stderr)
        return False
    return True


def run_dir(prefix: str) -> Path:
    """A temporary directory under which every meshgate command and localcluster call
    below keeps its state (through the environment they inherit)."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["MESHGATE_RUN_DIR"] = str(base / "run")
    os.environ["PYTHONUNBUFFERED"] = "1"
    os.environ["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    return base


def ours() -> list[str]:
    return [n for n in netns.listnetns()
            if n.startswith(f"mg-{CLUSTER}-") or n in (WAN, vms.netns_name(VM))]


def stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the process's group, SIGKILL it after `timeout` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def sigterm_as_interrupt(owner: int) -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so that the rig comes down; but
    only in this process: pyroute2 forks helpers (to open netlink sockets in a namespace)
    and ends them with SIGTERM, and a helper that unwound into `main` would take the rig
    down under the parent's feet."""
    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait while the rig comes down (every step is bounded)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT,
                                                                      signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
