"""What a cluster publishes about its own network: networking.k8s.io/v1 ServiceCIDR
(the default `kubernetes` range, as kube-apiserver 1.33+ keeps it) and
kube-public/cluster-info (as kubeadm publishes it), read through kubectl and the
official client."""

from __future__ import annotations

import base64
import json

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.cluster import Cluster


def test_the_default_service_cidr_names_the_clusters_range_and_is_ready(cluster: Cluster
                                                                        ) -> None:
    net = client.NetworkingV1Api(cluster.api())
    cidr = net.read_service_cidr("kubernetes")
    assert cidr.spec.cidrs == ["10.96.0.0/16"]
    assert [(c.type, c.status) for c in cidr.status.conditions] == [("Ready", "True")]
    listed = cluster.kubectl("get", "servicecidrs").stdout.split()
    assert listed[:3] == ["NAME", "CIDRS", "AGE"]
    assert listed[3:5] == ["kubernetes", "10.96.0.0/16"]
    service = client.CoreV1Api(cluster.api()).read_namespaced_service("kubernetes", "default")
    assert service.spec.cluster_ip in {"10.96.0.1"}


def test_the_range_is_immutable_with_kubes_message(cluster: Cluster) -> None:
    proc = cluster.kubectl("patch", "servicecidr", "kubernetes", "--type=merge",
                           "-p", '{"spec":{"cidrs":["10.97.0.0/16"]}}', check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        'The ServiceCIDR "kubernetes" is invalid: spec.cidrs: Invalid value: '
        '["10.97.0.0/16"]: field is immutable')
    net = client.NetworkingV1Api(cluster.api())
    assert net.read_service_cidr("kubernetes").spec.cidrs == ["10.96.0.0/16"]


@pytest.mark.parametrize(("cidrs", "why"), [
    (["10.300.0.0/16"], 'spec.cidrs[0]: Invalid value: "10.300.0.0/16": must be a valid CIDR '
                        "value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"),
    (["10.1.0.0/16", "10.2.0.0/16"], "may specify no more than one IP for each IP family"),
    ([], "spec.cidrs: Required value: at least one CIDR required"),
])
def test_bad_ranges_are_refused_naming_the_field(cluster: Cluster, cidrs: list[str],
                                                 why: str) -> None:
    net = client.NetworkingV1Api(cluster.api())
    with pytest.raises(ApiException) as e:
        net.create_service_cidr({"metadata": {"name": "extra"}, "spec": {"cidrs": cidrs}})
    assert e.value.status == 422
    assert why in json.loads(e.value.body)["message"]


def test_a_second_range_is_refused_saying_it_would_never_be_used(cluster: Cluster) -> None:
    net = client.NetworkingV1Api(cluster.api())
    with pytest.raises(ApiException) as e:
        net.create_service_cidr({"metadata": {"name": "more"},
                                 "spec": {"cidrs": ["10.200.0.0/16"]}})
    assert e.value.status == 403
    assert "one service range 10.96.0.0/16" in json.loads(e.value.body)["message"]
    with pytest.raises(ApiException) as gone:
        net.read_service_cidr("more")
    assert gone.value.status == 404


def test_cluster_info_publishes_the_advertised_address_and_ca(cluster: Cluster) -> None:
    """kube-public/cluster-info as kubeadm writes it; with no --also-listen or
    --advertise-address the server advertises its own listener."""
    info = client.CoreV1Api(cluster.api()).read_namespaced_config_map("cluster-info",
                                                                      "kube-public")
    config = yaml.safe_load(info.data["kubeconfig"])
    assert config["users"] is None and config["contexts"] is None
    entry = config["clusters"][0]["cluster"]
    kubeconfig = yaml.safe_load(cluster.kubeconfig.read_text())
    assert entry["server"] == kubeconfig["clusters"][0]["cluster"]["server"]
    assert base64.b64decode(entry["certificate-authority-data"]) == \
        (cluster.state_dir / "ca.crt").read_bytes()
