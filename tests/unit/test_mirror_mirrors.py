"""Mirror names, the labels and annotations mirrors copy, and the Services and
EndpointSlices the controller writes, computed without a cluster."""

from __future__ import annotations

from typing import Any

from mirror.link import LinkSpec
from mirror.mirrors import (
    CLUSTER_LABEL,
    FULL_NAME_ANNOTATION,
    GATEWAY_IDENTITY_ANNOTATION,
    MANAGED_BY_LABEL,
    MIRRORED_LABEL,
    REMOTE_DISCOVERY_LABEL,
    REMOTE_FQ_NAME_ANNOTATION,
    REMOTE_VERSION_ANNOTATION,
    SERVICE_NAME_LABEL,
    GatewayEndpoint,
    RemoteKey,
    copied,
    mirror_name,
    mirror_service,
    mirror_slices,
    owned,
    placement,
    remote_key,
    service_patch,
    service_up_to_date,
    slice_up_to_date,
)


def _link(**extra: Any) -> LinkSpec:
    return LinkSpec.model_validate({"targetClusterName": "west",
                                    "clusterCredentialsSecret": "west-creds",
                                    "gatewayAddress": "192.0.2.7", "gatewayPort": "4143",
                                    "gatewayIdentity": "gw.identity.west", **extra})


def _remote(name: str = "web", namespace: str = "shop", **meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": "42",
                         "labels": {"app": name, "mirror.meshgate.io/exported": "true"},
                         "annotations": {"team": "a"}, **meta},
            "spec": {"type": "LoadBalancer", "selector": {"app": name}, "clusterIP": "10.1.2.3",
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                                "protocol": "TCP", "nodePort": 30080},
                               {"name": "grpc", "port": 9090, "targetPort": "grpc",
                                "appProtocol": "kubernetes.io/h2c"}]}}


def test_short_names_are_service_dash_cluster() -> None:
    assert mirror_name("web", "west") == ("web-west", "web-west")
    exact = "a" * (63 - len("-west"))
    assert mirror_name(exact, "west") == (f"{exact}-west", f"{exact}-west")


def test_long_names_are_cut_to_63_with_a_stable_hash() -> None:
    service = "a-service-name-that-is-quite-long-but-still-a-valid-label"
    name, full = mirror_name(service, "a-cluster-called-west")
    assert full == f"{service}-a-cluster-called-west"
    assert len(name) <= 63 and name != full
    assert name == mirror_name(service, "a-cluster-called-west")[0]  # stable
    stem, _, digest = name.rpartition("-")
    assert full.startswith(stem) and len(digest) == 8 and int(digest, 16) >= 0
    other, _ = mirror_name(service + "x", "a-cluster-called-west")
    assert other != name  # same 54-character prefix, different hash


def test_a_cut_never_leaves_a_double_dash() -> None:
    service = "x" * 53 + "-y"  # the cut falls right after the dash
    name, _ = mirror_name(service, "cluster-with-a-long-name")
    assert "--" not in name and len(name) <= 63


def test_placement_follows_the_namespace_mapping() -> None:
    link = _link(namespaceMapping={"shop": "shop-west"})
    assert str(placement(RemoteKey("shop", "web"), link)) == "shop-west/web-west"
    assert str(placement(RemoteKey("other", "web"), link)) == "other/web-west"


def test_copied_drops_mirror_keys_cluster_local_keys_and_exclusions() -> None:
    values = {"app": "web", "mirror.meshgate.io/exported": "true",
              "kubectl.kubernetes.io/last-applied-configuration": "{}",
              "service.kubernetes.io/topology-mode": "Auto",
              "internal.example.com/owner": "x", "internal.example.com/cost": "y",
              "secret": "z", "keep.example.com/a": "b"}
    assert copied(values, ["internal.example.com/*", "secret"]) == {
        "app": "web", "keep.example.com/a": "b"}
    assert copied(None, []) == {}


def test_mirror_service_shape() -> None:
    svc = mirror_service(_remote(), _link(excludedAnnotations=["team"]))
    meta = svc["metadata"]
    assert (meta["name"], meta["namespace"]) == ("web-west", "shop")
    assert meta["labels"] == {"app": "web", MIRRORED_LABEL: "true", CLUSTER_LABEL: "west"}
    assert meta["annotations"] == {REMOTE_VERSION_ANNOTATION: "42",
                                   REMOTE_FQ_NAME_ANNOTATION: "web.shop.svc.cluster.local"}
    assert svc["spec"] == {"type": "ClusterIP", "ports": [
        {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80},
        {"name": "grpc", "port": 9090, "protocol": "TCP", "targetPort": 9090,
         "appProtocol": "kubernetes.io/h2c"}]}
    assert remote_key(svc) == RemoteKey("shop", "web")
    assert owned(svc, "west") and not owned(svc, "east")


def test_a_shortened_mirror_records_its_full_name() -> None:
    remote = _remote(name="s" * 60)
    svc = mirror_service(remote, _link())
    assert len(svc["metadata"]["name"]) == 63
    assert svc["metadata"]["annotations"][FULL_NAME_ANNOTATION] == "s" * 60 + "-west"


def test_remote_discovery_mirrors_are_labelled_and_get_no_slices() -> None:
    link = _link(remoteDiscoverySelector={"matchLabels": {"flat": "yes"}})
    remote = _remote()
    remote["metadata"]["labels"]["flat"] = "yes"
    svc = mirror_service(remote, link)
    assert svc["metadata"]["labels"][REMOTE_DISCOVERY_LABEL] == "west"
    assert mirror_slices(svc, link, [GatewayEndpoint("192.0.2.7", True)]) == {}


def test_slices_point_every_port_at_the_gateway() -> None:
    link = _link()
    svc = mirror_service(_remote(), link)
    slices = mirror_slices(svc, link, [GatewayEndpoint("192.0.2.9", False),
                                       GatewayEndpoint("192.0.2.7", True)], owner_uid="u1")
    assert list(slices) == ["web-west"]
    s = slices["web-west"]
    assert s["addressType"] == "IPv4"
    assert s["metadata"]["labels"] == {SERVICE_NAME_LABEL: "web-west",
                                       MANAGED_BY_LABEL: "mirror.meshgate.io",
                                       MIRRORED_LABEL: "true", CLUSTER_LABEL: "west"}
    assert s["metadata"]["annotations"][GATEWAY_IDENTITY_ANNOTATION] == "gw.identity.west"
    assert s["metadata"]["ownerReferences"][0]["uid"] == "u1"
    assert s["ports"] == [{"name": "http", "port": 4143, "protocol": "TCP"},
                          {"name": "grpc", "port": 4143, "protocol": "TCP"}]
    assert [(e["addresses"], e["conditions"]["ready"]) for e in s["endpoints"]] == [
        (["192.0.2.7"], True), (["192.0.2.9"], False)]


def test_ipv6_gateway_addresses_get_their_own_slice() -> None:
    link = _link()
    svc = mirror_service(_remote(), link)
    slices = mirror_slices(svc, link, [GatewayEndpoint("2001:db8::1", True)])
    assert slices["web-west"]["endpoints"] == []
    assert slices["web-west-ipv6"]["addressType"] == "IPv6"


def test_up_to_date_and_patches() -> None:
    link = _link()
    desired = mirror_service(_remote(), link)
    current = {"metadata": {**desired["metadata"], "uid": "u", "resourceVersion": "9",
                            "labels": {**desired["metadata"]["labels"], "stale": "x"}},
               "spec": {**desired["spec"], "clusterIP": "10.96.0.5"}}
    assert not service_up_to_date(current, desired)
    patch = service_patch(current, desired)
    assert patch["metadata"]["labels"]["stale"] is None
    assert patch["spec"]["selector"] is None and patch["spec"]["ports"] == desired["spec"]["ports"]
    current["metadata"]["labels"] = desired["metadata"]["labels"]
    assert service_up_to_date(current, desired)
    slices = mirror_slices(desired, link, [GatewayEndpoint("192.0.2.7", True)], owner_uid="u")
    s = slices["web-west"]
    assert slice_up_to_date(s, s)
    flipped = mirror_slices(desired, link, [GatewayEndpoint("192.0.2.7", False)], owner_uid="u")
    assert not slice_up_to_date(s, flipped["web-west"])
