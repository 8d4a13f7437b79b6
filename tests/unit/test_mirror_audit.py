"""What `multicluster check` finds wrong with mirrors (orphans, collisions, mirrors
without endpoints, mirrors no Link names) and the probe latency percentiles in
a Link's status, computed without a cluster."""

from __future__ import annotations

from typing import Any

from mirror.audit import LocalView, collisions, missing_endpoints, orphans, unlinked
from mirror.link import LinkSpec
from mirror.mirrors import (
    CLUSTER_LABEL,
    MIRRORED_LABEL,
    GatewayEndpoint,
    mirror_service,
    mirror_slices,
)
from mirror.status import latency_summary, link_status

EXPORTED = {"mirror.meshgate.io/exported": "true"}


def _link(**extra: Any) -> LinkSpec:
    return LinkSpec.model_validate({"targetClusterName": "west",
                                    "clusterCredentialsSecret": "west-creds",
                                    "gatewayAddress": "192.0.2.7", **extra})


def _remote(ns: str, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"namespace": ns, "name": name, "resourceVersion": "7",
                         "labels": EXPORTED if labels is None else labels},
            "spec": {"ports": [{"name": "http", "port": 80}]}}


def _mirrored(remote: list[dict[str, Any]], link: LinkSpec, *, ready: bool = True
              ) -> LocalView:
    """The local cluster as a controller leaves it after mirroring `remote`."""
    services, slices = [], []
    for obj in remote:
        svc = mirror_service(obj, link)
        services.append(svc)
        slices.extend(mirror_slices(svc, link, [GatewayEndpoint("192.0.2.7", ready)]).values())
    return LocalView.of(services, slices)


def test_a_mirrored_cluster_has_no_findings() -> None:
    link = _link()
    remote = [_remote("shop", "web"), _remote("shop", "cart")]
    local = _mirrored(remote, link, ready=False)  # not ready is the gateway's business
    assert missing_endpoints(local, "west") == []
    assert orphans(local, remote, link) == []
    assert collisions(local, remote, link) == []
    assert unlinked(local, {"west"}) == []


def test_orphans_say_why() -> None:
    link = _link()
    remote = [_remote("shop", "web"), _remote("shop", "gone"), _remote("shop", "quiet")]
    local = _mirrored(remote, link)
    now = [_remote("shop", "web"), _remote("shop", "quiet", labels={})]
    assert orphans(local, now, link) == [
        ("shop/gone-west", "remote Service shop/gone no longer exists in west"),
        ("shop/quiet-west", "remote Service shop/quiet is no longer exported (the Link's "
                            "selector does not pick it)")]
    moved = _link(namespaceMapping={"shop": "store"})
    assert ("shop/web-west", "remote Service shop/web is now mirrored to store/web-west"
            ) in orphans(local, now, moved)


def test_collisions_of_two_remotes_and_of_a_service_in_the_way() -> None:
    link = _link(namespaceMapping={"a": "shared", "b": "shared"})
    remote = [_remote("a", "web"), _remote("b", "web"), _remote("a", "api")]
    local = LocalView.of([{"metadata": {"namespace": "shared", "name": "api-west"}}], [])
    assert collisions(local, remote, link) == [
        "Service shared/api-west is a Service that is not a mirror, so remote Service a/api "
        "of west is not mirrored",
        "remote Services a/web and b/web of west would both be mirrored to shared/web-west"]
    other = mirror_service(_remote("a", "api"), _link(targetClusterName="east"))
    other["metadata"]["name"] = "api-west"
    other["metadata"]["namespace"] = "shared"
    found = collisions(LocalView.of([other], []), remote[2:], link)
    assert found == ["Service shared/api-west is a mirror of cluster east, so remote Service "
                     "a/api of west is not mirrored"]


def test_mirrors_without_endpoints_and_without_a_link() -> None:
    link = _link()
    remote = [_remote("shop", "web"), _remote("shop", "cart")]
    local = _mirrored(remote, link)
    local.slices = [s for s in local.slices if s["metadata"]["name"] != "web-west"]
    local.slices[0]["endpoints"] = []
    assert missing_endpoints(local, "west") == [
        ("shop/cart-west", "its EndpointSlice holds no endpoint"),
        ("shop/web-west", "it has no EndpointSlice")]
    discovered = _link(remoteDiscoverySelector={"matchLabels": {"flat": "yes"}})
    flat = _mirrored([_remote("shop", "db", labels={"flat": "yes"})], discovered)
    assert flat.slices == [] and missing_endpoints(flat, "west") == []
    local.services["x/old-gone"] = {"metadata": {"namespace": "x", "name": "old-gone", "labels": {
        MIRRORED_LABEL: "true", CLUSTER_LABEL: "gone"}}}
    assert unlinked(local, {"west"}) == [("x/old-gone", "gone")]


def test_latency_percentiles_by_nearest_rank() -> None:
    assert latency_summary([]) is None
    assert latency_summary([float(n) for n in range(100, 0, -1)]) == {
        "p50": 50.0, "p95": 95.0, "p99": 99.0, "samples": 100}
    assert latency_summary([1.234]) == {"p50": 1.2, "p95": 1.2, "p99": 1.2, "samples": 1}
    status = link_status({}, [], previous=None, generation=1,
                         latency=latency_summary([2.0, 4.0]))
    assert status["gatewayLatency"] == {"p50": 2.0, "p95": 4.0, "p99": 4.0, "samples": 2}
    assert "gatewayLatency" not in link_status({}, [], previous=None, generation=1)
