"""Bad requests get kube's Status answers, leave nothing behind, and the server
keeps serving everyone else."""

from __future__ import annotations

import json
import socket
import ssl
import uuid

from kubernetes import client

from tests.cluster import Cluster


def _ns(cluster: Cluster) -> str:
    name = f"b-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(cluster.api()).create_namespace({"metadata": {"name": name}})
    return name


def test_malformed_json_and_yaml_are_400(cluster: Cluster) -> None:
    ns = _ns(cluster)
    status, body = cluster.raw("POST", f"/api/v1/namespaces/{ns}/configmaps", b'{"metadata": ')
    assert status == 400 and body["kind"] == "Status" and body["reason"] == "BadRequest"
    assert "not valid JSON" in body["message"]
    status, body = cluster.raw("POST", f"/api/v1/namespaces/{ns}/configmaps",
                               b"metadata: [unclosed", content_type="application/yaml")
    assert status == 400 and "not valid YAML" in body["message"]
    status, body = cluster.raw("POST", f"/api/v1/namespaces/{ns}/configmaps",
                               b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: from-yaml}\n",
                               content_type="application/yaml")
    assert status == 201 and body["metadata"]["name"] == "from-yaml"
    names = [c["metadata"]["name"] for c in cluster.raw(
        "GET", f"/api/v1/namespaces/{ns}/configmaps")[1]["items"]]
    assert "from-yaml" in names and len([n for n in names if n != "kube-root-ca.crt"]) == 1


def test_type_mismatch_in_builtin_is_400(cluster: Cluster) -> None:
    ns = _ns(cluster)
    status, body = cluster.raw("POST", f"/api/v1/namespaces/{ns}/services", json.dumps(
        {"metadata": {"name": "s"}, "spec": {"ports": [{"port": "eighty"}]}}).encode())
    assert status == 400 and "spec.ports[0].port" in body["message"]


def test_unknown_resource_and_group_are_404(cluster: Cluster) -> None:
    for path in ("/api/v1/namespaces/default/widgets", "/apis/nosuch.io/v1/things",
                 "/apis/nosuch.io", "/api/v1/nodes/x/y/z"):
        status, body = cluster.raw("GET", path)
        assert status == 404, path
        assert body["reason"] == "NotFound"
    status, body = cluster.raw("GET", "/api/v1/namespaces/default/services/nope")
    assert status == 404 and body["message"] == 'services "nope" not found'
    assert body["details"] == {"name": "nope", "kind": "services"}


def test_invalid_names_are_422_with_causes(cluster: Cluster) -> None:
    ns = _ns(cluster)
    status, body = cluster.raw("POST", f"/api/v1/namespaces/{ns}/configmaps", json.dumps(
        {"metadata": {"name": "Not_Valid", "labels": {"bad key!": "x"}}}).encode())
    assert status == 422 and body["reason"] == "Invalid"
    fields = {c["field"] for c in body["details"]["causes"]}
    assert fields == {"metadata.name", "metadata.labels"}
    status, body = cluster.raw("POST", f"/api/v1/namespaces/{ns}/services", json.dumps(
        {"metadata": {"name": "1starts-with-digit"}, "spec": {"ports": [{"port": 0}]}}).encode())
    assert status == 422
    assert {c["field"] for c in body["details"]["causes"]} == {"metadata.name",
                                                               "spec.ports[0].port"}


def test_stale_resource_version_is_409(cluster: Cluster) -> None:
    ns = _ns(cluster)
    _, created = cluster.raw("POST", f"/api/v1/namespaces/{ns}/configmaps",
                             b'{"metadata":{"name":"c"}}')
    cluster.raw("PATCH", f"/api/v1/namespaces/{ns}/configmaps/c", b'{"data":{"a":"1"}}',
                content_type="application/merge-patch+json")
    status, body = cluster.raw("PATCH", f"/api/v1/namespaces/{ns}/configmaps/c", json.dumps(
        {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]},
         "data": {"a": "2"}}).encode(), content_type="application/merge-patch+json")
    assert status == 409 and body["reason"] == "Conflict"
    assert cluster.raw("GET", f"/api/v1/namespaces/{ns}/configmaps/c")[1]["data"] == {"a": "1"}


def test_oversized_body_is_413(cluster: Cluster) -> None:
    ns = _ns(cluster)
    big = json.dumps({"metadata": {"name": "big"}, "data": {"x": "a" * (3 * 1024 * 1024)}})
    status, body = cluster.raw("POST", f"/api/v1/namespaces/{ns}/configmaps", big.encode())
    assert status == 413 and body["reason"] == "RequestEntityTooLarge"
    assert cluster.raw("GET", f"/api/v1/namespaces/{ns}/configmaps/big")[0] == 404


def test_bad_patches(cluster: Cluster) -> None:
    ns = _ns(cluster)
    cluster.raw("POST", f"/api/v1/namespaces/{ns}/configmaps", b'{"metadata":{"name":"p"}}')
    path = f"/api/v1/namespaces/{ns}/configmaps/p"
    status, body = cluster.raw("PATCH", path, b'{"data":{}}',
                               content_type="application/json-patch+json")
    assert status == 400
    status, body = cluster.raw("PATCH", path, b'[{"op":"remove","path":"/data/none"}]',
                               content_type="application/json-patch+json")
    assert status == 422
    status, body = cluster.raw("PATCH", path, b'{"data":{}}', content_type="text/plain")
    assert status == 415 and body["reason"] == "UnsupportedMediaType"
    status, body = cluster.raw("PATCH", path, b'{"data":{"$weird":1}}',
                               content_type="application/strategic-merge-patch+json")
    assert status == 400 and "$weird" in body["message"]
    assert "data" not in cluster.raw("GET", path)[1]


def test_garbage_bytes_do_not_disturb_other_clients(cluster: Cluster) -> None:
    host, port = cluster.server.removeprefix("https://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"\x16\x03\x01\x00\xff" + b"\x00" * 300)  # a broken TLS hello
        try:
            answer = s.recv(1024)
        except ConnectionResetError:
            answer = b""
        assert answer == b"" or answer[0] == 0x15  # closed, or a TLS alert record
    ctx = ssl.create_default_context(cafile=str(cluster.state_dir / "ca.crt"))
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert b" 400 Bad Request" in tls.recv(1024).split(b"\r\n")[0]
    assert client.CoreV1Api(cluster.api()).list_namespace().items
