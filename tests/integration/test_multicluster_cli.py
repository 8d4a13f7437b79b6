"""`meshgate multicluster link` and `unlink` between two embedded clusters: the
credential is read-only and limited to Services and EndpointSlices, the printed
documents apply with kubectl, and unlink removes mirrors, Link and Secret."""

from __future__ import annotations

import base64
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
