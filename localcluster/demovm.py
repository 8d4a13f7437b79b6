"""The VM part of `make demo`: VM ``legacy`` joins east, and it and east call each other.

VM ``legacy`` (localcluster.vms: network and mount namespaces of its own on the
WAN, with no route to any pod network) runs the demo app on its loopback. East
gets a ServiceAccount ``legacy`` and a Service ``legacy`` selecting
``app=legacy``; `meshgate vm token` mints the VM's single-use join token and
prints the one line to run on the VM, `meshgate vm join ...`, which the demo
runs inside it (in the foreground: the VM has no systemd). Then

    client pod -> node -> WAN -> VM proxy (4143) -> the VM's app on 127.0.0.1:8080
    VM app (glibc, curl) -> VM proxy (AnyIP route, mesh DNS) -> east's gateway -> web pod

and each proxy counts the identity it verified. `stop` runs `meshgate vm leave`
in the VM and deletes the VM, whatever state an earlier step left it in.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import sys
from pathlib import Path

from localcluster import vms
from localcluster.demosteps import kubectl, run_step, verified_callers, wait_until
from localcluster.rootless import meshgate_argv
from localcluster.up import ClusterSpec
from mesh.errors import MeshError

VM = "legacy"
LEGACY = "legacy.default.svc.cluster.local"
ADMIN = "http://127.0.0.1:4191"
"""The VM proxy's admin port, inside the VM."""
_WAIT_EXIT = 10.0
_LEGACY = """apiVersion: v1
kind: ServiceAccount
metadata:
  name: legacy
  namespace: default
---
apiVersion: v1
kind: Service
metadata:
  name: legacy
  namespace: default
spec:
  selector:
    app: legacy
  ports:
  - name: http
    port: 80
    targetPort: http
"""


class DemoVm:
    """VM ``legacy`` and its agent, joined to the cluster `home`."""

    def __init__(self, home: ClusterSpec, state_dir: Path) -> None:
        self.home = home
        self.state_dir = state_dir
        self.app: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_log = state_dir / "logs" / f"vm-{VM}-agent.log"

    def join(self) -> None:
        """Create the VM with its app, mint its token, run the join line in it."""
        kubectl(self.home.kubeconfig, "apply", "-f", "-", input=_LEGACY)
        if self.home.wan is None or self.home.wan_address is None:
            raise MeshError(f"cluster {self.home.name} is not on a WAN; a VM reaches it there")
        # A VM an interrupted run left behind still holds that run's join: start afresh.
        vms.delete(VM)
        vm = vms.create(VM, wan=self.home.wan)
        self.agent_log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "logs" / f"vm-{VM}-app.log", "wb") as log:
            self.app = subprocess.Popen(vms.exec_argv(VM, [
                "env", f"POD_NAME={VM}", "POD_NAMESPACE=default", sys.executable, "-m",
                "localcluster.demoapp", "--port", "8080"]), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        print(f"\nVM {VM} is on the WAN at {vm.address.ip} (network namespace {vm.netns}, no "
              "route to any pod network); its app answers on 127.0.0.1:8080 inside it",
              flush=True)
        line = self.token()
        print(f"\nin VM {VM} (it has no systemd, so the agent runs in the foreground):\n"
              f"  meshgate cluster vm exec --name {VM} -- "
              f"{shlex.join(['meshgate', *line, '--foreground'])}", flush=True)
        with open(self.agent_log, "wb") as log:
            self.agent = subprocess.Popen(
                vms.exec_argv(VM, meshgate_argv([*line, "--foreground"])), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._joined, f"VM {VM} to join {self.home.name} (see {self.agent_log})")
        for said in self.agent_log.read_text().splitlines():
            if said.startswith(("enrolled as", "joined:")):
                print(f"  {said}")
        wait_until(self._ready, f"VM {VM} to be a ready endpoint of Service legacy")
        print(f"  {self.home.name}'s Service legacy has the VM as a ready endpoint", flush=True)

    def token(self) -> list[str]:
        """Mint the join token as the operator does; the join line it printed, as argv
        after ``meshgate``."""
        wan = self.home.wan_address
        args = ["vm", "token", "--kubeconfig", str(self.home.kubeconfig), "--namespace",
                "default", "--workload", VM, "--service-account", "legacy", "--label",
                "app=legacy", "--port", "http:8080", "--control-plane", f"https://{wan}:8086",
                "--gateway", f"{wan}:4143", "--api-server", f"https://{wan}:6443",
                "--trust-anchor-out", str(self.state_dir / f"vm-{VM}-trust-anchor.pem")]
        print(f"\nthe operator mints the VM's join token in {self.home.name}:\n"
              f"  {shlex.join(['meshgate', *args])}", flush=True)
        printed = run_step(meshgate_argv(args), f"minting VM {VM}'s join token").strip()
        line = shlex.split(printed)
        if line[:3] != ["meshgate", "vm", "join"]:
            raise MeshError(f"`meshgate vm token` printed no join line: {printed!r}")
        print(f"which prints the one command to run on the VM:\n  {printed}", flush=True)
        return line[1:]

    def _joined(self) -> bool:
        if self.agent is not None and self.agent.poll() is not None:
            raise MeshError(f"`meshgate vm join` exited {self.agent.returncode}: "
                            f"{self.agent_log.read_text().strip()}")
        return "joined:" in self.agent_log.read_text()

    def _ready(self) -> bool:
        # Nested ranges: kubectl's `.items[*].endpoints[*]` yields nothing at all when the
        # first slice (the pods', here) has no endpoints.
        out = kubectl(self.home.kubeconfig, "get", "endpointslices", "-l",
                      "kubernetes.io/service-name=legacy", "-o",
                      "jsonpath={range .items[*]}{range .endpoints[*]}{.conditions.ready} "
                      "{end}{end}", check=False)
        return "true" in out.split()

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the VM."""
        return subprocess.run(vms.exec_argv(VM, argv), capture_output=True, text=True,
                              timeout=60, check=False)

    def callers(self) -> dict[str, float]:
        """The client identities the VM's proxy verified, with their request counts."""
        return verified_callers(self.run("curl", "-s", f"{ADMIN}/metrics").stdout)

    def calls(self, name: str, n: int) -> None:
        """The VM calls `name`: glibc resolves it, then curl calls it `n` times."""
        print(f"\nVM {VM} calls http://{name}/ (its resolver answers mesh names; an AnyIP "
              f"route hands the service address to its proxy, which goes through "
              f"{self.home.name}'s gateway):", flush=True)
        resolved = self.run("getent", "hosts", name)
        if resolved.returncode != 0:
            raise MeshError(f"glibc in VM {VM} cannot resolve {name} (exit status "
                            f"{resolved.returncode}); see `meshgate vm status`")
        print(f"  getent hosts {name}: {' '.join(resolved.stdout.split())}")
        for _ in range(n):
            answer = self.run("curl", "-sS", "--max-time", "5", f"http://{name}/")
            if answer.returncode != 0:
                raise MeshError(f"VM {VM}'s call to {name} failed: {answer.stderr.strip()}")
            print(f"  curl: {answer.stdout.strip()}", flush=True)

    def status(self) -> None:
        print(f"\nin VM {VM}: meshgate vm status", flush=True)
        out = self.run(*meshgate_argv(["vm", "status"]))
        _show(out)

    def stop(self) -> list[str]:
        """`meshgate vm leave` in the VM (it stops the agent), then delete the VM; what
        could not be done. Each step runs whatever the one before it did."""
        problems: list[str] = []
        if self.agent is not None:
            print(f"\nin VM {VM}: meshgate vm leave", flush=True)
            try:
                left = self.run(*meshgate_argv(["vm", "leave"]))
                _show(left)
                if left.returncode != 0:
                    problems.append(f"`meshgate vm leave` in VM {VM} exited {left.returncode}")
            except (MeshError, OSError, subprocess.SubprocessError) as e:
                problems.append(f"`meshgate vm leave` in VM {VM}: {e}")
        try:
            vms.delete(VM)  # also stops whatever still runs in it
        except (MeshError, OSError, subprocess.SubprocessError) as e:
            problems.append(f"deleting VM {VM}: {e}")
        else:
            if self.app is not None:
                print(f"VM {VM} is deleted", flush=True)
        for proc in (self.agent, self.app):
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(_WAIT_EXIT)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return problems


def _show(proc: subprocess.CompletedProcess[str]) -> None:
    """What a meshgate command printed; its log lines too when it failed."""
    for said in (proc.stdout + (proc.stderr if proc.returncode else "")).splitlines():
        print(f"  {said}", flush=True)
