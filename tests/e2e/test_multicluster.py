"""Two clusters on one WAN, as a user runs them: `meshgate cluster up --multicluster`
with a shared trust anchor, linked both ways with `meshgate multicluster link` and
`kubectl apply`, and a pod in one calling the other's exported Service by its
mirror's name, through the other cluster's gateway. The control plane, gateway and
mirror controller are meshgate's own manifests, run by each cluster's kubelet.

    client (east pod) -> east node (masquerade) -> WAN -> west node (DNAT to the
    gateway Pod) -> west gateway -> web (west pod)
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from pyroute2 import netns

from localcluster.up import find
from mesh.kube import api_client
from tests.cluster import wait_for
from tests.e2e import components
from tests.e2e.clusters import DEMO_APP, Clusters, Topology, clusters
from tests.e2e.pod_scripts import CALLS

EAST, WEST = "mceast", "mcwest"
WAN = "mg-mce2ewan"
WAN_CIDR = "172.31.251.0/24"
CIDRS = {EAST: ("10.232.0.0/16", "10.233.0.0/16"), WEST: ("10.234.0.0/16", "10.235.0.0/16")}
MIRROR = f"web-{WEST}"
MIRROR_NAME = f"{MIRROR}.default.svc.cluster.local"
CALLER = "frontend.default.serviceaccount.identity.meshgate.cluster.local"
GATEWAY_ID = "meshgate-gateway.meshgate.serviceaccount.identity.meshgate.cluster.local"
POLICY = "policy.meshgate.io"

CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
    print("connected")
except OSError as e:
    print("refused", e)
"""


TOPOLOGY = Topology(wan=WAN, wan_cidr=WAN_CIDR, cidrs=CIDRS, extra_namespaces=("mcthird",))


def calls(mc: Clusters, n: int, url: str = f"http://{MIRROR_NAME}/") -> list[str]:
    return mc.in_pod(EAST, "client", CALLS, str(n), url).splitlines()


def mirror_ready(mc: Clusters, service: str = MIRROR) -> list[bool]:
    """The readiness of each endpoint of `service`'s slices in east."""
    slices = client.DiscoveryV1Api(api_client(mc.kubeconfig(EAST)))
    found = slices.list_namespaced_endpoint_slice(
        "default", label_selector=f"kubernetes.io/service-name={service}").items
    return [bool(ep.conditions and ep.conditions.ready)
            for s in found for ep in s.endpoints or []]


@pytest.fixture(scope="module")
def mc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clusters]:
    with clusters(tmp_path_factory.mktemp("mc"), TOPOLOGY) as c:
        c.up(EAST)
        c.up(WEST)
        c.link(EAST, WEST)
        c.link(WEST, EAST)
        # web is exported; internal selects the same pods and is not.
        c.kubectl(WEST, "apply", "-f", "-", input=_SERVICES)
        c.run_pod(WEST, "web-1", *DEMO_APP, sa="web", labels=("app=web",), port=8080)
        c.run_pod(EAST, "client", "sleep", "600", sa="frontend")
        yield c


_SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default, labels: {mirror.meshgate.io/exported: "true"}}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: internal, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""


def test_a_pod_calls_the_other_cluster_by_name_and_the_target_sees_it(mc: Clusters) -> None:
    wait_for(lambda: mirror_ready(mc) == [True], timeout=30, interval=0.2,
             what=f"the mirror {MIRROR} to have a ready gateway endpoint")
    answers = wait_for(lambda: (a := calls(mc, 5)) and all(x.startswith("200") for x in a)
                       and a, timeout=20, interval=0.5, what="calls through the gateway")
    assert answers == ["200 hello from web-1 in default"] * 5
    # West's pod authorized and counted east's pod, not the gateway that forwarded it.
    assert mc.metric(WEST, "web-1", "request_total", direction="inbound",
                     client_id=CALLER) >= 5
    assert mc.metric(WEST, "web-1", "inbound_gateway_forwarded_total",
                     gateway_id=GATEWAY_ID, client_id=CALLER) >= 1
    assert mc.metric(WEST, "web-1", "tcp_open_total", client_id=GATEWAY_ID) == 0
    # Linked the other way too: west's mirror Pod runs a mirror controller for east's Link.
    assert components.processes(find(WEST), "meshgate-mirror", argv_has=f"--link\0{EAST}\0")


def test_link_finds_the_gateway_pod_at_its_wan_address(mc: Clusters) -> None:
    # No address flags to `link`: the gateway's from its LoadBalancer Service, whose
    # ingress the node's service proxy gave the node's WAN address.
    link = mc.kubectl(EAST, "-n", "meshgate", "get", "link", WEST, "-o",
                      "jsonpath={.spec.gatewayAddress}:{.spec.gatewayPort}")
    assert link == f"{mc.wan_address(WEST)}:4143"


def test_pod_networks_are_not_routed_on_the_wan(mc: Clusters) -> None:
    web_ip = mc.core(WEST).read_namespaced_pod("web-1", "default").status.pod_ip
    out = mc.in_pod(EAST, "client", CONNECT, web_ip, "4143")
    assert out.startswith("refused"), out
    # The gateway is reachable, on the WAN address only.
    assert mc.in_pod(EAST, "client", CONNECT, mc.wan_address(WEST), "4143").startswith(
        "connected")


def test_a_policy_in_west_naming_another_caller_answers_403(mc: Clusters) -> None:
    mc.kubectl(WEST, "apply", "-f", "-", input=_ADMIN_ONLY)
    try:
        answers = wait_for(lambda: [a for a in calls(mc, 2) if a.startswith("403")],
                           timeout=20, interval=0.5, what="the call to be refused")
        assert "unauthorized" in answers[0] and CALLER in answers[0], answers
    finally:
        mc.kubectl(WEST, "delete", "-f", "-", input=_ADMIN_ONLY)
    wait_for(lambda: all(a.startswith("200") for a in calls(mc, 2)), timeout=20,
             interval=0.5, what="calls to be allowed again")


def test_an_unexported_service_has_no_mirror_and_the_gateway_refuses_it(
        mc: Clusters) -> None:
    names = {s.metadata.name for s in mc.core(EAST).list_namespaced_service("default").items}
    assert MIRROR in names and f"internal-{WEST}" not in names
    # A mirror made by hand (labelled for no Link, so no controller collects it) that
    # names west's unexported Service: the gateway refuses it.
    forged = _forged_mirror(mc.wan_address(WEST))
    mc.kubectl(EAST, "apply", "-f", "-", input=forged)
    try:
        answers = wait_for(lambda: [a for a in calls(mc, 1, "http://forged.default.svc."
                                                            "cluster.local/")
                                    if a.startswith("403")],
                           timeout=20, interval=0.5, what="the gateway to refuse")
        assert "not-exported" in answers[0], answers
    finally:
        mc.kubectl(EAST, "delete", "-f", "-", input=forged)


def test_a_dead_mirror_controller_is_reported_and_restarted(mc: Clusters) -> None:
    spec, child = find(EAST), f"--link\0{WEST}\0"
    killed = components.kill(spec, "meshgate-mirror", argv_has=child)
    wait_for(lambda: f"mirror exited link=meshgate/{WEST} status=-9" in mirror_log(mc, EAST),
             timeout=10, interval=0.2, what="the supervisor to report the dead child")
    wait_for(lambda: (now := components.processes(spec, "meshgate-mirror", argv_has=child))
             and not set(now) & set(killed), timeout=15, interval=0.2,
             what="the child to be started again")


def mirror_log(mc: Clusters, cluster: str) -> str:
    """What the mirror controller's Pod wrote (its supervisor's log)."""
    return mc.kubectl(cluster, "-n", "meshgate", "logs", "deploy/meshgate-mirror")


def test_check_and_gateways_on_a_healthy_link(mc: Clusters) -> None:
    wait_for(lambda: mirror_ready(mc) == [True], timeout=30, interval=0.2,
             what="the mirror to be ready")
    # On east's node, where its mirror controllers run: west's WAN address is reachable
    # from there, and only from there.
    check = ("cluster", "exec", "--name", EAST, "--", sys.executable, "-m", "mesh.cli",
             "multicluster", "check")
    wait_for(lambda: mc.meshgate(*check, check=False).returncode == 0, timeout=30,
             interval=0.5, what="`multicluster check` to pass on east's node")
    lines = mc.meshgate(*check).stdout.splitlines()
    assert lines[-1] == "every check passed", lines
    assert all(line.startswith("ok") for line in lines[:-1]), lines
    rows = mc.meshgate("multicluster", "gateways", "--kubeconfig",
                       str(mc.kubeconfig(EAST))).stdout.splitlines()
    assert rows[1].split()[:2] == [WEST, "True"], rows


def test_a_killed_gateway_is_restarted_by_the_kubelet(mc: Clusters) -> None:
    wait_for(lambda: mirror_ready(mc) == [True], timeout=30, interval=0.2,
             what="the mirror to be ready")
    spec = find(WEST)
    killed = components.kill(spec, "meshgate-gateway", argv_has="gateway\0run")
    wait_for(lambda: (now := components.processes(spec, "meshgate-gateway",
                                                  argv_has="gateway\0run"))
             and not set(now) & set(killed), timeout=30, interval=0.2,
             what="the kubelet to start the gateway again")
    wait_for(lambda: components.restarts(spec, "meshgate-gateway") >= 1, timeout=10,
             interval=0.2, what="the Pod's status to count the restart")
    wait_for(lambda: all(a.startswith("200") for a in calls(mc, 2)), timeout=30,
             interval=0.5, what="calls to pass through the restarted gateway")


def test_a_dead_gateway_turns_mirror_endpoints_not_ready_and_up_restores_them(
        mc: Clusters) -> None:
    wait_for(lambda: mirror_ready(mc) == [True], timeout=30, interval=0.2,
             what="the mirror to be ready")
    # Dead for good: the gateway's Deployment scaled to nothing, its Pod gone.
    mc.kubectl(WEST, "-n", "meshgate", "scale", "deploy/meshgate-gateway", "--replicas=0")
    wait_for(lambda: not components.pods(find(WEST), "meshgate-gateway"), timeout=30,
             interval=0.2, what="west's gateway Pod to be gone")
    # probeSpec: every 3 s, 3 failures in a row; allow one period of jitter and a write.
    wait_for(lambda: mirror_ready(mc) == [False], timeout=30, interval=0.2,
             what="east to mark west's gateway not ready")
    check = mc.meshgate("cluster", "exec", "--name", EAST, "--", sys.executable, "-m",
                        "mesh.cli", "multicluster", "check", check=False)
    assert check.returncode == 1
    assert any(line.startswith("FAIL") and f"the gateway of cluster {WEST} is alive" in line
               for line in check.stdout.splitlines()), check.stdout
    # `up` again applies the manifests again: one replica.
    mc.meshgate("cluster", "up", "--name", WEST, "--state-dir", str(mc.state(WEST)))
    wait_for(lambda: mirror_ready(mc) == [True], timeout=20, interval=0.2,
             what="east to mark west's gateway ready again")
    wait_for(lambda: all(a.startswith("200") for a in calls(mc, 2)), timeout=20,
             interval=0.5, what="calls to pass again")


def test_unlink_stops_the_links_mirror_controller(mc: Clusters) -> None:
    spec, child = find(WEST), f"--link\0{EAST}\0"
    assert components.processes(spec, "meshgate-mirror", argv_has=child)
    mc.meshgate("multicluster", "unlink", "--kubeconfig", str(mc.kubeconfig(WEST)),
                "--cluster-name", EAST)
    wait_for(lambda: not components.processes(spec, "meshgate-mirror", argv_has=child),
             timeout=15, interval=0.2,
             what="west's supervisor to stop the mirror controller of the deleted Link")
    assert f"mirror stopped link=meshgate/{EAST} cause=the Link is gone" in mirror_log(mc, WEST)


def test_a_wan_address_in_use_is_refused_in_one_line(mc: Clusters) -> None:
    proc = mc.meshgate("cluster", "up", "--name", "mcthird", "--state-dir",
                       str(mc.base / "mcthird"), "--pod-cidr", "10.236.0.0/16",
                       "--service-cidr", "10.237.0.0/16", "--multicluster", "--wan", WAN,
                       "--wan-address", mc.wan_address(EAST), check=False)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("meshgate:")]
    assert len(errors) == 1 and f"in use by cluster '{EAST}'" in errors[0], proc.stderr
    assert not [n for n in netns.listnetns() if n.startswith("mg-mcthird-")]
    assert "mcthird" not in (mc.base / "run" / "wan" / WAN / "wan.json").read_text()


def test_without_nft_up_says_what_to_install_and_leaves_nothing(mc: Clusters) -> None:
    path = ":".join(d for d in mc.env["PATH"].split(":")
                    if d and not (Path(d) / "nft").exists())
    proc = subprocess.run([sys.executable, "-m", "mesh.cli", "cluster", "up", "--name",
                           "mcthird", "--state-dir", str(mc.base / "mcthird-nonft"),
                           "--pod-cidr", "10.236.0.0/16", "--service-cidr", "10.237.0.0/16",
                           "--multicluster", "--wan", WAN],
                          env={**mc.env, "PATH": path}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("meshgate:")]
    assert len(errors) == 1 and "needs `nft` (Debian package nftables)" in errors[0], \
        proc.stderr
    assert not [n for n in netns.listnetns() if n.startswith("mg-mcthird-")]
    assert "mcthird" not in (mc.base / "run" / "wan" / WAN / "wan.json").read_text()


def test_down_leaves_no_namespace_veth_or_pid_file(mc: Clusters) -> None:
    mc.stop_pods()
    mc.meshgate("cluster", "down", "--name", EAST)
    assert WAN in netns.listnetns()  # west still uses it
    mc.meshgate("cluster", "down", "--name", WEST)
    assert TOPOLOGY.ours() == []
    for cluster in (EAST, WEST):
        assert not list((mc.state(cluster) / "run").glob("*.pid"))
    assert not (mc.base / "run" / "wan" / WAN / "wan.json").exists()


_ADMIN_ONLY = f"""
apiVersion: {POLICY}/v1alpha1
kind: Server
metadata: {{name: web-http, namespace: default}}
spec: {{podSelector: {{matchLabels: {{app: web}}}}, port: 8080, proxyProtocol: HTTP/1}}
---
apiVersion: {POLICY}/v1alpha1
kind: MeshTLSAuthentication
metadata: {{name: only-admin, namespace: default}}
spec: {{identityRefs: [{{kind: ServiceAccount, name: admin}}]}}
---
apiVersion: {POLICY}/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: web-admin-only, namespace: default}}
spec:
  targetRef: {{group: {POLICY}, kind: Server, name: web-http}}
  requiredAuthenticationRefs:
  - {{group: {POLICY}, kind: MeshTLSAuthentication, name: only-admin}}
"""


def _forged_mirror(gateway: str) -> str:
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: forged, namespace: default}}
spec:
  ports: [{{name: http, port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: forged
  namespace: default
  labels:
    kubernetes.io/service-name: forged
    endpointslice.kubernetes.io/managed-by: mirror.meshgate.io
    mirror.meshgate.io/mirrored-service: "true"
    mirror.meshgate.io/cluster-name: handmade
  annotations:
    mirror.meshgate.io/remote-gateway-identity: {GATEWAY_ID}
    mirror.meshgate.io/remote-svc-fq-name: internal.default.svc.cluster.local
addressType: IPv4
endpoints: [{{addresses: ["{gateway}"], conditions: {{ready: true}}}}]
ports: [{{name: http, port: 4143, protocol: TCP}}]
"""
