"""CRUD on every built-in kind through the official kubernetes client."""

from __future__ import annotations

import base64
import ipaddress
import json
import socket
import ssl
import time
import uuid
from urllib.parse import urlsplit

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.cluster import Cluster, wait_for

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"


def _ns(cluster: Cluster) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(cluster.api()).create_namespace({"metadata": {"name": name}})
    return name


def test_discovery_and_version(cluster: Cluster) -> None:
    api = cluster.api()
    version = client.VersionApi(api).get_code()
    assert version.major == "1"
    groups = {g.name for g in client.ApisApi(api).get_api_versions().groups}
    assert {"discovery.k8s.io", "coordination.k8s.io", "rbac.authorization.k8s.io",
            "apiextensions.k8s.io", "authentication.k8s.io"} <= groups
    core = client.CoreV1Api(api).get_api_resources()
    names = {r.name for r in core.resources}
    assert {"namespaces", "services", "services/status", "pods", "pods/status", "endpoints",
            "secrets", "configmaps", "serviceaccounts", "serviceaccounts/token"} <= names


def test_system_namespaces_and_default_objects(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api())
    names = {n.metadata.name for n in core.list_namespace().items}
    assert {"default", "kube-system", "kube-public", "kube-node-lease"} <= names
    svc = core.read_namespaced_service("kubernetes", "default")
    assert svc.spec.cluster_ip == "10.96.0.1"
    ns = _ns(cluster)
    wait_for(lambda: core.read_namespaced_service_account("default", ns), what="default SA")
    cm = wait_for(lambda: core.read_namespaced_config_map("kube-root-ca.crt", ns))
    assert "BEGIN CERTIFICATE" in cm.data["ca.crt"]


def test_service_lifecycle(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api())
    ns = _ns(cluster)
    created = core.create_namespaced_service(ns, {
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80,
                                                         "targetPort": 8080}]}})
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert ipaddress.ip_address(created.spec.cluster_ip) in ipaddress.ip_network("10.96.0.0/16")
    assert created.spec.ports[0].protocol == "TCP"
    got = core.read_namespaced_service("web", ns)
    assert got.metadata.resource_version == created.metadata.resource_version

    patched = core.patch_namespaced_service("web", ns, {"metadata": {"labels": {"tier": "a"}}},
                                            _content_type=MERGE)
    assert patched.metadata.labels == {"app": "web", "tier": "a"}
    assert int(patched.metadata.resource_version) > int(created.metadata.resource_version)

    patched = core.patch_namespaced_service("web", ns, {"spec": {"ports": [
        {"port": 9090, "name": "metrics"}]}}, _content_type=STRATEGIC)
    assert sorted(p.port for p in patched.spec.ports) == [80, 9090]

    patched = core.patch_namespaced_service("web", ns, [
        {"op": "replace", "path": "/metadata/labels/tier", "value": "b"}],
        _content_type=JSON_PATCH)
    assert patched.metadata.labels["tier"] == "b"

    patched.metadata.annotations = {"note": "replaced"}
    replaced = core.replace_namespaced_service("web", ns, patched)
    assert replaced.metadata.annotations == {"note": "replaced"}
    assert replaced.spec.cluster_ip == created.spec.cluster_ip

    listed = core.list_namespaced_service(ns, label_selector="app=web,tier in (b)")
    assert [s.metadata.name for s in listed.items] == ["web"]
    assert core.list_namespaced_service(ns, label_selector="tier=a").items == []
    assert [s.metadata.name for s in core.list_namespaced_service(
        ns, field_selector="metadata.name=web").items] == ["web"]

    core.delete_namespaced_service("web", ns)
    with pytest.raises(ApiException) as e:
        core.read_namespaced_service("web", ns)
    assert e.value.status == 404


def test_optimistic_concurrency_conflict(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api())
    ns = _ns(cluster)
    cm = core.create_namespaced_config_map(ns, {"metadata": {"name": "c"}, "data": {"a": "1"}})
    first = core.read_namespaced_config_map("c", ns)
    first.data = {"a": "2"}
    core.replace_namespaced_config_map("c", ns, first)
    cm.data = {"a": "3"}
    with pytest.raises(ApiException) as e:
        core.replace_namespaced_config_map("c", ns, cm)
    assert e.value.status == 409
    assert "the object has been modified" in e.value.body
    assert core.read_namespaced_config_map("c", ns).data == {"a": "2"}


def test_generate_name_and_already_exists(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api())
    ns = _ns(cluster)
    a = core.create_namespaced_config_map(ns, {"metadata": {"generateName": "cfg-"}})
    b = core.create_namespaced_config_map(ns, {"metadata": {"generateName": "cfg-"}})
    assert a.metadata.name.startswith("cfg-") and len(a.metadata.name) == 9
    assert a.metadata.name != b.metadata.name and a.metadata.uid != b.metadata.uid
    with pytest.raises(ApiException) as e:
        core.create_namespaced_config_map(ns, {"metadata": {"name": a.metadata.name}})
    assert e.value.status == 409 and "already exists" in e.value.body


def test_secret_string_data_and_service_account(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api())
    ns = _ns(cluster)
    secret = core.create_namespaced_secret(ns, {"metadata": {"name": "s"},
                                                "stringData": {"password": "hunter2"}})
    assert secret.type == "Opaque"
    assert base64.b64decode(secret.data["password"]) == b"hunter2"
    sa = core.create_namespaced_service_account(ns, {"metadata": {"name": "robot"}})
    assert sa.metadata.uid
    assert [s.metadata.name for s in core.list_namespaced_service_account(
        ns, field_selector="metadata.name=robot").items] == ["robot"]
    core.delete_namespaced_service_account("robot", ns)


def test_pod_status_subresource(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api())
    ns = _ns(cluster)
    pod = core.create_namespaced_pod(ns, {
        "metadata": {"name": "p", "labels": {"app": "x"}},
        "spec": {"containers": [{"name": "app", "image": "busybox"}]},
        "status": {"podIP": "10.0.0.9"}})
    assert pod.status.phase == "Pending" and pod.status.pod_ip is None
    updated = core.patch_namespaced_pod_status("p", ns, {"status": {
        "phase": "Running", "podIP": "10.244.0.5"}}, _content_type=MERGE)
    assert updated.status.pod_ip == "10.244.0.5"
    # Writes to the main resource do not touch status; writes to /status touch only status.
    main = core.patch_namespaced_pod("p", ns, {"metadata": {"labels": {"v": "2"}},
                                               "status": {"podIP": "1.1.1.1"}},
                                     _content_type=MERGE)
    assert main.status.pod_ip == "10.244.0.5" and main.metadata.labels["v"] == "2"
    status_only = core.patch_namespaced_pod_status("p", ns, {"metadata": {"labels": {"v": "3"}}},
                                                   _content_type=MERGE)
    assert status_only.metadata.labels["v"] == "2"
    assert [p.metadata.name for p in core.list_namespaced_pod(
        ns, field_selector="status.phase=Running").items] == ["p"]


def test_endpoints_slices_leases_events(cluster: Cluster) -> None:
    api = cluster.api()
    core, disc = client.CoreV1Api(api), client.DiscoveryV1Api(api)
    coord = client.CoordinationV1Api(api)
    ns = _ns(cluster)
    core.create_namespaced_endpoints(ns, {"metadata": {"name": "ext"}, "subsets": [
        {"addresses": [{"ip": "192.0.2.10"}], "ports": [{"port": 80}]}]})
    assert core.read_namespaced_endpoints("ext", ns).subsets[0].addresses[0].ip == "192.0.2.10"
    disc.create_namespaced_endpoint_slice(ns, {
        "metadata": {"name": "ext-1", "labels": {"kubernetes.io/service-name": "ext"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["192.0.2.10"]}],
        "ports": [{"port": 80, "protocol": "TCP"}]})
    slices = disc.list_namespaced_endpoint_slice(
        ns, label_selector="kubernetes.io/service-name=ext")
    assert [s.metadata.name for s in slices.items] == ["ext-1"]
    lease = coord.create_namespaced_lease(ns, {"metadata": {"name": "leader"},
                                               "spec": {"holderIdentity": "a"}})
    lease.spec.holder_identity = "b"
    assert coord.replace_namespaced_lease("leader", ns, lease).spec.holder_identity == "b"
    core.create_namespaced_event(ns, {"metadata": {"name": "ev1"}, "reason": "Test",
                                      "involvedObject": {"kind": "Lease", "name": "leader"}})
    assert [e.reason for e in core.list_namespaced_event(
        ns, field_selector="involvedObject.name=leader").items] == ["Test"]


def test_rbac_objects_crud(cluster: Cluster) -> None:
    rbac = client.RbacAuthorizationV1Api(cluster.api())
    ns = _ns(cluster)
    rbac.create_namespaced_role(ns, {"metadata": {"name": "reader"}, "rules": [
        {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list"]}]})
    rbac.create_namespaced_role_binding(ns, {
        "metadata": {"name": "reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "x", "namespace": ns}]})
    binding = rbac.read_namespaced_role_binding("reader", ns)
    binding.role_ref.name = "other"
    with pytest.raises(ApiException) as e:
        rbac.replace_namespaced_role_binding("reader", ns, binding)
    assert e.value.status == 422 and "immutable" in e.value.body
    assert any(r.metadata.name == "cluster-admin" for r in rbac.list_cluster_role().items)


def test_namespace_deletion_removes_contents(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api())
    ns = _ns(cluster)
    core.create_namespaced_config_map(ns, {"metadata": {"name": "c"}})
    core.delete_namespace(ns)
    with pytest.raises(ApiException) as e:
        core.create_namespaced_config_map(ns, {"metadata": {"name": "d"}})
    assert e.value.status in (403, 404)

    def gone() -> bool:
        try:
            core.read_namespace(ns)
        except ApiException as err:
            return err.status == 404
        return False

    wait_for(gone, what="namespace removal")
    assert cluster.raw("GET", f"/api/v1/namespaces/{ns}/configmaps/c")[0] == 404


def test_finalizers_hold_deletion(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api())
    ns = _ns(cluster)
    core.create_namespaced_config_map(ns, {"metadata": {"name": "held",
                                                        "finalizers": ["example.com/hold"]}})
    core.delete_namespaced_config_map("held", ns)
    held = core.read_namespaced_config_map("held", ns)
    assert held.metadata.deletion_timestamp is not None
    core.patch_namespaced_config_map("held", ns, {"metadata": {"finalizers": None}},
                                     _content_type=MERGE)
    with pytest.raises(ApiException) as e:
        core.read_namespaced_config_map("held", ns)
    assert e.value.status == 404


def test_list_pagination(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api())
    ns = _ns(cluster)
    for i in range(7):
        core.create_namespaced_config_map(ns, {"metadata": {"name": f"c{i}"}})
    names: list[str] = []
    token = None
    while True:
        page = core.list_namespaced_config_map(ns, limit=3, _continue=token)
        names += [c.metadata.name for c in page.items]
        token = page.metadata._continue
        if not token:
            break
    assert [n for n in names if n.startswith("c")] == [f"c{i}" for i in range(7)]


def test_a_body_that_arrives_in_pieces_is_read_whole(cluster: Cluster) -> None:
    url = urlsplit(cluster.server)
    body = json.dumps({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "in-pieces", "namespace": "default"},
                        "data": {"big": "x" * 6000}}).encode()
    head = (f"POST /api/v1/namespaces/default/configmaps HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Authorization: Bearer {cluster.token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    ctx = ssl.create_default_context(cafile=str(cluster.state_dir / "ca.crt"))
    with socket.create_connection((url.hostname, url.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=url.hostname) as tls:
        tls.sendall(head + body[:1000])
        time.sleep(0.2)  # the rest arrives later, as a slow client's would
        tls.sendall(body[1000:])
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 201"), reply[:300]
    status, obj = cluster.raw("GET", "/api/v1/namespaces/default/configmaps/in-pieces")
    assert status == 200 and obj["data"]["big"] == "x" * 6000
