"""`meshgate failover status`, the failover lines of `multicluster gateways` and
`multicluster check`, against an embedded cluster holding, made by hand as the
mirror controller would make them, mirror Services, their slices, Links with a
GatewayAlive condition and the Leases of their controllers."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes import client

from mesh.discovery.failover import CLUSTERS_ANNOTATION, POLICY_ANNOTATION
from mirror.crds import install_crds
from mirror.lease import lease_name
from mirror.link import GROUP, PLURAL, VERSION, parse_spec
from mirror.mirrors import GatewayEndpoint, mirror_service, mirror_slices
from tests.cluster import Cluster

MERGE = "application/merge-patch+json"
GATEWAY = "meshgate-gateway.meshgate.serviceaccount.identity.meshgate.cluster.local"


def meshgate(*args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True,
                         text=True, timeout=60)
    print(f"$ {' '.join(args)}  (exit {out.returncode})\n{out.stdout}{out.stderr}")
    return out


@dataclass
class Setup:
    """A namespace of Services and one of Links, with cluster names of their own."""

    cluster: Cluster

    def __post_init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns, self.links_ns = f"fo-{tag}", f"fo-links-{tag}"
        self.west, self.central, self.north = f"w-{tag}", f"c-{tag}", f"n-{tag}"
        self.core: Any = client.CoreV1Api(self.cluster.api())
        self.disc: Any = client.DiscoveryV1Api(self.cluster.api())
        self.custom: Any = client.CustomObjectsApi(self.cluster.api())
        self.leases: Any = client.CoordinationV1Api(self.cluster.api())
        for ns in (self.ns, self.links_ns):
            self.core.create_namespace({"metadata": {"name": ns}})

    def service(self, name: str, annotations: dict[str, str]) -> None:
        self.core.create_namespaced_service(self.ns, {
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80}]}})

    def local_slice(self, name: str, *ready: bool) -> None:
        body = {"metadata": {"name": f"{name}-local", "labels": {
                    "kubernetes.io/service-name": name}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": [f"10.244.9.{i + 1}"], "conditions": {"ready": r}}
                              for i, r in enumerate(ready)]}
        try:
            self.disc.create_namespaced_endpoint_slice(self.ns, body)
        except client.ApiException as e:
            assert e.status == 409
            self.disc.replace_namespaced_endpoint_slice(f"{name}-local", self.ns, body)

    def mirror(self, name: str, cluster: str, *, ready: bool) -> None:
        link = parse_spec({"metadata": {"name": cluster}, "spec": {
            "targetClusterName": cluster, "clusterCredentialsSecret": "creds",
            "gatewayAddress": "192.0.2.1", "gatewayPort": 4143, "gatewayIdentity": GATEWAY}})
        remote = {"metadata": {"name": name, "namespace": self.ns, "resourceVersion": "1"},
                  "spec": {"ports": [{"name": "http", "port": 80}]}}
        svc = mirror_service(remote, link)
        self.core.create_namespaced_service(self.ns, svc)
        for piece in mirror_slices(svc, link, [GatewayEndpoint("192.0.2.1", ready)]).values():
            self.disc.create_namespaced_endpoint_slice(self.ns, piece)

    def link(self, cluster: str, *, alive: bool) -> None:
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.links_ns, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "Link",
            "metadata": {"name": cluster},
            "spec": {"targetClusterName": cluster, "clusterCredentialsSecret": f"creds-{cluster}",
                     "gatewayAddress": "192.0.2.1", "gatewayPort": 4143,
                     "gatewayIdentity": GATEWAY}})
        self.set_alive(cluster, alive)
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self.leases.create_namespaced_lease(self.links_ns, {
            "metadata": {"name": lease_name(cluster)},
            "spec": {"holderIdentity": "test-controller", "leaseDurationSeconds": 3600,
                     "acquireTime": now, "renewTime": now}})

    def set_alive(self, cluster: str, alive: bool) -> None:
        condition = {"type": "GatewayAlive", "status": str(alive),
                     "reason": "ProbeSucceeded" if alive else "ProbeFailed",
                     "message": "the gateway answers its probe" if alive else
                     "no gateway address answers its probe",
                     "lastTransitionTime": "2026-01-01T00:00:00Z"}
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.links_ns, PLURAL, cluster,
            {"status": {"conditions": [condition]}}, _content_type=MERGE)

    def status(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return meshgate("failover", "status", "--kubeconfig", str(self.cluster.kubeconfig),
                        *extra)


@pytest.fixture(scope="module")
def setup(cluster: Cluster) -> Setup:
    install_crds(cluster.api())
    s = Setup(cluster)
    s.service("web", {CLUSTERS_ANNOTATION: f"{s.west},{s.north},{s.central}",
                      POLICY_ANNOTATION: "failback=10s"})
    s.local_slice("web", True, True)
    s.mirror("web", s.west, ready=True)
    s.mirror("web", s.central, ready=False)
    s.link(s.west, alive=True)
    s.link(s.central, alive=False)
    return s


def rows(stdout: str) -> list[list[str]]:
    """The group rows: place, cluster, endpoints, ready, then the health words."""
    return [line.split() for line in stdout.splitlines() if re.match(r"^  \d+  ", line)]


def test_status_shows_groups_health_skipped_clusters_and_the_serving_group(
        setup: Setup) -> None:
    s = setup
    out = s.status("--service", f"{s.ns}/web")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "local cluster: test"
    assert lines[1] == f"{s.ns}/web  clusters: {s.west},{s.north},{s.central}  failback: 10s"
    assert lines[2].split() == ["GROUP", "CLUSTER", "ENDPOINTS", "READY", "HEALTH"]
    got = rows(out.stdout)
    assert got[0] == ["0", "test", "2", "2", "healthy", "(local)"]
    assert got[1] == ["1", s.west, "1", "1", "healthy", "(gateway", "alive)"]
    assert got[2][:5] == ["2", s.central, "1", "0", "unhealthy:"]
    assert "its gateway is not alive" in lines[5] and "no gateway address answers" in lines[5]
    assert f"  skipped {s.north}: no mirror of web from cluster {s.north}" in lines
    assert lines[-1].startswith("  serving: group 0 (test, local), the first healthy group "
                                "in the control plane's view")

    # The local endpoints fail: the first linked cluster serves.
    s.local_slice("web", False, False)
    out = s.status("--service", f"{s.ns}/web")
    assert out.returncode == 0
    assert rows(out.stdout)[0][:6] == ["0", "test", "2", "0", "unhealthy:", "no"]
    assert f"  serving: group 1 ({s.west})" in out.stdout

    # Its gateway dies too: no group is healthy, and the exit status says so.
    s.set_alive(s.west, False)
    try:
        out = s.status()
        assert out.returncode == 1
        assert "  serving: none: no group is healthy (the control plane's view)" in out.stdout
        assert out.stdout.splitlines()[-1] == "1 failover Service with no healthy group"
    finally:
        s.set_alive(s.west, True)
        s.local_slice("web", True, True)


def test_status_puts_the_local_cluster_where_it_is_listed_and_names_bad_input(
        setup: Setup) -> None:
    s = setup
    s.service("api", {CLUSTERS_ANNOTATION: f"{s.west},test", POLICY_ANNOTATION: "soon"})
    s.local_slice("api", True)
    s.mirror("api", s.west, ready=True)
    s.service("junk", {CLUSTERS_ANNOTATION: "west;central"})
    s.service("plain", {})
    out = s.status()
    assert out.returncode == 0, out.stderr
    text = out.stdout
    api = text[text.index(f"{s.ns}/api "):text.index(f"{s.ns}/junk ")]
    assert [r[:2] for r in rows(api)] == [["0", s.west], ["1", "test"]]
    assert f"failover policy ignored: {POLICY_ANNOTATION}: 'soon' is not key=value" in api
    junk = text[text.index(f"{s.ns}/junk "):]
    assert "failover annotation ignored: " in junk and "served without failover" in junk
    # As another cluster sees it, "test" is a cluster with no mirror of api.
    out = s.status("--service", f"{s.ns}/api", "--cluster-name", "elsewhere")
    assert "local cluster: elsewhere" in out.stdout
    assert "  skipped test: no mirror of api from cluster test" in out.stdout

    out = s.status("--service", f"{s.ns}/plain")
    assert out.returncode == 0
    assert out.stdout == f"{s.ns}/plain has no {CLUSTERS_ANNOTATION} annotation: it is " \
        "served without failover\n"
    out = s.status("--service", f"{s.ns}/missing")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert f"Service {s.ns}/missing does not exist" in out.stderr
    assert s.status("--service", "no-slash").returncode == 2


def test_gateways_and_check_name_failover_services(setup: Setup) -> None:
    s = setup
    out = meshgate("multicluster", "gateways", "--kubeconfig", str(s.cluster.kubeconfig),
                   "--namespace", s.links_ns)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-2:] == [
        f"failover through {s.central}: {s.ns}/web",
        f"failover through {s.west}: {s.ns}/api, {s.ns}/web"]

    s.service("cart", {CLUSTERS_ANNOTATION: f"{s.central},{s.west}"})
    s.mirror("cart", s.west, ready=True)
    out = meshgate("multicluster", "check", "--kubeconfig", str(s.cluster.kubeconfig),
                   "--namespace", s.links_ns)
    assert out.returncode == 1
    found = [line for line in out.stdout.splitlines() if line.startswith("FAIL  failover ")]
    assert found == [
        f"FAIL  failover cart: cluster {s.central} has no mirror of {s.ns}/cart (is it "
        f"exported there?); fix: export it in {s.central} (the Link's selector must pick "
        f"it, as the label mirror.meshgate.io/exported=true does) or remove {s.central} "
        f"from its {CLUSTERS_ANNOTATION} annotation"], out.stdout
