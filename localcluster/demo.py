"""`make demo`: three linked clusters on this machine, until Ctrl-C.

It brings up clusters ``east``, ``west`` and ``central`` in network namespaces
under one trust anchor, on a shared WAN (`meshgate cluster up --multicluster`),
and links them (`meshgate multicluster link` applied with kubectl): east and
west both ways, and east imports central. East runs two ``web`` pods and a
``client`` pod (each with its sidecar proxy, as `meshgate cluster run-pod`
does); west and central each run their own exported ``web``. The client calls
``web.default.svc.cluster.local``, then west's web by its mirror's name,
``web-west.default.svc.cluster.local``, through west's gateway: every answer
names the pod that served it, and each web pod's proxy reports the caller
identity it verified (for west, the caller the gateway forwarded).

Then VM ``legacy`` on the WAN joins east with the line `meshgate vm token`
printed (localcluster.demovm): east's client calls
``legacy.default.svc.cluster.local`` and the VM's proxy reports the client's
identity; the VM calls ``web.default.svc.cluster.local`` (glibc, curl) and east's
web pods report the VM's; `meshgate vm status` shows the agent.

Last, east's web fails over to west, then to central, and back, under a steady
load from the client (localcluster.demofailover). Ctrl-C runs `meshgate vm leave`
in the VM, deletes it, and takes the clusters and the WAN down; each of those
steps runs even if one before it failed.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from localcluster.demofailover import WEB_PODS, FailoverScene
from localcluster.demosteps import kubectl, run_step, verified_callers, wait_until
from localcluster.demovm import LEGACY, VM, DemoVm
from localcluster.pods import in_pod, run_pod_argv
from localcluster.rootless import meshgate_argv
from localcluster.up import ClusterSpec, UpRequest, down, find, up
from mesh.errors import MeshError

CLUSTER = "east"
REMOTE = "west"
CENTRAL = "central"
CIDRS = {CLUSTER: ("10.244.0.0/16", "10.96.0.0/16"), REMOTE: ("10.245.0.0/16", "10.97.0.0/16"),
         CENTRAL: ("10.246.0.0/16", "10.98.0.0/16")}
LINKS = ((CLUSTER, REMOTE), (REMOTE, CLUSTER), (CLUSTER, CENTRAL))
"""(importing, exporting): east imports west and central, west imports east."""
WEB = "web.default.svc.cluster.local"
WEB_WEST = f"web-{REMOTE}.default.svc.cluster.local"
CALLS = 10
REMOTE_CALLS = 5
VM_CALLS = 5
_CALL = """
import sys, urllib.request
for _ in range(int(sys.argv[1])):
    print(urllib.request.urlopen(sys.argv[2], timeout=5).read().decode().strip(), flush=True)
"""
_GET = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())"


class Demo:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir.resolve()
        self.pods: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
        self.specs: dict[str, ClusterSpec] = {}
        self.vm: DemoVm | None = None

    @property
    def spec(self) -> ClusterSpec:
        return self.specs[CLUSTER]

    def start(self) -> None:
        anchor = self.state_dir / "anchor"
        if not (anchor / "anchor.crt").exists():
            run_step(meshgate_argv(["identity", "init", "--trust-domain", "cluster.local",
                                "--out", str(anchor)]), "creating the shared trust anchor")
        for cluster in CIDRS:
            print(f"bringing up cluster {cluster} in network namespaces ...", flush=True)
            pods, services = CIDRS[cluster]
            spec = self.specs[cluster] = up(UpRequest(
                name=cluster, state_dir=self.state_dir / cluster, pod_cidr=pods,
                service_cidr=services, identity_dir=anchor, multicluster=True))
            print(f"  {cluster}: pods {pods}, services {services}, WAN address "
                  f"{spec.wan_address}", flush=True)
        for importing, exporting in LINKS:
            self.link(importing, exporting)
        for cluster in CIDRS:
            self.kubectl("apply", "-f", "-", input=_WEB_SERVICE, cluster=cluster)
        for cluster, names in WEB_PODS.items():
            for name in names:
                self.start_web(cluster, name)
        self.run_pod("client", "client", ("sleep", "infinity"))
        for linked in (REMOTE, CENTRAL):
            wait_until(functools.partial(self._mirror_ready, linked),
                       f"east to mirror {linked}'s web as web-{linked}")
        self.vm = DemoVm(self.spec, self.state_dir)
        self.vm.join()

    def link(self, importing: str, exporting: str) -> None:
        spec = self.specs[exporting]
        docs = run_step(meshgate_argv([
            "multicluster", "link", "--kubeconfig", str(spec.kubeconfig), "--cluster-name",
            exporting, "--trust-domain", spec.trust_domain]),
            f"linking {exporting} to {importing}")
        self.kubectl("apply", "-f", "-", input=docs, cluster=importing)
        print(f"  {importing} imports {exporting}'s exported Services (Link {exporting})",
              flush=True)

    def _mirror_ready(self, linked: str) -> bool:
        out = self.kubectl("get", "endpointslices", "-l",
                           f"kubernetes.io/service-name=web-{linked}", "-o",
                           "jsonpath={.items[*].endpoints[*].conditions.ready}", check=False)
        return out.strip() == "true"

    def start_web(self, cluster: str, pod: str) -> None:
        """A pod of `cluster`'s exported web: the demo app behind its proxy."""
        app = (sys.executable, "-m", "localcluster.demoapp", "--port", "8080")
        self.run_pod(pod, "web", app, labels=("app=web",), port=8080, cluster=cluster)

    def stop_pods(self, pods: Sequence[str]) -> None:
        """Stop `pods` as a kubelet does (SIGTERM, then SIGKILL), each gone on return:
        its Pod object, its network namespace, its proxy."""
        running = {name: self.pods.pop(name)[1] for name in pods if name in self.pods}
        for proc in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in running.items():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                print(f"  pod {name} did not stop within 15s of SIGTERM and was killed: its "
                      "proxy and app may be left running", flush=True)

    def run_pod(self, name: str, sa: str, command: tuple[str, ...], *,
                labels: tuple[str, ...] = (), port: int | None = None,
                cluster: str = CLUSTER) -> None:
        argv = run_pod_argv(cluster, name, command, service_account=sa, labels=labels,
                            port=port)
        log_path = self.specs[cluster].state_dir / "logs" / f"pod-{name}.log"
        with open(log_path, "wb") as log:
            self.pods[name] = (cluster, subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        wait_until(lambda: self._ready(name, log_path), f"pod {name} to be ready")
        print(f"  pod {name} is ready in {cluster} (service account {sa})", flush=True)

    def _ready(self, name: str, log_path: Path) -> bool:
        cluster, proc = self.pods[name]
        if proc.poll() is not None:
            raise MeshError(f"pod {name} exited: {log_path.read_text().strip()}")
        out = self.kubectl("get", "pod", name, "-o",
                           "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                           check=False, cluster=cluster)
        return out.strip() == "True"

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                cluster: str = CLUSTER) -> str:
        return kubectl(self.specs[cluster].kubeconfig, *args, input=input, check=check)

    def show(self) -> None:
        self.calls(WEB, CALLS, "")
        print("\nwhat each web pod's proxy verified (mTLS client identity, requests):")
        for pod in ("web-1", "web-2"):
            for identity, count in self.callers(pod).items():
                print(f"  {pod}: {identity}  {count:.0f}")
        self.calls(WEB_WEST, REMOTE_CALLS, f" (west's web, through west's gateway at "
                   f"{self.specs[REMOTE].wan_address}:4143)")
        print("\nwhat west's web pod's proxy verified (the caller west's gateway forwarded, "
              "requests):")
        for identity, count in self.callers("west-web-1", REMOTE).items():
            print(f"  west-web-1 in {REMOTE}: {identity}  {count:.0f}")
        self.report_links()
        self.show_vm()
        FailoverScene(self.spec, self).play()
        print("\nlook at the objects:")
        for cluster in CIDRS:
            print(f"  kubectl --kubeconfig {self.specs[cluster].kubeconfig} get "
                  "pods,services,endpointslices,links -A")
        print(f"  kubectl --kubeconfig {self.spec.kubeconfig} get externalworkloads")
        print(f"call again:\n  meshgate cluster run-pod --cluster {CLUSTER} --name once -- "
              f"python3 -c \"import urllib.request; print(urllib.request.urlopen("
              f"'http://{WEB_WEST}/').read().decode())\"")
        print(f"  meshgate cluster vm exec --name {VM} -- curl -s http://{WEB}/")
        print(f"\nkubectl is in .venv/bin. Press Ctrl-C to stop, remove VM {VM} and the "
              "clusters.", flush=True)

    def show_vm(self) -> None:
        """East's client calls the VM, the VM calls east's web; what each proxy verified."""
        vm = self.vm
        assert vm is not None
        # The client's proxy learns the VM's endpoint from its control plane's watch.
        wait_until(lambda: self._answers(LEGACY), f"the client's first answer from VM {VM}")
        self.calls(LEGACY, VM_CALLS, f" (VM {VM}, through its proxy on the WAN)")
        print(f"\nwhat VM {VM}'s proxy verified (mTLS client identity, requests):")
        for identity, count in vm.callers().items():
            print(f"  {VM}: {identity}  {count:.0f}")
        vm.calls(WEB, VM_CALLS)
        print(f"\nwhat each web pod's proxy verified now (east's client and VM {VM}, "
              "requests):")
        for pod in ("web-1", "web-2"):
            for identity, count in self.callers(pod).items():
                print(f"  {pod}: {identity}  {count:.0f}")
        vm.status()

    def _answers(self, name: str) -> bool:
        return in_pod(self.spec, "default", "client",
                      [sys.executable, "-c", _CALL, "1", f"http://{name}/"]).returncode == 0

    def calls(self, name: str, n: int, how: str) -> None:
        print(f"\nthe client pod in {CLUSTER} calls http://{name}/ {n} times{how}:", flush=True)
        calls = in_pod(self.spec, "default", "client",
                       [sys.executable, "-c", _CALL, str(n), f"http://{name}/"])
        if calls.returncode != 0:
            raise MeshError(f"the calls to {name} failed: {calls.stderr.strip()}")
        for line in calls.stdout.splitlines():
            print(f"  {line}")

    def report_links(self) -> None:
        """Each importing cluster's Links as their mirror controllers wrote them, then
        `meshgate multicluster gateways` and `meshgate multicluster check`."""
        print("\nthe links, as each cluster's mirror controller reports them:")
        for cluster in (CLUSTER, REMOTE):
            out = self.kubectl("get", "links", "-n", "meshgate", "-o", _LINK_COLUMNS,
                               "--no-headers", cluster=cluster, check=False)
            for line in out.splitlines():
                name, gateway, alive, ready = (line.split() + ["?"] * 4)[:4]
                print(f"  {cluster} imports {name}: gateway {gateway}, gateway alive "
                      f"{alive}, link ready {ready}")
        for cluster in (CLUSTER, REMOTE):
            self.run_and_print(
                f"meshgate multicluster gateways --kubeconfig {self.specs[cluster].kubeconfig}",
                meshgate_argv(["multicluster", "gateways", "--kubeconfig",
                               str(self.specs[cluster].kubeconfig)]))
        for cluster in (CLUSTER, REMOTE):
            # On the node, where the mirror controllers run: only there is the linked
            # cluster's WAN address reachable.
            self.run_and_print(
                f"meshgate cluster exec --name {cluster} -- meshgate multicluster check",
                meshgate_argv(["cluster", "exec", "--name", cluster, "--",
                               *meshgate_argv(["multicluster", "check"])]))

    @staticmethod
    def run_and_print(title: str, argv: list[str]) -> None:
        print(f"\n{title}", flush=True)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        for line in (proc.stdout + proc.stderr).splitlines():
            print(f"  {line}")

    def callers(self, pod: str, cluster: str = CLUSTER) -> dict[str, float]:
        page = in_pod(self.specs[cluster], "default", pod,
                      [sys.executable, "-c", _GET, "http://127.0.0.1:4191/metrics"])
        return verified_callers(page.stdout)

    def stop(self) -> list[str]:
        """Leave and delete the VM, stop the pods, take the clusters down (and with the
        last, the WAN); what could not be done. Each step runs whatever came before."""
        problems = self.vm.stop() if self.vm is not None else []
        self.stop_pods(list(self.pods))
        for cluster in CIDRS:
            try:
                find(cluster)
            except MeshError:
                continue
            try:
                down(cluster)
            except (MeshError, OSError, subprocess.SubprocessError) as e:
                problems.append(f"taking cluster {cluster} down: {e}")
            else:
                print(f"cluster {cluster} is down", flush=True)
        return problems


_WEB_SERVICE = """apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
  labels:
    mirror.meshgate.io/exported: "true"
spec:
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: 8080
"""


_LINK_COLUMNS = ("custom-columns=LINK:.metadata.name,GATEWAY:.spec.gatewayAddress,"
                 "ALIVE:.status.conditions[?(@.type=='GatewayAlive')].status,"
                 "READY:.status.conditions[?(@.type=='Ready')].status")


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
    code = 0
    try:
        demo.start()
        demo.show()
        stop.wait()
    except MeshError as e:
        print(f"meshgate demo: {e}", file=sys.stderr)
        code = 2
    finally:
        left = demo.stop()
    for problem in left:
        print(f"meshgate demo: left behind: {problem}", file=sys.stderr)
    sys.exit(code or (1 if left else 0))


if __name__ == "__main__":
    main()
