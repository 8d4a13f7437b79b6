"""Services in the embedded cluster without a mesh: the node's service proxy
(localcluster.serviceproxy, localcluster.kubeproxy) lets an unmeshed pod reach a
Service by ClusterIP and by DNS name, following its endpoints as a Deployment
scales; NodePort and LoadBalancer answer at the node's address; and pods reach the
API server as on kube, at the `kubernetes` Service with their ServiceAccount token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pyroute2 import netns

from tests.cluster import wait_for
from tests.e2e.onecluster import OneCluster

NAME = "mgsvcproxy"
PREFIX = f"mg-{NAME}-"
KUBECTL = str(Path(sys.executable).parent / "kubectl")
NODE = "10.221.0.1"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

SERVER = """
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = os.environ["POD_NAME"].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""

FETCH = """
import sys, urllib.request
seen = []
for _ in range(int(sys.argv[2])):
    try:
        seen.append(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
    except OSError as e:
        seen.append("error: " + str(e))
print(" ".join(sorted(set(seen))))
"""

API = """
import json, os, ssl, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
ctx = ssl.create_default_context(cafile=sa + "/ca.crt")
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
out = {"env": host + ":" + port}
for url in ("https://kubernetes.default.svc/api", f"https://{host}:{port}/api"):
    req = urllib.request.Request(url, headers={
        "Authorization": "Bearer " + open(sa + "/token").read()})
    out[url] = json.load(urllib.request.urlopen(req, context=ctx, timeout=10))["kind"]
print(json.dumps(out))
"""


class Cluster(OneCluster):
    def fetch(self, url: str, times: int = 1) -> set[str]:
        """What the unmeshed client pod gets from `url`, `times` connections."""
        out = self.kubectl("exec", "client", "--", sys.executable, "-c", FETCH, url,
                           str(times)).stdout
        return set(out.split())

    def pods(self, app: str) -> set[str]:
        out = self.kubectl("get", "pods", "-l", f"app={app}", "-o",
                           "jsonpath={.items[*].metadata.name}").stdout
        return set(out.split())


def _deployment(name: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}}, "template": {
            "metadata": {"labels": {"app": name}},
            "spec": {"containers": [{
                "name": "server", "image": "busybox",
                "command": [sys.executable, "-c", SERVER],
                "env": [{"name": "POD_NAME", "valueFrom": {
                    "fieldRef": {"fieldPath": "metadata.name"}}}],
                "ports": [{"containerPort": 8080}],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}}})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("services")
    env = {**os.environ, "MESHGATE_RUN_DIR": str(base / "run"), "PYTHONUNBUFFERED": "1"}
    c = Cluster(base, env)
    c.meshgate("cluster", "up", "--name", NAME, "--state-dir", str(base / "state"),
               "--pod-cidr", "10.221.0.0/16", "--service-cidr", "10.222.0.0/16")
    try:
        c.kubectl("run", "client", "--image=busybox", "--command", "--", sys.executable,
                  "-c", "import time; time.sleep(3600)")
        c.kubectl("apply", "-f", "-", input=_deployment("echo"))
        c.kubectl("wait", "--for=condition=Ready", "pod/client", "--timeout=60s", timeout=90)
        c.kubectl("rollout", "status", "deployment/echo", "--timeout=60s", timeout=90)
        yield c
    finally:
        c.meshgate("cluster", "down", "--name", NAME, check=False)
    assert not [n for n in netns.listnetns() if n.startswith(PREFIX)]


def test_a_cluster_ip_and_its_dns_name_follow_the_endpoints(cluster: Cluster) -> None:
    cluster.kubectl("expose", "deployment", "echo", "--port=80", "--target-port=8080")
    ip = cluster.kubectl("get", "service", "echo", "-o", "jsonpath={.spec.clusterIP}").stdout
    assert ip.startswith("10.222.")
    first = cluster.pods("echo")
    assert len(first) == 1
    wait_for(lambda: cluster.fetch(f"http://{ip}/") == first, timeout=20,
             what="the ClusterIP answering from the one pod")
    assert cluster.fetch("http://echo.default.svc.cluster.local/", 5) == first
    assert cluster.fetch("http://echo.default/", 5) == first  # the search path

    cluster.kubectl("scale", "deployment/echo", "--replicas=3")
    cluster.kubectl("rollout", "status", "deployment/echo", "--timeout=60s", timeout=90)
    three = cluster.pods("echo")
    assert len(three) == 3
    # Each connection picks an endpoint at random: 40 connections see all three.
    wait_for(lambda: cluster.fetch(f"http://{ip}/", 40) == three, timeout=30,
             what="connections spread over the three pods")

    cluster.kubectl("scale", "deployment/echo", "--replicas=1")
    wait_for(lambda: len(cluster.pods("echo")) == 1, timeout=60, what="two pods gone")
    left = cluster.pods("echo")
    wait_for(lambda: cluster.fetch("http://echo.default.svc.cluster.local/", 10) == left,
             timeout=20, what="only the pod left answering")
    # Hairpin: the pod reaches itself through its own Service.
    (pod,) = left
    out = cluster.kubectl("exec", pod, "--", sys.executable, "-c", FETCH, f"http://{ip}/",
                          "3").stdout
    assert set(out.split()) == left


def test_node_port_and_load_balancer_answer_at_the_node_address(cluster: Cluster) -> None:
    cluster.kubectl("expose", "deployment", "echo", "--name=echo-np", "--type=NodePort",
                    "--port=80", "--target-port=8080")
    cluster.kubectl("expose", "deployment", "echo", "--name=echo-lb", "--type=LoadBalancer",
                    "--port=8081", "--target-port=8080")
    node_port = cluster.kubectl("get", "service", "echo-np", "-o",
                                "jsonpath={.spec.ports[0].nodePort}").stdout
    # The embedded cluster is its own load balancer: the ingress is the node's address.
    wait_for(lambda: cluster.kubectl("get", "service", "echo-lb", "-o",
                                     "jsonpath={.status.loadBalancer.ingress[0].ip}"
                                     ).stdout == NODE, timeout=20, what="the LB's ingress")
    assert cluster.kubectl("get", "service", "echo-lb", "--no-headers").stdout.split()[3] == \
        NODE  # EXTERNAL-IP
    pods = cluster.pods("echo")
    wait_for(lambda: cluster.fetch(f"http://{NODE}:{node_port}/", 3) <= pods, timeout=20,
             what="the NodePort answering from a pod")
    wait_for(lambda: cluster.fetch(f"http://{NODE}:8081/", 3) <= pods, timeout=20,
             what="the LoadBalancer answering from a pod")
    # And from the node itself (where the cluster's own daemons run).
    code = ("import urllib.request, sys; "
            "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")
    for url in (f"http://{NODE}:{node_port}/", f"http://{NODE}:8081/"):
        out = cluster.meshgate("cluster", "exec", "--name", NAME, "--", sys.executable, "-c",
                               code, url).stdout
        assert out.strip() in pods


def test_pods_reach_the_api_server_at_the_kubernetes_service(cluster: Cluster) -> None:
    ip = cluster.kubectl("get", "service", "kubernetes", "-o",
                         "jsonpath={.spec.clusterIP}").stdout
    assert ip == "10.222.0.1"
    slice_ = json.loads(cluster.kubectl("get", "endpointslice", "kubernetes", "-o",
                                        "json").stdout)
    assert slice_["endpoints"][0]["addresses"] == [NODE]
    assert slice_["ports"][0]["port"] == 6443
    out = json.loads(cluster.kubectl("exec", "client", "--", sys.executable, "-c",
                                     API).stdout)
    # The certificate names the ClusterIP and kubernetes.default.svc: both verify.
    assert out == {"env": f"{ip}:443", "https://kubernetes.default.svc/api": "APIVersions",
                   f"https://{ip}:443/api": "APIVersions"}


def test_rules_live_in_the_node_namespace_only(cluster: Cluster) -> None:
    node = cluster.meshgate("cluster", "exec", "--name", NAME, "--", "nft", "list",
                            "tables").stdout
    assert "table ip meshgate-services" in node
    host = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                          check=False).stdout
    assert "meshgate-services" not in host
