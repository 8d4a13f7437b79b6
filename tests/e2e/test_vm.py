"""A VM joins a cluster, as a user does it: `meshgate vm token` on the operator's
side, `meshgate vm join` inside a VM namespace on the WAN (no route to any pod
network), then calls both ways by name, policy, the heartbeat window, `vm status`,
`vm leave` restoring the VM byte for byte, and the join's bad inputs.

    VM app -> VM proxy (AnyIP route, mesh DNS) -> WAN -> home gateway -> web pod
    client pod -> node (masquerade) -> WAN -> VM proxy (4143) -> VM app
"""

from __future__ import annotations

import difflib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client
from pyroute2 import netns

from localcluster import vms
from mesh.control.externalworkloads import GROUP, PLURAL, VERSION
from mesh.kube import api_client
from tests.cluster import wait_for
from tests.e2e.clusters import DEMO_APP, Clusters, Topology, clusters, value
from tests.e2e.pod_scripts import CALLS

HOME, VM = "vmhome", "legacy"
WAN = "mg-vme2ewan"
TOPOLOGY = Topology(wan=WAN, wan_cidr="172.31.250.0/24",
                    cidrs={HOME: ("10.236.0.0/16", "10.237.0.0/16")})
DOMAIN = "cluster.local"
VM_ID = f"legacy.default.serviceaccount.identity.meshgate.{DOMAIN}"
CLIENT_ID = f"frontend.default.serviceaccount.identity.meshgate.{DOMAIN}"
WEB = f"web.default.svc.{DOMAIN}"
LEGACY = f"legacy.default.svc.{DOMAIN}"
STATE = "/var/lib/meshgate"
HEARTBEAT = "1s"
"""The cluster's heartbeat interval: a VM whose agent stops leaves within 3 s."""

SERVICES_YAML = """
apiVersion: v1
kind: ServiceAccount
metadata: {name: legacy, namespace: default}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: default}
spec:
  selector: {app: legacy}
  ports: [{name: http, port: 80, targetPort: http}]
"""


@dataclass
class Home:
    """The home cluster (through the shared multi-cluster helper) and the VM."""

    c: Clusters
    agent: subprocess.Popen[str] | None = None
    agent_log: Path | None = None
    app: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> Path:
        return self.c.base

    @property
    def env(self) -> dict[str, str]:
        return self.c.env

    @property
    def kubeconfig(self) -> Path:
        return self.c.kubeconfig(HOME)

    @property
    def wan_address(self) -> str:
        return self.c.wan_address(HOME)

    def meshgate(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.c.meshgate(*args, check=check)

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self.c.kubectl(HOME, *args, input=input)

    def vm(self, *argv: str, check: bool = True, timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the VM."""
        proc = subprocess.run(vms.exec_argv(VM, argv), env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"in the VM, {shlex.join(argv)} failed ({proc.returncode}):"
                                 f"\n{proc.stdout}\n{proc.stderr}")
        return proc

    def vm_meshgate(self, *args: str, check: bool = True, timeout: float = 60
                    ) -> subprocess.CompletedProcess[str]:
        return self.vm(sys.executable, "-m", "mesh.cli", *args, check=check, timeout=timeout)

    def token(self) -> list[str]:
        """A fresh join line for the VM, as `vm token` prints it (argv after `meshgate`)."""
        wan = self.wan_address
        out = self.meshgate("vm", "token", "--kubeconfig", str(self.kubeconfig),
                            "--namespace", "default", "--workload", VM, "--service-account",
                            "legacy", "--label", "app=legacy", "--port", "http:8080",
                            "--control-plane", f"https://{wan}:8086", "--gateway",
                            f"{wan}:4143", "--api-server", f"https://{wan}:6443",
                            "--trust-anchor-out", str(self.base / "anchor.pem")).stdout
        line = shlex.split(out.strip())
        assert line[:3] == ["meshgate", "vm", "join"], out
        return line[1:]

    def join(self, line: list[str]) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", "mesh.cli", *line, "--foreground", "--heartbeat",
                "0.5s", "--state-dir", STATE]
        self.agent_log = self.base / f"agent-{len(list(self.base.glob('agent-*')))}.log"
        with open(self.agent_log, "w") as log:
            proc = subprocess.Popen(vms.exec_argv(VM, argv), env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
        self.agent = proc
        agent_log = self.agent_log

        def joined() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"vm join exited {proc.returncode}:\n"
                                     f"{agent_log.read_text()}")
            return "joined:" in agent_log.read_text()

        wait_for(joined, timeout=60, interval=0.2, what="the VM to join")
        return proc

    def stop_agent(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            self.agent.wait(30)
        self.agent = None

    def calls(self, n: int, url: str = f"http://{LEGACY}/") -> list[str]:
        return self.c.in_pod(HOME, "client", CALLS, str(n), url).splitlines()

    def pod_metrics(self, pod: str) -> str:
        return self.c.metrics(HOME, pod)

    def metric(self, text: str, name: str, **labels: str) -> float:
        return value(text, name, **labels)

    def endpoints(self) -> list[tuple[str, bool]]:
        """legacy's endpoints the control plane wrote: (address, ready)."""
        api = client.DiscoveryV1Api(api_client(self.kubeconfig))
        found = api.list_namespaced_endpoint_slice(
            "default", label_selector="kubernetes.io/service-name=legacy").items
        return [(ep.addresses[0], bool(ep.conditions and ep.conditions.ready))
                for s in found for ep in s.endpoints or []]

    def snapshot(self) -> dict[str, str]:
        """What `vm leave` must give back byte for byte."""
        return {"routes": self.vm("ip", "-d", "route", "show", "table", "all").stdout,
                "addresses": self.vm("ip", "-d", "address", "show").stdout,
                "resolv.conf": self.vm("cat", "/etc/resolv.conf").stdout,
                "hosts": self.vm("cat", "/etc/hosts").stdout,
                "units": self.vm("ls", "-A", "/etc/systemd/system").stdout,
                "state": self.vm("ls", "-A", STATE).stdout}


WRITE = "import sys; open(sys.argv[1], 'w').write(sys.argv[2])"
"""Write argv[2] into the file argv[1] in place (the VM's resolv.conf is a bind mount)."""


def same(now: dict[str, str], before: dict[str, str]) -> None:
    """`now` is `before`, or an assertion showing where they differ."""
    for key in before:
        if now[key] != before[key]:
            diff = "\n".join(difflib.unified_diff(before[key].splitlines(),
                                                  now[key].splitlines(), lineterm=""))
            raise AssertionError(f"{key} differs from before the join:\n{diff}")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    with clusters(tmp_path_factory.mktemp("vm"), TOPOLOGY) as c:
        h = Home(c)
        assert vms.netns_name(VM) not in netns.listnetns(), "a VM of an earlier run is left"
        try:
            c.up(HOME, "--workload-heartbeat", HEARTBEAT)
            h.kubectl("apply", "-f", "-", input=SERVICES_YAML)
            c.run_pod(HOME, "web-1", *DEMO_APP, sa="web", labels=("app=web",), port=8080)
            c.run_pod(HOME, "client", "sleep", "900", sa="frontend")
            vms.create(VM, wan=WAN)
            # The VM's own application, on its loopback: only the proxy exposes it.
            h.app = subprocess.Popen(vms.exec_argv(VM, [
                "env", "POD_NAME=legacy-vm", "POD_NAMESPACE=default", sys.executable, "-m",
                "localcluster.demoapp", "--port", "8080"]), env=c.env, start_new_session=True)
            yield h
        finally:
            h.stop_agent()
            if vms.netns_name(VM) in netns.listnetns():
                h.vm_meshgate("vm", "leave", "--state-dir", STATE, check=False)
            if h.app is not None:
                h.app.send_signal(signal.SIGTERM)
                h.app.wait(30)
            vms.delete(VM)
        assert vms.netns_name(VM) not in netns.listnetns()


@pytest.fixture(scope="module")
def before(home: Home) -> dict[str, str]:
    # The kernel adds the IPv6 link-local route once duplicate address detection ends.
    wait_for(lambda: "tentative" not in home.vm("ip", "-6", "address", "show").stdout,
             timeout=10, interval=0.2, what="the VM's addresses to settle")
    return home.snapshot()


def test_bad_inputs_leave_the_vm_as_it_was_and_keep_the_token(home: Home,
                                                              before: dict[str, str]) -> None:
    line = home.token()
    flags = dict(zip(line[2::2], line[3::2], strict=True))
    # A trust anchor of another trust domain's cluster: the control plane is not trusted.
    other = home.base / "other-anchor"
    home.meshgate("identity", "init", "--trust-domain", DOMAIN, "--out", str(other))
    wrong = home.vm_meshgate("vm", "join", "--token", flags["--token"], "--control-plane",
                             flags["--control-plane"], "--trust-anchor",
                             str(other / "trust-bundle.pem"), "--foreground", "--state-dir",
                             STATE, check=False)
    assert wrong.returncode == 2 and "is not trusted" in wrong.stderr, wrong.stderr
    # Nothing answers there: retried, then named with the time it was first tried.
    gone = home.vm_meshgate("vm", "join", "--token", flags["--token"], "--control-plane",
                            f"https://{home.wan_address}:9", "--trust-anchor",
                            flags["--trust-anchor"], "--foreground", "--timeout", "2s",
                            "--state-dir", STATE, check=False)
    assert gone.returncode == 2 and "unreachable since" in gone.stderr, gone.stderr
    garbled = home.vm_meshgate("vm", "join", "--token", "mgjoin.nope", "--control-plane",
                               flags["--control-plane"], "--trust-anchor",
                               flags["--trust-anchor"], "--foreground", "--state-dir", STATE,
                               check=False)
    assert garbled.returncode == 2 and "malformed" in garbled.stderr
    # A resolver file the agent cannot parse is named before the token is spent.
    home.vm(sys.executable, "-c", WRITE, "/etc/resolv.conf", "nameserver\n")
    try:
        broken = home.vm_meshgate("vm", "join", *line[2:], "--foreground", "--state-dir",
                                  STATE, check=False)
    finally:
        home.vm(sys.executable, "-c", WRITE, "/etc/resolv.conf", before["resolv.conf"])
    assert broken.returncode == 2 and "/etc/resolv.conf" in broken.stderr and \
        "line 1" in broken.stderr, broken.stderr
    same(home.snapshot(), before)
    # The token survived all of that: it still joins.
    home.join(line)
    home.stop_agent()
    assert home.vm_meshgate("vm", "leave", "--state-dir", STATE).returncode == 0
    same(home.snapshot(), before)
    # ...and only once.
    replay = home.vm_meshgate("vm", "join", *line[2:], "--foreground", "--state-dir", STATE,
                              check=False)
    assert replay.returncode == 2 and "already used" in replay.stderr, replay.stderr
    same(home.snapshot(), before)


def test_a_join_killed_half_way_is_undone(home: Home, before: dict[str, str]) -> None:
    argv = [sys.executable, "-m", "mesh.cli", *home.token(), "--foreground", "--state-dir",
            STATE]
    log = home.base / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(vms.exec_argv(VM, argv), env=home.env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: "enrolled as" in log.read_text(), timeout=60, interval=0.05,
             what="the join to register")
    os.killpg(proc.pid, signal.SIGKILL)  # the agent and its proxy, mid-way
    proc.wait(10)
    status = home.vm_meshgate("vm", "status", "--state-dir", STATE, check=False)
    assert status.returncode == 1 and "phase:        joining" in status.stdout, status.stdout
    # The next join undoes what the killed one recorded, then joins.
    home.join(home.token())
    assert home.agent_log is not None
    assert "a previous join stopped half way" in home.agent_log.read_text()
    home.stop_agent()
    assert "left:" in home.vm_meshgate("vm", "leave", "--state-dir", STATE).stdout
    same(home.snapshot(), before)


@pytest.fixture(scope="module")
def joined(home: Home, before: dict[str, str]) -> Home:
    home.join(home.token())
    return home


def test_the_vm_calls_web_by_name_through_the_gateway(joined: Home) -> None:
    vip = client.CoreV1Api(api_client(joined.kubeconfig)).read_namespaced_service(
        "web", "default").spec.cluster_ip
    assert joined.vm("getent", "hosts", WEB).stdout.split()[0] == vip
    assert joined.vm("getent", "hosts", "web").stdout.split()[0] == vip  # search list
    assert joined.vm("dig", "+short", WEB).stdout.strip() == vip
    # Every other name still goes to the VM's own resolvers (which do not know this one).
    assert joined.vm("dig", "+short", f"nothing.{DOMAIN}").stdout.strip() == ""
    answers = [joined.vm("curl", "-s", "--max-time", "5", f"http://{WEB}/").stdout.strip()
               for _ in range(3)]
    assert answers == ["hello from web-1 in default"] * 3
    # web's proxy authorized and counted the VM, not the gateway that forwarded it.
    metrics = joined.pod_metrics("web-1")
    assert joined.metric(metrics, "request_total", direction="inbound",
                         client_id=VM_ID) >= 3


def test_a_pod_calls_the_vm_by_name(joined: Home) -> None:
    wait_for(lambda: joined.endpoints() == [(joined_address(joined), True)], timeout=20,
             interval=0.2, what="the VM in legacy's endpoints")
    answers = wait_for(lambda: (a := joined.calls(3)) and all(x.startswith("200") for x in a)
                       and a, timeout=20, interval=0.5, what="calls to the VM")
    assert answers == ["200 hello from legacy-vm in default"] * 3
    metrics = joined.vm("curl", "-s", "http://127.0.0.1:4191/metrics").stdout
    assert joined.metric(metrics, "request_total", direction="inbound",
                         client_id=CLIENT_ID) >= 3


def test_the_vm_calls_a_service_of_vms_through_the_gateway(joined: Home) -> None:
    # legacy's one endpoint is this VM: the call leaves through the home gateway, which
    # dials the workload's proxy and names the VM as the caller it forwards.
    def answers() -> list[str]:
        return [joined.vm("curl", "-s", "--max-time", "5", f"http://{LEGACY}/",
                          check=False).stdout.strip() for _ in range(3)]

    got = wait_for(lambda: (a := answers()) and all(x.startswith("hello") for x in a) and a,
                   timeout=20, interval=0.5, what="the VM's calls to legacy")
    assert got == ["hello from legacy-vm in default"] * 3
    metrics = joined.vm("curl", "-s", "http://127.0.0.1:4191/metrics").stdout
    assert joined.metric(metrics, "request_total", direction="inbound",
                         client_id=VM_ID) >= 3


def joined_address(home: Home) -> str:
    ew = client.CustomObjectsApi(api_client(home.kubeconfig)).get_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, VM)
    return str(ew["spec"]["workloadIPs"][0]["ip"])


POLICY = """
apiVersion: policy.meshgate.io/v1alpha1
kind: Server
metadata: {name: legacy-http, namespace: default}
spec:
  externalWorkloadSelector: {matchLabels: {app: legacy}}
  port: http
  accessPolicy: deny
---
apiVersion: policy.meshgate.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: admins, namespace: default}
spec:
  identities: ["admin.default.serviceaccount.identity.meshgate.cluster.local"]
---
apiVersion: policy.meshgate.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: legacy-admins, namespace: default}
spec:
  targetRef: {group: policy.meshgate.io, kind: Server, name: legacy-http}
  requiredAuthenticationRefs:
    - {group: policy.meshgate.io, kind: MeshTLSAuthentication, name: admins}
"""


def test_a_server_selecting_the_vm_that_leaves_the_caller_out_answers_403(
        joined: Home) -> None:
    joined.kubectl("apply", "-f", "-", input=POLICY)
    try:
        refused = wait_for(lambda: [a for a in joined.calls(2) if a.startswith("403")],
                           timeout=20, interval=0.5, what="the VM's proxy to refuse")
        assert CLIENT_ID in refused[0], refused
    finally:
        joined.kubectl("delete", "-f", "-", input=POLICY)
    wait_for(lambda: all(a.startswith("200") for a in joined.calls(2)), timeout=20,
             interval=0.5, what="calls to be allowed again")


def test_status_and_a_second_join(joined: Home) -> None:
    status = joined.vm_meshgate("vm", "status", "--state-dir", STATE)
    assert "phase:        joined" in status.stdout
    assert VM_ID in status.stdout and "certificate valid until" in status.stdout
    assert "proxy admin:  ready" in status.stdout
    again = joined.vm_meshgate("vm", "join", *joined.token()[2:], "--foreground",
                               "--state-dir", STATE, check=False)
    assert again.returncode == 2 and "in use by meshgate vm join" in again.stderr, again.stderr


def test_a_port_another_process_holds_is_named_and_the_rest_works(joined: Home) -> None:
    holder = subprocess.Popen(vms.exec_argv(VM, [
        sys.executable, "-c", "import socket, time; s = socket.socket(); "
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 9090));"
        " s.listen(); time.sleep(120)"]), env=joined.env, start_new_session=True)
    other = """
apiVersion: v1
kind: Service
metadata: {name: other, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 9090, targetPort: 8080}]
"""
    try:
        joined.kubectl("apply", "-f", "-", input=other)

        def named() -> str:
            text = joined.vm("curl", "-s", "http://127.0.0.1:4191/redirects").stdout
            return text if ":9090" in text and f"pid {holder.pid}" in text else ""

        report = wait_for(named, timeout=20, interval=0.3, what="the conflict to be named")
        assert "python" in report
        assert joined.vm("curl", "-s", "--max-time", "5", f"http://{WEB}/").stdout.strip() \
            == "hello from web-1 in default"
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(10)
        joined.kubectl("delete", "-f", "-", input=other)


def test_a_stopped_agent_leaves_the_endpoints_and_comes_back(joined: Home) -> None:
    address = joined_address(joined)
    joined.stop_agent()
    stopped = time.monotonic()
    wait_for(lambda: joined.endpoints() == [(address, False)], timeout=15, interval=0.2,
             what="the VM to turn not ready")
    assert time.monotonic() - stopped < 10
    # `vm run` is what the systemd unit starts after a reboot.
    with open(joined.base / "agent-run.log", "w") as log:
        joined.agent = subprocess.Popen(vms.exec_argv(VM, [
            sys.executable, "-m", "mesh.cli", "vm", "run", "--state-dir", STATE,
            "--heartbeat", "0.5s"]), env=joined.env, stdout=log, stderr=subprocess.STDOUT,
            text=True, start_new_session=True)
    wait_for(lambda: joined.endpoints() == [(address, True)], timeout=30, interval=0.2,
             what="the VM to be ready again")
    wait_for(lambda: all(a.startswith("200") for a in joined.calls(2)), timeout=20,
             interval=0.5, what="calls to the VM again")


def test_leave_restores_the_vm_byte_for_byte(joined: Home, before: dict[str, str]) -> None:
    assert joined.snapshot() != before  # routes, resolver and state were changed
    left = joined.vm_meshgate("vm", "leave", "--state-dir", STATE)
    assert "left:" in left.stdout
    joined.agent = None
    same(joined.snapshot(), before)
    ew = client.CustomObjectsApi(api_client(joined.kubeconfig)).get_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, VM)
    assert ew["spec"]["workloadIPs"] == []
    assert ew["status"]["conditions"][0]["reason"] == "Left"
    wait_for(lambda: all(not ready for _, ready in joined.endpoints()), timeout=10,
             interval=0.2, what="the VM to leave legacy's endpoints")
    again = joined.vm_meshgate("vm", "leave", "--state-dir", STATE)
    assert "nothing to undo" in again.stdout
