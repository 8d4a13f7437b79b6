"""Failover priority groups without sockets: the annotations parsed, and the
destination index fed plain dicts of a Service, its mirrors and their slices."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import pytest

from mesh.discovery.failover import (
    CLUSTERS_ANNOTATION,
    POLICY_ANNOTATION,
    FailoverError,
    parse_clusters,
    parse_policy,
)
from mesh.discovery.index import Change, DestinationIndex, ServiceUpdated
from mesh.informer import ADDED, DELETED, MODIFIED
from mesh.proxy.discovery import DiscoveryFile, ServiceSpec
from mesh.structs import convert
from mirror.link import parse_spec
from mirror.mirrors import GatewayEndpoint, mirror_name, mirror_service, mirror_slices

DOMAIN = "cluster.local"
NS = "shop"
VIP = "10.96.0.10"
GATEWAY = "meshgate-gateway.meshgate.serviceaccount.identity.meshgate.cluster.local"
REMOTE = f"web.{NS}.svc.cluster.local"


def web(annotations: dict[str, str] | None = None, name: str = "web") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NS, "annotations": annotations or {}},
            "spec": {"clusterIP": VIP, "ports": [
                {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}


def local_slice(*ips: str) -> dict[str, Any]:
    return {"metadata": {"name": "web-a", "namespace": NS,
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]}


def link(cluster: str) -> Any:
    return parse_spec({"metadata": {"name": cluster, "namespace": "meshgate"}, "spec": {
        "targetClusterName": cluster, "clusterCredentialsSecret": f"creds-{cluster}",
        "gatewayAddress": "gw", "gatewayPort": 4143, "gatewayIdentity": GATEWAY}})


def mirror(cluster: str, gateway_ip: str, *, ready: bool = True, name: str = "web",
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The mirror Service of `name` from `cluster` and its slice, as the controller
    writes them (with a cluster IP, as the API server gives it)."""
    remote = {"metadata": {"name": name, "namespace": NS, "resourceVersion": "1"},
              "spec": {"ports": [{"name": "http", "port": 80}]}}
    svc = mirror_service(remote, link(cluster))
    svc["spec"]["clusterIP"] = f"10.96.1.{len(cluster)}"
    [piece] = mirror_slices(svc, link(cluster), [GatewayEndpoint(gateway_ip, ready)]).values()
    return svc, piece


def updated(changes: list[Change]) -> dict[str, ServiceSpec]:
    return {c.service.address: c.service for c in changes if isinstance(c, ServiceUpdated)}


def groups(spec: ServiceSpec | None) -> list[tuple[int, str, str]]:
    assert spec is not None
    return [(e.priority, e.cluster, e.address) for e in spec.endpoints]


@pytest.fixture
def index() -> DestinationIndex:
    index = DestinationIndex(trust_domain=DOMAIN, cluster_name="east")
    index.slice_event(ADDED, local_slice("10.244.0.1"))
    for cluster, ip in (("west", "192.0.2.1"), ("central", "192.0.2.2")):
        svc, piece = mirror(cluster, ip)
        index.service_event(ADDED, svc)
        index.slice_event(ADDED, piece)
    return index


def test_local_first_then_the_listed_clusters_in_order(index: DestinationIndex) -> None:
    changes = index.service_event(ADDED, web({CLUSTERS_ANNOTATION: "central, west",
                                              POLICY_ANNOTATION: "failback=10s"}))
    spec = updated(changes)[f"{VIP}:80"]
    assert groups(spec) == [(0, "east", "10.244.0.1:8080"), (1, "central", "192.0.2.2:4143"),
                            (2, "west", "192.0.2.1:4143")]
    remote = spec.endpoints[1]
    assert (remote.identity, remote.authority, remote.target_port) == (GATEWAY, REMOTE, 80)
    assert spec.failback_s == 10.0
    # What the index serves is what a proxy accepts, field names and all.
    dumped = msgspec.to_builtins(spec)
    assert dumped["failbackSeconds"] == 10.0
    assert convert(dumped, ServiceSpec) == spec
    DiscoveryFile(services=index.services())


def test_the_local_cluster_listed_in_the_middle_takes_that_place(
        index: DestinationIndex) -> None:
    spec = updated(index.service_event(ADDED, web({CLUSTERS_ANNOTATION:
                                                   "west,east,central"})))[f"{VIP}:80"]
    assert groups(spec) == [(0, "west", "192.0.2.1:4143"), (1, "east", "10.244.0.1:8080"),
                            (2, "central", "192.0.2.2:4143")]
    assert spec.failback_s is None


def test_an_unknown_cluster_is_skipped_once_and_the_rest_kept(
        index: DestinationIndex, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    spec = updated(index.service_event(ADDED, web({CLUSTERS_ANNOTATION:
                                                   "north,central,west,central"})))[
        f"{VIP}:80"]
    assert groups(spec) == [(0, "east", "10.244.0.1:8080"), (1, "central", "192.0.2.2:4143"),
                            (2, "west", "192.0.2.1:4143")]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"failover cluster listed twice service={NS}/web cluster=central cause="
        f"{CLUSTERS_ANNOTATION} lists it more than once; its first place is kept",
        f"failover cluster skipped service={NS}/web cluster=north cause=no mirror of web "
        "from cluster north"]
    caplog.clear()
    index.slice_event(MODIFIED, local_slice("10.244.0.1", "10.244.0.2"))
    assert caplog.records == [], "the same problems are not logged again"


def test_a_mirror_is_found_by_its_labels_not_its_name() -> None:
    long = "a-service-name-long-enough-that-its-mirror-name-is-hashed-" + "x" * 5
    name, full = mirror_name(long, "west")
    assert name != full
    index = DestinationIndex(trust_domain=DOMAIN, cluster_name="east")
    svc, piece = mirror("west", "192.0.2.1", name=long)
    assert svc["metadata"]["name"] == name
    index.service_event(ADDED, svc)
    index.slice_event(ADDED, piece)
    # A Service that merely has the expected name, without the labels, is not a mirror.
    index.service_event(ADDED, web(name=f"{long}-central"))
    spec = updated(index.service_event(ADDED, web({CLUSTERS_ANNOTATION: "west,central"},
                                                  name=long)))[f"{VIP}:80"]
    assert groups(spec) == [(1, "west", "192.0.2.1:4143")]
    assert spec.endpoints[0].authority == f"{long}.{NS}.svc.cluster.local"


def test_mirror_slice_updates_recompute_the_service(index: DestinationIndex) -> None:
    index.service_event(ADDED, web({CLUSTERS_ANNOTATION: "west"}))
    _, piece = mirror("west", "192.0.2.9")
    spec = updated(index.slice_event(MODIFIED, piece))[f"{VIP}:80"]
    assert groups(spec) == [(0, "east", "10.244.0.1:8080"), (1, "west", "192.0.2.9:4143")]
    _, down = mirror("west", "192.0.2.9", ready=False)
    spec = updated(index.slice_event(MODIFIED, down))[f"{VIP}:80"]
    assert groups(spec) == [(0, "east", "10.244.0.1:8080")]
    svc, piece = mirror("west", "192.0.2.9")
    spec = updated(index.slice_event(MODIFIED, piece))[f"{VIP}:80"]
    assert groups(spec) == [(0, "east", "10.244.0.1:8080"), (1, "west", "192.0.2.9:4143")]
    # The mirror going away and coming back.
    spec = updated(index.service_event(DELETED, svc))[f"{VIP}:80"]
    assert groups(spec) == [(0, "east", "10.244.0.1:8080")]
    spec = updated(index.service_event(ADDED, svc))[f"{VIP}:80"]
    assert groups(spec) == [(0, "east", "10.244.0.1:8080"), (1, "west", "192.0.2.9:4143")]


def test_removing_the_annotation_serves_a_plain_service(index: DestinationIndex) -> None:
    index.service_event(ADDED, web({CLUSTERS_ANNOTATION: "west"}))
    spec = updated(index.service_event(MODIFIED, web()))[f"{VIP}:80"]
    assert groups(spec) == [(0, "east", "10.244.0.1:8080")]
    # Mirrors carry the remote Service's annotations, which speak of the remote cluster.
    svc, _ = mirror("west", "192.0.2.1")
    svc["metadata"]["annotations"][CLUSTERS_ANNOTATION] = "east"
    index.service_event(MODIFIED, svc)
    assert [e.cluster for e in index.by_address("10.96.1.4", 80).endpoints] == ["west"]  # type: ignore[union-attr]


@pytest.mark.parametrize("value", ["", " ", "west;central", "west,,central", "West", "west,"])
def test_an_empty_or_garbled_annotation_serves_a_plain_service(
        index: DestinationIndex, caplog: pytest.LogCaptureFixture, value: str) -> None:
    caplog.set_level(logging.WARNING)
    spec = updated(index.service_event(ADDED, web({CLUSTERS_ANNOTATION: value})))[f"{VIP}:80"]
    assert groups(spec) == [(0, "east", "10.244.0.1:8080")]
    [record] = caplog.records
    assert record.getMessage().startswith(f"failover annotation ignored service={NS}/web "
                                          f"cause={CLUSTERS_ANNOTATION}")
    assert record.getMessage().endswith("; served without failover")


def test_a_bad_policy_keeps_the_groups_with_the_default_failback(
        index: DestinationIndex, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    spec = updated(index.service_event(ADDED, web({CLUSTERS_ANNOTATION: "west",
                                                   POLICY_ANNOTATION: "failback=soon"})))[
        f"{VIP}:80"]
    assert [e.priority for e in spec.endpoints] == [0, 1] and spec.failback_s is None
    assert "failover policy ignored service=shop/web cause=" in caplog.text


def test_clusters_parsing() -> None:
    assert parse_clusters(" west , central,west ") == (["west", "central"], ["west"])
    for bad in ("", "west central", "west,-x", "a" * 64):
        with pytest.raises(FailoverError):
            parse_clusters(bad)


def test_policy_parsing() -> None:
    assert parse_policy("failback=10s").failback_s == 10.0
    assert parse_policy(" failback = 500ms ").failback_s == 0.5
    assert parse_policy("failback=2m,").failback_s == 120.0
    assert parse_policy("").failback_s is None
    for bad, says in (("failback", "is not key=value"), ("damping=10s", "unknown key"),
                      ("failback=10", "is not a duration"), ("failback=-1s", "not a duration"),
                      ("failback=0s", "above zero"), ("failback=2h", "is not a duration"),
                      ("failback=61m", "at most 60m"),
                      ("failback=1s,failback=2s", "given twice")):
        with pytest.raises(FailoverError, match=says):
            parse_policy(bad)
