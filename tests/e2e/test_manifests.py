"""`cluster up`: meshgate's own manifests (`meshgate install
--crds`, then `meshgate install --identity-dir`) applied to the embedded cluster and
run by its kubelet as Deployments, as on a real cluster: each comes up Available,
the control plane answers a pod's identity request at its Service, and the
gateway's LoadBalancer Service gets the node's WAN address, where the gateway
answers from the WAN, as does the control plane.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import yaml

from tests.cluster import wait_for
from tests.e2e.clusters import Clusters, Topology, clusters

NAME = "mfmanifest"
VM = "mfmanvm"
TOPOLOGY = Topology(wan="mg-mfe2ewan", wan_cidr="172.31.236.0/24",
                    cidrs={NAME: ("10.240.0.0/16", "10.241.0.0/16")})
CONTROL_ID = "default.meshgate.serviceaccount.identity.meshgate.cluster.local"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

PROBE = """
import socket, ssl, sys, urllib.request
host = sys.argv[1]
print(urllib.request.urlopen(f"http://{host}:4191/ready", timeout=5).read().decode().strip())
socket.create_connection((host, 4143), timeout=5).close()
print("4143 open")
ctx = ssl.create_default_context(cafile=sys.argv[2])
ctx.check_hostname = False  # the control plane is named by its identity, not its address
print(urllib.request.urlopen(f"https://{host}:8086/ready", timeout=5, context=ctx).status)
"""


UP: list[str] = []
"""What `cluster up` printed."""


@pytest.fixture(scope="module")
def mc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clusters]:
    with clusters(tmp_path_factory.mktemp("manifests"), TOPOLOGY) as c:
        try:
            UP.append(c.up(NAME).stdout)
            yield c
        finally:
            c.meshgate("cluster", "vm", "delete", "--name", VM, check=False)


def test_the_deployments_come_up_available_through_the_kubelet(mc: Clusters) -> None:
    assert (f"control plane: meshgate's manifests, as Deployments: kubectl --kubeconfig "
            f"{mc.kubeconfig(NAME)} -n meshgate get deploy") in UP[0]
    out = mc.kubectl(NAME, "-n", "meshgate", "get", "deploy", "--no-headers")
    rows = {line.split()[0]: line.split()[1:4] for line in out.splitlines()}
    assert rows == {name: ["1/1", "1", "1"] for name in (
        "meshgate-control", "meshgate-gateway", "meshgate-mirror")}
    pods = mc.kubectl(NAME, "-n", "meshgate", "get", "pods", "--no-headers").splitlines()
    assert len(pods) == 3 and all(p.split()[1:3] == ["1/1", "Running"] for p in pods)
    # No process of `cluster up` runs them: the kubelet does; `up` keeps pid files for
    # the API server and the DNS only.
    assert sorted(p.name for p in (mc.state(NAME) / "run").glob("*.pid")) == [
        "apiserver.pid", "dns.pid"]
    # What `up` applied is what `meshgate install` renders (CRDs included).
    crds = set(mc.kubectl(NAME, "get", "crd", "-o", "name").split())
    assert {f"customresourcedefinition.apiextensions.k8s.io/{name}" for name in (
        "links.multicluster.meshgate.io", "servers.policy.meshgate.io",
        "meshtlsauthentications.policy.meshgate.io", "authorizationpolicies.policy.meshgate.io",
        "externalworkloads.workload.meshgate.io")} <= crds


IDENTITY_POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "certify", "namespace": "meshgate"},
    "spec": {
        "restartPolicy": "Never",
        "containers": [{
            "name": "certify", "image": "ghcr.io/meshgate/meshgate",
            "args": ["identity", "certify",
                     "--server", "https://meshgate-control.meshgate.svc:8086",
                     "--ca-bundle", "/trust/trust-bundle.pem",
                     "--token-file", "/tokens/identity-token",
                     "--name", CONTROL_ID, "--out", "/out"],
            "volumeMounts": [{"name": "trust", "mountPath": "/trust"},
                             {"name": "tokens", "mountPath": "/tokens"},
                             {"name": "out", "mountPath": "/out"}]}],
        "volumes": [
            {"name": "trust", "configMap": {"name": "meshgate-identity-trust-roots", "items": [
                {"key": "ca-bundle.crt", "path": "trust-bundle.pem"}]}},
            {"name": "tokens", "projected": {"sources": [{"serviceAccountToken": {
                "path": "identity-token", "audience": "identity.meshgate.io",
                "expirationSeconds": 3600}}]}},
            {"name": "out", "emptyDir": {}}]}}


def test_the_control_plane_answers_a_pods_identity_request(mc: Clusters) -> None:
    mc.kubectl(NAME, "apply", "-f", "-", input=yaml.safe_dump(IDENTITY_POD))

    def phase() -> str:
        return mc.kubectl(NAME, "-n", "meshgate", "get", "pod", "certify", "-o",
                          "jsonpath={.status.phase}")
    assert wait_for(lambda: phase() in ("Succeeded", "Failed") and phase(), timeout=60,
                    interval=0.5, what="the certify pod to finish") == "Succeeded", \
        mc.kubectl(NAME, "-n", "meshgate", "logs", "certify")
    log = mc.kubectl(NAME, "-n", "meshgate", "logs", "certify")
    assert CONTROL_ID in log, log
    # The control plane saw the request and issued the certificate.
    control = mc.kubectl(NAME, "-n", "meshgate", "logs", "deploy/meshgate-control")
    assert f"certificate issued identity={CONTROL_ID} proof=service-account-token" in control


def test_the_gateway_and_the_control_plane_answer_at_the_wan_address(mc: Clusters
                                                                       ) -> None:
    wan = mc.wan_address(NAME)
    ingress = mc.kubectl(NAME, "-n", "meshgate", "get", "service", "meshgate-gateway", "-o",
                         "jsonpath={.status.loadBalancer.ingress[0].ip}")
    assert ingress == wan
    mc.meshgate("cluster", "vm", "create", "--name", VM, "--wan", mc.wan)
    # The control plane Service's externalIPs are the node's addresses, where VMs
    # reach it.
    external = mc.kubectl(NAME, "-n", "meshgate", "get", "service", "meshgate-control", "-o",
                          "jsonpath={.spec.externalIPs}")
    assert wan in external and "10.240.0.1" in external
    bundle = str(mc.state(NAME) / "identity" / "trust-bundle.pem")
    out = mc.meshgate("cluster", "vm", "exec", "--name", VM, "--", sys.executable, "-c",
                      PROBE, wan, bundle).stdout
    assert out.splitlines() == ["ready", "4143 open", "200"]


def test_up_again_converges_and_changes_nothing(mc: Clusters) -> None:
    def generations() -> str:
        return mc.kubectl(NAME, "-n", "meshgate", "get", "deploy", "-o",
                          "jsonpath={.items[*].metadata.generation}")
    before = generations()
    mc.up(NAME)
    assert generations() == before
    assert len(mc.kubectl(NAME, "-n", "meshgate", "get", "pods", "-l",
                          "app.kubernetes.io/part-of=meshgate", "--no-headers").splitlines()) == 3


WEB = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
        - name: web
          image: %s
          command: [python, -m, http.server, "8080"]
          ports: [{containerPort: 8080}]
"""


def test_check_passes_and_an_annotated_namespaces_pods_come_up_meshed(mc: Clusters) -> None:
    """As on kind after install: `meshgate check` passes; a Deployment applied to a
    namespace annotated meshgate.io/inject=enabled comes up with the proxy, through the
    injector `cluster up` installed; `meshgate check --proxy` then passes too."""
    from mesh.image import reference

    kubeconfig = ("--kubeconfig", str(mc.kubeconfig(NAME)))
    check = mc.meshgate("check", *kubeconfig, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.endswith("Status check results are \u221a\n")
    mc.kubectl(NAME, "create", "namespace", "shop")
    mc.kubectl(NAME, "annotate", "namespace", "shop", "meshgate.io/inject=enabled")
    mc.kubectl(NAME, "apply", "-f", "-", input=WEB % reference())
    mc.kubectl(NAME, "-n", "shop", "rollout", "status", "deployment/web", "--timeout=25s")
    containers = mc.kubectl(NAME, "-n", "shop", "get", "pods", "-l", "app=web", "-o",
                            "jsonpath={.items[0].spec.initContainers[*].name}")
    assert containers.split() == ["meshgate-init", "meshgate-proxy"]
    proxy = mc.meshgate("check", "--proxy", "-n", "shop", *kubeconfig, check=False)
    assert proxy.returncode == 0, proxy.stdout + proxy.stderr
    assert "\u00d7" not in proxy.stdout
