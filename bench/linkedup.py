"""Time README's multicluster steps: from nothing to a pod in one cluster calling the
other's Service by its mirror's name.

Two clusters under one trust anchor (`cluster up --multicluster`, one after the other,
as the README runs them), east linked to west (`multicluster link | kubectl apply`),
west's ``web`` Service exported with one pod (`run-pod`), a client pod in east, then
GETs of ``web-<west>.default.svc.cluster.local`` from the client until one answers 200.
Prints the time of each step, from the start. Needs root; everything it made is
removed at the end.

    .venv/bin/python bench/linkedup.py [--up-arg ARG ...]

``--up-arg`` passes an argument on to both `cluster up` commands.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EAST, WEST = "mgbenchle", "mgbenchlw"
WAN, WAN_CIDR = "mg-benchlwan", "172.31.238.0/24"
CIDRS = {EAST: ("10.216.0.0/16", "10.217.0.0/16"), WEST: ("10.218.0.0/16", "10.221.0.0/16")}
GET = ("import sys, urllib.request\n"
       "print(urllib.request.urlopen(sys.argv[1], timeout=5).status)")
KUBECTL = str(Path(sys.executable).parent / "kubectl")
SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default, labels: {mirror.meshgate.io/exported: "true"}}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--up-arg", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshgate-bench-linked-") as tmp:
        run(Path(tmp), args.up_arg)


def run(base: Path, up_args: list[str]) -> None:
    env = {**os.environ, "MESHGATE_RUN_DIR": str(base / "run"), "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    os.environ["MESHGATE_RUN_DIR"] = env["MESHGATE_RUN_DIR"]
    meshgate = [sys.executable, "-m", "mesh.cli"]
    pods: list[subprocess.Popen[bytes]] = []
    start = time.monotonic()

    def step(what: str) -> None:
        print(f"{time.monotonic() - start:6.1f} s  {what}", flush=True)

    def sh(*argv: str, input: str | None = None) -> str:
        return subprocess.run(argv, env=env, check=True, capture_output=True, text=True,
                              input=input, timeout=300).stdout

    def kubectl(cluster: str, *argv: str, input: str | None = None) -> str:
        return sh(KUBECTL, "--kubeconfig", str(base / cluster / "kubeconfig"), *argv,
                  input=input)

    def pod(cluster: str, name: str, *command: str, sa: str, label: str = "") -> None:
        from localcluster.pods import run_pod_argv

        argv = run_pod_argv(cluster, name, command, service_account=sa,
                            labels=[label] if label else [], port=8080 if label else None)
        pods.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True))

    try:
        sh(*meshgate, "identity", "init", "--trust-domain", "cluster.local", "--out",
           str(base / "anchor"))
        for cluster, (pod_cidr, service_cidr) in CIDRS.items():
            sh(*meshgate, "cluster", "up", "--name", cluster, "--state-dir",
               str(base / cluster), "--pod-cidr", pod_cidr, "--service-cidr", service_cidr,
               "--identity-dir", str(base / "anchor"), "--multicluster", "--wan", WAN,
               "--wan-cidr", WAN_CIDR, *up_args)
            step(f"cluster up {cluster}")
        link = sh(*meshgate, "multicluster", "link", "--kubeconfig",
                  str(base / WEST / "kubeconfig"), "--cluster-name", WEST)
        kubectl(EAST, "apply", "-f", "-", input=link)
        kubectl(WEST, "apply", "-f", "-", input=SERVICE)
        step("linked, web exported")
        pod(WEST, "web-1", sys.executable, "-m", "localcluster.demoapp", "--port", "8080",
            sa="web", label="app=web")
        pod(EAST, "client", "sleep", "600", sa="frontend")
        from localcluster.pods import in_pod
        from localcluster.up import find
        from mesh.errors import MeshError

        url = f"http://web-{WEST}.default.svc.cluster.local/"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                out = in_pod(find(EAST), "default", "client",
                             [sys.executable, "-c", GET, url], timeout=30)
            except (subprocess.TimeoutExpired, MeshError):  # the pod not there yet
                time.sleep(0.2)
                continue
            if out.stdout.strip() == "200":
                step("east's client got 200 from west's web through west's gateway")
                return
            time.sleep(0.2)
        raise SystemExit("no 200 within 180 s")
    finally:
        for proc in pods:
            proc.send_signal(signal.SIGTERM)
        for proc in pods:
            proc.wait(30)
        for cluster in CIDRS:
            subprocess.run([*meshgate, "cluster", "down", "--name", cluster], env=env,
                           capture_output=True)


if __name__ == "__main__":
    main()
