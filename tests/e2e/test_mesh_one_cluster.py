"""One cluster in network namespaces, as a user runs it: `meshgate cluster up`,
pods started with `meshgate cluster run-pod`, each with a sidecar proxy, calling
each other by DNS name over mTLS, with the control plane's discovery and policy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families
from pyroute2 import IPRoute, netns

from localcluster.pods import in_pod, run_pod_argv
from localcluster.up import find
from mesh.kube import api_client
from tests.cluster import wait_for
from tests.e2e import components
from tests.e2e.pod_scripts import CALLS, GET

NAME = "mge2e"
WEB = "web.default.svc.cluster.local"
CLIENT_ID = "client.default.serviceaccount.identity.meshgate.cluster.local"




@dataclass
class Mesh:
    state_dir: Path
    env: dict[str, str]
    pods: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def meshgate(self, *args: str, check: bool = True, timeout: float = 90
                 ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "mesh.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"meshgate {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(api_client(self.state_dir / "kubeconfig"))

    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(api_client(self.state_dir / "kubeconfig"))

    def run_pod(self, name: str, *command: str, sa: str = "default",
                labels: tuple[str, ...] = (), port: int | None = None) -> None:
        argv = run_pod_argv(NAME, name, command, service_account=sa, labels=labels,
                            port=port)
        log = open(self.state_dir / f"run-pod-{name}.log", "wb")  # noqa: SIM115
        self.pods[name] = subprocess.Popen(argv, env=self.env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for(lambda: self._ready(name), timeout=40, what=f"pod {name} to be ready")

    def _ready(self, name: str) -> bool:
        proc = self.pods[name]
        if proc.poll() is not None:
            raise AssertionError(f"run-pod {name} exited {proc.returncode}:\n"
                                 + (self.state_dir / f"run-pod-{name}.log").read_text())
        try:
            pod = self.core().read_namespaced_pod(name, "default")
        except client.ApiException:
            return False
        conditions = pod.status.conditions if pod.status else None
        return any(c.type == "Ready" and c.status == "True" for c in conditions or [])

    def stop_pod(self, name: str) -> None:
        proc = self.pods.pop(name)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

    def in_pod(self, pod: str, code: str, *args: str) -> str:
        """Run Python code inside the pod (its network, its resolv.conf)."""
        proc = in_pod(find(NAME), "default", pod, [sys.executable, "-c", code, *args])
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def calls(self, n: int, url: str = f"http://{WEB}/") -> list[str]:
        return self.in_pod("client", CALLS, str(n), url).splitlines()

    def metrics(self, pod: str) -> dict[str, list[tuple[dict[str, str], float]]]:
        text = self.in_pod(pod, GET, "http://127.0.0.1:4191/metrics")
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, []).append((sample.labels, sample.value))
        return out

    def metric(self, pod: str, name: str, **labels: str) -> float:
        return sum(v for lbls, v in self.metrics(pod).get(name, [])
                   if all(lbls.get(k) == want for k, want in labels.items()))

    def endpoints(self, pod: str, service: str) -> set[str]:
        """Endpoint addresses of `service` as the pod's proxy knows them."""
        known = json.loads(self.in_pod(pod, GET, "http://127.0.0.1:4191/endpoints"))
        return {ep["address"] for svc in known if svc["name"] == service
                for ep in svc["endpoints"]}

    def pod_ip(self, name: str) -> str:
        status = self.core().read_namespaced_pod(name, "default").status
        assert status is not None
        return str(status.pod_ip)


def _leftovers() -> list[str]:
    names = [n for n in netns.listnetns() if n.startswith(f"mg-{NAME}-")]
    with IPRoute() as ipr:
        names += [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()
                  if str(link.get_attr("IFLA_IFNAME")).startswith(("veth", "mgbr"))]
    return names


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    base = tmp_path_factory.mktemp("mesh")
    env = {**os.environ, "MESHGATE_RUN_DIR": str(base / "run"), "PYTHONUNBUFFERED": "1"}
    os.environ["MESHGATE_RUN_DIR"] = env["MESHGATE_RUN_DIR"]
    m = Mesh(base / "state", env)
    m.meshgate("cluster", "up", "--name", NAME, "--state-dir", str(m.state_dir),
               "--pod-cidr", "10.230.0.0/16", "--service-cidr", "10.231.0.0/16")
    try:
        m.core().create_namespaced_service("default", client.V1Service(
            metadata=client.V1ObjectMeta(name="web"),
            spec=client.V1ServiceSpec(selector={"app": "web"}, ports=[
                client.V1ServicePort(name="http", port=80, target_port=8080)])))
        demo = (sys.executable, "-m", "localcluster.demoapp", "--port", "8080")
        m.run_pod("web-1", *demo, sa="web", labels=("app=web",), port=8080)
        m.run_pod("web-2", *demo, sa="web", labels=("app=web",), port=8080)
        m.run_pod("client", "sleep", "600", sa="client")
        yield m
    finally:
        for name in list(m.pods):
            m.stop_pod(name)
        m.meshgate("cluster", "down", "--name", NAME, check=False)
        del os.environ["MESHGATE_RUN_DIR"]


def test_calls_by_name_over_mtls_reach_both_pods(mesh: Mesh) -> None:
    answers = mesh.calls(30)
    assert len(answers) == 30
    assert all(a.startswith("200 hello from web-") for a in answers), answers
    assert {a.split()[-3] for a in answers} == {"web-1", "web-2"}
    # The server side saw the client's identity over mTLS.
    seen = sum(mesh.metric(pod, "request_total", direction="inbound", client_id=CLIENT_ID)
               for pod in ("web-1", "web-2"))
    assert seen >= 30
    assert mesh.metric("client", "response_total", direction="outbound",
                       dst_service=WEB, tls="true", status_code="200") >= 30


def test_pods_reach_the_api_server_at_the_node_and_see_their_cluster(mesh: Mesh) -> None:
    spec = find(NAME)
    code = ("import ssl, sys, urllib.request\n"
            "ctx = ssl.create_default_context(cafile=sys.argv[2])\n"
            "print(urllib.request.urlopen(sys.argv[1], context=ctx).read().decode())")
    out = mesh.in_pod("client", code, f"https://{spec.node_address}:6443/version",
                      str(mesh.state_dir / "ca.crt"))
    assert json.loads(out)["major"] == "1"
    known = json.loads(mesh.in_pod("client", GET, "http://127.0.0.1:4191/endpoints"))
    web = [svc for svc in known if svc["name"] == WEB]
    assert web and {ep["cluster"] for ep in web[0]["endpoints"]} == {NAME}


def test_an_unknown_name_is_nxdomain_and_an_unknown_authority_a_named_error(
        mesh: Mesh) -> None:
    lookup = ("import socket\ntry:\n    socket.getaddrinfo('nosuch.default.svc.cluster.local',"
              " 80)\nexcept socket.gaierror as e:\n    print('nxdomain', e.errno)")
    assert mesh.in_pod("client", lookup).startswith("nxdomain")
    code = ("import http.client\nc = http.client.HTTPConnection('127.0.0.1', 4140)\n"
            "c.request('GET', '/', headers={'Host': 'nosuch.default.svc.cluster.local'})\n"
            "r = c.getresponse()\nprint(r.status, r.getheader('l5d-proxy-error'))")
    status, _, error = mesh.in_pod("client", code).strip().partition(" ")
    assert status.startswith("5"), status
    assert "nosuch.default.svc.cluster.local" in error


def test_an_authorization_policy_that_leaves_the_client_out_answers_403(mesh: Mesh) -> None:
    custom = mesh.custom()
    group, version = "policy.meshgate.io", "v1alpha1"
    custom.create_namespaced_custom_object(group, version, "default", "servers", {
        "apiVersion": f"{group}/{version}", "kind": "Server",
        "metadata": {"name": "web-http"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "port": 8080,
                 "proxyProtocol": "HTTP/1"}})
    custom.create_namespaced_custom_object(group, version, "default", "meshtlsauthentications", {
        "apiVersion": f"{group}/{version}", "kind": "MeshTLSAuthentication",
        "metadata": {"name": "only-admin"},
        "spec": {"identityRefs": [{"kind": "ServiceAccount", "name": "admin"}]}})
    custom.create_namespaced_custom_object(group, version, "default", "authorizationpolicies", {
        "apiVersion": f"{group}/{version}", "kind": "AuthorizationPolicy",
        "metadata": {"name": "web-admin-only"},
        "spec": {"targetRef": {"group": group, "kind": "Server", "name": "web-http"},
                 "requiredAuthenticationRefs": [{"group": group,
                                                 "kind": "MeshTLSAuthentication",
                                                 "name": "only-admin"}]}})
    try:
        answers = wait_for(lambda: [a for a in mesh.calls(4) if a.startswith("403")] or None,
                           timeout=20, what="calls to be refused")
        assert answers and "denied" in answers[0] and CLIENT_ID in answers[0]
        denied = sum(mesh.metric(pod, "inbound_http_authz_deny_total", client_id=CLIENT_ID)
                     for pod in ("web-1", "web-2"))
        assert denied >= 1
    finally:
        custom.delete_namespaced_custom_object(group, version, "default",
                                               "authorizationpolicies", "web-admin-only")
        custom.delete_namespaced_custom_object(group, version, "default",
                                               "meshtlsauthentications", "only-admin")
        custom.delete_namespaced_custom_object(group, version, "default", "servers", "web-http")
    wait_for(lambda: all(a.startswith("200") for a in mesh.calls(4)), timeout=20,
             what="calls to be allowed again")


def test_scaling_down_removes_the_pod_from_the_clients_endpoints(mesh: Mesh) -> None:
    mesh.run_pod("web-3", sys.executable, "-m", "localcluster.demoapp", "--port", "8080",
                 sa="web", labels=("app=web",), port=8080)
    address = f"{mesh.pod_ip('web-3')}:4143"
    wait_for(lambda: address in mesh.endpoints("client", WEB), timeout=20,
             what="the client to see web-3")
    mesh.stop_pod("web-3")
    wait_for(lambda: address not in mesh.endpoints("client", WEB), timeout=20,
             what="the client to forget web-3")
    assert all(a.startswith("200") for a in mesh.calls(10))


def test_traffic_survives_a_control_plane_outage_and_a_restart_catches_up(
        mesh: Mesh) -> None:
    # The outage: the control plane's Deployment scaled to nothing, its Pod gone.
    kubectl = str(Path(sys.executable).parent / "kubectl")
    subprocess.run([kubectl, "--kubeconfig", str(mesh.state_dir / "kubeconfig"), "-n",
                    "meshgate", "scale", "deploy/meshgate-control", "--replicas=0"],
                   check=True, capture_output=True, timeout=30)
    wait_for(lambda: not components.pods(find(NAME), "meshgate-control"), timeout=30,
             what="the control plane's Pod to be gone")
    web2 = f"{mesh.pod_ip('web-2')}:4143"
    try:
        answers = mesh.calls(10)
        assert all(a.startswith("200") for a in answers), answers
        # A change while the control plane is away: web-2 leaves the service.
        mesh.core().patch_namespaced_pod("web-2", "default",
                                         {"metadata": {"labels": {"app": "other"}}})
        assert web2 in mesh.endpoints("client", WEB)  # nobody told the client yet
        # `up` again applies the manifests again: one replica.
        mesh.meshgate("cluster", "up", "--name", NAME, "--state-dir", str(mesh.state_dir))
        assert len(components.pods(find(NAME), "meshgate-control")) == 1
        wait_for(lambda: web2 not in mesh.endpoints("client", WEB), timeout=30,
                 what="the restarted control plane to reach the client")
    finally:
        mesh.core().patch_namespaced_pod("web-2", "default",
                                         {"metadata": {"labels": {"app": "web"}}})
    wait_for(lambda: web2 in mesh.endpoints("client", WEB), timeout=30,
             what="web-2 to come back")


def test_a_killed_control_plane_is_restarted_by_the_kubelet(mesh: Mesh) -> None:
    spec = find(NAME)
    killed = components.kill(spec, "meshgate-control", argv_has="control\0run")
    wait_for(lambda: (now := components.processes(spec, "meshgate-control",
                                                  argv_has="control\0run"))
             and not set(now) & set(killed), timeout=30,
             what="the kubelet to start the control plane again")
    wait_for(lambda: components.restarts(spec, "meshgate-control") >= 1, timeout=10,
             what="the Pod's status to count the restart")
    wait_for(lambda: all(a.startswith("200") for a in mesh.calls(5)), timeout=30,
             what="calls to pass")


def test_a_pod_whose_identity_is_refused_fails_with_the_reason(mesh: Mesh) -> None:
    # The control plane's own identity is never issued to a workload.
    proc = mesh.meshgate("cluster", "run-pod", "--cluster", NAME, "--namespace", "meshgate",
                         "--name", "impostor", "--service-account", "meshgate-identity", "--",
                         "sleep", "60", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "never issued to workloads" in proc.stderr, proc.stderr
    assert not [p for p in mesh.core().list_namespaced_pod("meshgate").items
                if p.metadata.name == "impostor"]
    assert not [n for n in netns.listnetns() if n.endswith("-meshgate-impostor")]


def test_down_leaves_no_namespace_link_or_process(mesh: Mesh) -> None:
    for name in list(mesh.pods):
        mesh.stop_pod(name)
    mesh.meshgate("cluster", "down", "--name", NAME)
    assert _leftovers() == []
    assert not list((mesh.state_dir / "run").glob("*.pid"))
    again = mesh.meshgate("cluster", "run-pod", "--cluster", NAME, "--name", "x", "--",
                          "true", check=False)
    assert again.returncode == 2 and "no cluster named" in again.stderr
