"""The endpoints controller: ready Pods selected by a Service become its
EndpointSlices and Endpoints, and follow Pod readiness, labels and deletion."""

from __future__ import annotations

import uuid
from typing import Any

from kubernetes import client

from tests.cluster import Cluster, wait_for

MERGE = "application/merge-patch+json"


def _pod(core: client.CoreV1Api, ns: str, name: str, ip: str, *, ready: bool,
         labels: dict[str, str] | None = None) -> None:
    core.create_namespaced_pod(ns, {
        "metadata": {"name": name, "labels": labels or {"app": "web"}},
        "spec": {"containers": [{"name": "app", "image": "web",
                                 "ports": [{"name": "http", "containerPort": 8080}]}]}})
    _set_ready(core, ns, name, ip, ready)


def _set_ready(core: client.CoreV1Api, ns: str, name: str, ip: str, ready: bool) -> None:
    core.patch_namespaced_pod_status(name, ns, {"status": {
        "phase": "Running", "podIP": ip,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}},
        _content_type=MERGE)


def _slice_state(disc: client.DiscoveryV1Api, ns: str, svc: str
                 ) -> dict[str, Any] | None:
    slices = disc.list_namespaced_endpoint_slice(
        ns, label_selector=f"kubernetes.io/service-name={svc}").items
    if len(slices) != 1:
        return None
    s = slices[0]
    return {"ports": [(p.name, p.port) for p in s.ports or []],
            "endpoints": sorted((e.addresses[0], e.conditions.ready)
                                for e in s.endpoints or [])}


def test_endpoints_follow_pod_readiness(cluster: Cluster) -> None:
    api = cluster.api()
    core, disc = client.CoreV1Api(api), client.DiscoveryV1Api(api)
    ns = f"e-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": ns}})
    core.create_namespaced_service(ns, {"metadata": {"name": "web"}, "spec": {
        "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80,
                                               "targetPort": "http"}]}})
    _pod(core, ns, "web-1", "10.244.0.11", ready=True)
    _pod(core, ns, "web-2", "10.244.0.12", ready=False)
    _pod(core, ns, "other", "10.244.0.13", ready=True, labels={"app": "other"})

    want = {"ports": [("http", 8080)],
            "endpoints": [("10.244.0.11", True), ("10.244.0.12", False)]}
    wait_for(lambda: _slice_state(disc, ns, "web") == want, what="slice with both pods")
    slice_obj = disc.list_namespaced_endpoint_slice(
        ns, label_selector="kubernetes.io/service-name=web").items[0]
    assert slice_obj.metadata.labels["endpointslice.kubernetes.io/managed-by"] == \
        "endpointslice-controller.k8s.io"
    assert slice_obj.metadata.owner_references[0].kind == "Service"

    def endpoints() -> tuple[list[str], list[str]]:
        ep = core.read_namespaced_endpoints("web", ns)
        subset = (ep.subsets or [client.V1EndpointSubset()])[0]
        return ([a.ip for a in subset.addresses or []],
                [a.ip for a in subset.not_ready_addresses or []])

    wait_for(lambda: endpoints() == (["10.244.0.11"], ["10.244.0.12"]), what="endpoints")

    _set_ready(core, ns, "web-2", "10.244.0.12", True)
    want["endpoints"] = [("10.244.0.11", True), ("10.244.0.12", True)]
    wait_for(lambda: _slice_state(disc, ns, "web") == want, what="web-2 ready")
    wait_for(lambda: endpoints() == (["10.244.0.11", "10.244.0.12"], []), what="both ready")

    core.patch_namespaced_pod("web-1", ns, {"metadata": {"labels": {"app": "moved"}}},
                              _content_type=MERGE)
    core.delete_namespaced_pod("web-2", ns)
    # As kube-controller-manager does, an empty Service keeps one placeholder slice.
    wait_for(lambda: _slice_state(disc, ns, "web") == {"ports": [], "endpoints": []},
             what="no endpoints")

    core.delete_namespaced_service("web", ns)
    wait_for(lambda: disc.list_namespaced_endpoint_slice(ns).items == [],
             what="slices removed with the service")


def test_selectorless_service_is_left_alone(cluster: Cluster) -> None:
    api = cluster.api()
    core, disc = client.CoreV1Api(api), client.DiscoveryV1Api(api)
    ns = f"e-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": ns}})
    core.create_namespaced_service(ns, {"metadata": {"name": "mirror"}, "spec": {
        "ports": [{"port": 80}]}})
    disc.create_namespaced_endpoint_slice(ns, {
        "metadata": {"name": "mirror-gw", "labels": {"kubernetes.io/service-name": "mirror",
                                                     "endpointslice.kubernetes.io/managed-by":
                                                     "mirror.meshgate.io"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["203.0.113.5"]}],
        "ports": [{"port": 4143}]})
    # The controller handles keys in order: once a later Service has its slice, the
    # selectorless one has been looked at too.
    core.create_namespaced_service(ns, {"metadata": {"name": "probe"}, "spec": {
        "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]}})
    wait_for(lambda: _slice_state(disc, ns, "probe") is not None, what="probe slice")
    names = sorted(s.metadata.name for s in disc.list_namespaced_endpoint_slice(ns).items)
    assert names[0] == "mirror-gw" and len(names) == 2
