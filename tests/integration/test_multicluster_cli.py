"""`meshgate multicluster link` and `unlink` between two embedded clusters: the
credential is read-only and limited to Services and EndpointSlices, the printed
documents apply with kubectl, and unlink removes mirrors, Link and Secret."""

from __future__ import annotations

import base64
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config

from mesh.identity.trustroots import TRUST_ROOTS_CONFIGMAP
from mirror.crds import install_crds
from tests.cluster import Cluster, start_cluster


@pytest.fixture(scope="module")
def west(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = start_cluster(tmp_path_factory.mktemp("west"), name="west")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def east(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = start_cluster(tmp_path_factory.mktemp("east"), name="east")
    try:
        install_crds(c.api())
        yield c
    finally:
        c.stop()


def meshgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_link_prints_a_read_only_credential_and_a_link(west: Cluster, east: Cluster) -> None:
    out = meshgate("multicluster", "link", "--kubeconfig", str(west.kubeconfig),
                   "--cluster-name", "west", "--gateway-address", "127.0.0.1")
    assert out.returncode == 0, out.stderr
    secret, link = list(yaml.safe_load_all(out.stdout))
    assert secret["type"] == "mirror.meshgate.io/remote-kubeconfig"
    assert link["kind"] == "Link" and link["spec"]["targetClusterName"] == "west"
    assert link["spec"]["clusterCredentialsSecret"] == secret["metadata"]["name"]
    assert link["spec"]["gatewayIdentity"] == (
        "meshgate-gateway.meshgate.serviceaccount.identity.meshgate.cluster.local")

    remote = config.new_client_from_config_dict(
        yaml.safe_load(base64.b64decode(secret["data"]["kubeconfig"])))
    core, disc = client.CoreV1Api(remote), client.DiscoveryV1Api(remote)
    core.list_service_for_all_namespaces()
    disc.list_endpoint_slice_for_all_namespaces()
    # And the one ConfigMap holding the cluster's trust bundle, for `multicluster check`.
    wcore = client.CoreV1Api(west.api())
    wcore.create_namespaced_config_map("meshgate", {"metadata": {
        "name": TRUST_ROOTS_CONFIGMAP}, "data": {"ca-bundle.crt": "x"}})
    assert core.read_namespaced_config_map(TRUST_ROOTS_CONFIGMAP, "meshgate").data
    for forbidden in (core.list_secret_for_all_namespaces, core.list_pod_for_all_namespaces,
                      lambda: core.delete_namespaced_service("kubernetes", "default"),
                      lambda: core.read_namespaced_config_map("kube-root-ca.crt", "meshgate"),
                      lambda: core.delete_namespaced_config_map(TRUST_ROOTS_CONFIGMAP,
                                                                "meshgate")):
        with pytest.raises(client.ApiException) as denied:
            forbidden()
        assert denied.value.status == 403

    # Linking twice reuses what the first run made.
    again = meshgate("multicluster", "link", "--kubeconfig", str(west.kubeconfig),
                     "--cluster-name", "west", "--gateway-address", "127.0.0.1")
    assert again.returncode == 0, again.stderr

    client.CoreV1Api(east.api()).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name="meshgate")))
    east.kubectl("apply", "-f", "-", input=out.stdout)
    assert "west" in east.kubectl("get", "links", "-n", "meshgate").stdout


def test_unlink_removes_mirrors_link_and_secret(east: Cluster) -> None:
    core, disc = client.CoreV1Api(east.api()), client.DiscoveryV1Api(east.api())
    labels = {"mirror.meshgate.io/mirrored-service": "true",
              "mirror.meshgate.io/cluster-name": "west"}
    core.create_namespaced_service("default", client.V1Service(
        metadata=client.V1ObjectMeta(name="web-west", labels=labels),
        spec=client.V1ServiceSpec(ports=[client.V1ServicePort(port=80)])))
    disc.create_namespaced_endpoint_slice("default", client.V1EndpointSlice(
        metadata=client.V1ObjectMeta(name="web-west-gw", labels={
            "kubernetes.io/service-name": "web-west",
            "endpointslice.kubernetes.io/managed-by": "mirror.meshgate.io"}),
        address_type="IPv4", endpoints=[client.V1Endpoint(addresses=["127.0.0.1"])]))
    out = meshgate("multicluster", "unlink", "--kubeconfig", str(east.kubeconfig),
                   "--cluster-name", "west")
    assert out.returncode == 0, out.stderr
    assert "removed service default/web-west" in out.stdout
    assert "removed link meshgate/west" in out.stdout
    assert "removed secret meshgate/cluster-credentials-west" in out.stdout
    assert not core.list_namespaced_service(
        "default", label_selector="mirror.meshgate.io/cluster-name=west").items
    assert not disc.list_namespaced_endpoint_slice(
        "default", label_selector="kubernetes.io/service-name=web-west").items
    again = meshgate("multicluster", "unlink", "--kubeconfig", str(east.kubeconfig),
                     "--cluster-name", "west")
    assert again.returncode == 0 and "nothing to unlink" in again.stdout


def test_link_errors_are_one_line(tmp_path: Path) -> None:
    out = meshgate("multicluster", "link", "--kubeconfig", str(tmp_path / "missing"),
                   "--cluster-name", "west", "--gateway-address", "127.0.0.1")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "kubeconfig" in out.stderr


def test_link_reads_the_gateway_from_its_service(west: Cluster) -> None:
    """Without --gateway-address: from the gateway Service, as `cluster up --multicluster`
    publishes it (or a cloud's load balancer would); without one, a message that names
    the Service and the override, and nothing printed for kubectl to apply."""
    def link() -> subprocess.CompletedProcess[str]:
        return meshgate("multicluster", "link", "--kubeconfig", str(west.kubeconfig),
                        "--cluster-name", "west")

    missing = link()
    assert missing.returncode == 2 and not missing.stdout
    assert "no gateway Service meshgate/meshgate-gateway" in missing.stderr
    assert "--gateway-address" in missing.stderr
    core = client.CoreV1Api(west.api())
    with contextlib.suppress(client.ApiException):
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
            name="meshgate")))
    core.create_namespaced_service("meshgate", {
        "metadata": {"name": "meshgate-gateway"},
        "spec": {"type": "ClusterIP", "ports": [
            {"name": "mc-gateway", "port": 4143}, {"name": "mc-probe", "port": 4191}]}})
    unreachable = link()
    assert unreachable.returncode == 2 and not unreachable.stdout
    assert "no load-balancer ingress, no externalIPs and no node ports" in \
        unreachable.stderr
    core.patch_namespaced_service("meshgate-gateway", "meshgate", {"spec": {
        "type": "LoadBalancer"}})
    core.patch_namespaced_service_status("meshgate-gateway", "meshgate", {"status": {
        "loadBalancer": {"ingress": [{"ip": "203.0.113.5"}]}}})
    out = link()
    assert out.returncode == 0, out.stderr
    spec = next(d for d in yaml.safe_load_all(out.stdout) if d["kind"] == "Link")["spec"]
    assert (spec["gatewayAddress"], spec["gatewayPort"], spec["probeSpec"]["port"]) == (
        "203.0.113.5", 4143, 4191)
    assert "from its load balancer's ingress of meshgate/meshgate-gateway" in out.stderr
    # The flags still override, and the ports go with the address.
    given = meshgate("multicluster", "link", "--kubeconfig", str(west.kubeconfig),
                     "--cluster-name", "west", "--gateway-port", "5000")
    assert given.returncode != 0 and "--gateway-port and --probe-port go with " \
        "--gateway-address" in given.stderr
