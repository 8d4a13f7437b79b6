"""`make demo`: a one-cluster mesh on this machine, until Ctrl-C.

It brings up cluster ``east`` in network namespaces (`meshgate cluster up`),
creates a ``web`` Service, starts two ``web`` pods and a ``client`` pod (each
with its sidecar proxy, as `meshgate cluster run-pod` does), then calls
``web.default.svc.cluster.local`` from the client: every answer names the pod
that served it, and each web pod's proxy reports the caller identity it
verified over mTLS. Later capabilities extend this walk-through (a second
cluster, linking, a VM, failover).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from localcluster.pods import in_pod
from localcluster.up import ClusterSpec, UpRequest, down, find, up
from mesh.errors import MeshError

CLUSTER = "east"
WEB = "web.default.svc.cluster.local"
CALLS = 10
_CALL = """
import sys, urllib.request
for _ in range(int(sys.argv[1])):
    print(urllib.request.urlopen(sys.argv[2], timeout=5).read().decode().strip(), flush=True)
"""
_GET = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())"


def _meshgate(*args: str) -> list[str]:
    return [sys.executable, "-m", "mesh.cli", *args]


class Demo:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir.resolve()
        self.pods: dict[str, subprocess.Popen[bytes]] = {}
        self.spec: ClusterSpec | None = None

    def start(self) -> None:
        print(f"bringing up cluster {CLUSTER} in network namespaces ...", flush=True)
        self.spec = up(UpRequest(name=CLUSTER, state_dir=self.state_dir / CLUSTER,
                                 pod_cidr="10.244.0.0/16", service_cidr="10.96.0.0/16"))
        self.kubectl("apply", "-f", "-", input=_WEB_SERVICE)
        app = (sys.executable, "-m", "localcluster.demoapp", "--port", "8080")
        for name in ("web-1", "web-2"):
            self.run_pod(name, "web", app, labels=("app=web",), port=8080)
        self.run_pod("client", "client", ("sleep", "infinity"))

    def run_pod(self, name: str, sa: str, command: tuple[str, ...], *,
                labels: tuple[str, ...] = (), port: int | None = None) -> None:
        args = ["cluster", "run-pod", "--cluster", CLUSTER, "--name", name,
                "--service-account", sa]
        for label in labels:
            args += ["--label", label]
        if port is not None:
            args += ["--port", str(port)]
        assert self.spec is not None
        log_path = self.spec.state_dir / "logs" / f"pod-{name}.log"
        with open(log_path, "wb") as log:
            self.pods[name] = subprocess.Popen(_meshgate(*args, "--", *command), stdout=log,
                                               stderr=subprocess.STDOUT,
                                               start_new_session=True)
        _wait(lambda: self._ready(name, log_path), f"pod {name} to be ready")
        print(f"  pod {name} is ready (service account {sa})", flush=True)

    def _ready(self, name: str, log_path: Path) -> bool:
        proc = self.pods[name]
        if proc.poll() is not None:
            raise MeshError(f"pod {name} exited: {log_path.read_text().strip()}")
        out = self.kubectl("get", "pod", name, "-o",
                           "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                           check=False)
        return out.strip() == "True"

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        assert self.spec is not None
        kubectl = Path(sys.executable).parent / "kubectl"
        proc = subprocess.run([str(kubectl) if kubectl.exists() else "kubectl",
                               "--kubeconfig", str(self.spec.kubeconfig), *args],
                              capture_output=True, text=True, input=input, timeout=30,
                              check=False)
        if check and proc.returncode != 0:
            raise MeshError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def show(self) -> None:
        assert self.spec is not None
        print(f"\nthe client pod calls http://{WEB}/ {CALLS} times:", flush=True)
        calls = in_pod(self.spec, "default", "client",
                       [sys.executable, "-c", _CALL, str(CALLS), f"http://{WEB}/"])
        if calls.returncode != 0:
            raise MeshError(f"the calls failed: {calls.stderr.strip()}")
        for line in calls.stdout.splitlines():
            print(f"  {line}")
        print("\nwhat each web pod's proxy verified (mTLS client identity, requests):")
        for pod in ("web-1", "web-2"):
            for identity, count in self.callers(pod).items():
                print(f"  {pod}: {identity}  {count:.0f}")
        kubeconfig = self.spec.kubeconfig
        print(f"\nlook at the objects:\n  kubectl --kubeconfig {kubeconfig} get "
              "pods,services,endpointslices -o wide")
        print(f"call again:\n  meshgate cluster run-pod --cluster {CLUSTER} --name once -- "
              f"python3 -c \"import urllib.request; print(urllib.request.urlopen("
              f"'http://{WEB}/').read().decode())\"")
        print("\nkubectl is in .venv/bin. Press Ctrl-C to stop and remove the cluster.",
              flush=True)

    def callers(self, pod: str) -> dict[str, float]:
        assert self.spec is not None
        page = in_pod(self.spec, "default", pod,
                      [sys.executable, "-c", _GET, "http://127.0.0.1:4191/metrics"])
        seen: dict[str, float] = {}
        for family in text_string_to_metric_families(page.stdout):
            for sample in family.samples:
                if sample.name == "request_total" and \
                        sample.labels.get("direction") == "inbound":
                    who = sample.labels.get("client_id") or "(no identity)"
                    seen[who] = seen.get(who, 0) + sample.value
        return seen

    def stop(self) -> None:
        for proc in self.pods.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.pods.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        try:
            find(CLUSTER)
        except MeshError:
            return
        down(CLUSTER)
        print(f"cluster {CLUSTER} is down", flush=True)


_WEB_SERVICE = """apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: 8080
"""


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise MeshError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state-dir", type=Path, default=Path("demo-state"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("meshgate demo: network namespaces need root (CAP_NET_ADMIN and "
              "CAP_SYS_ADMIN); run `sudo make demo`", file=sys.stderr)
        sys.exit(2)
    demo = Demo(args.state_dir)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        demo.start()
        demo.show()
        stop.wait()
    except MeshError as e:
        print(f"meshgate demo: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        demo.stop()


if __name__ == "__main__":
    main()
