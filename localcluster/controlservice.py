"""The control plane's headless Service on the embedded cluster, which `cluster up`
publishes: injected proxies find the control plane by its name."""

from __future__ import annotations

from typing import Any

NAMESPACE = "meshgate"
MANAGED_BY = "cluster-up.meshgate.io"


def publish_headless(api: Any, node_address: str) -> None:
    """The headless Service ``meshgate/meshgate-control-headless`` (port 8086) and an
    EndpointSlice naming the node's address, where the control plane listens: injected
    proxies find the control plane by that name, as Linkerd's proxies find
    linkerd-dst-headless (a meshed pod's service range is local to its proxy, so a
    ClusterIP would loop back). Idempotent."""
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    from mesh.inject import CONTROL_PORT, CONTROL_SERVICE

    port = {"name": "control", "port": CONTROL_PORT, "protocol": "TCP"}
    service: Any = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": CONTROL_SERVICE, "namespace": NAMESPACE},
        "spec": {"clusterIP": "None", "ports": [port]}}
    endpoints: Any = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{CONTROL_SERVICE}-node", "namespace": NAMESPACE,
                     "labels": {"kubernetes.io/service-name": CONTROL_SERVICE,
                                "endpointslice.kubernetes.io/managed-by": MANAGED_BY}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [node_address], "conditions": {"ready": True}}],
        "ports": [port]}
    core, discovery = k8s.CoreV1Api(api), k8s.DiscoveryV1Api(api)
    calls: Any = ((core.create_namespaced_service, core.patch_namespaced_service, service),
                  (discovery.create_namespaced_endpoint_slice,
                   discovery.replace_namespaced_endpoint_slice, endpoints))
    for create, replace, body in calls:
        try:
            create(NAMESPACE, body)
        except ApiException as e:
            if e.status != 409:
                raise
            replace(body["metadata"]["name"], NAMESPACE, body)
