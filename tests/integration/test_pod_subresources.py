"""The Pod subresources the kubelet relies on, served by the API server alone (no
kubelet runs here): ``pods/binding`` as kube-apiserver serves it, ``pods/log``
and the streaming subresources refused with a 400 that says why."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.cluster import Cluster


@pytest.fixture
def ns(cluster: Cluster) -> Iterator[str]:
    name = f"b-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name


def _pod(core: client.CoreV1Api, ns: str, name: str) -> client.V1Pod:
    return core.create_namespaced_pod(ns, client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(containers=[client.V1Container(
            name="app", image="busybox", command=["sleep", "60"])])))


def _binding(cluster: Cluster, ns: str, name: str, body: dict[str, object]
             ) -> tuple[int, object]:
    return cluster.raw("POST", f"/api/v1/namespaces/{ns}/pods/{name}/binding",
                       json.dumps(body).encode())


def test_binding_sets_the_node_once(cluster: Cluster, ns: str) -> None:
    core = client.CoreV1Api(cluster.api())
    _pod(core, ns, "p")
    core.create_namespaced_binding(ns, client.V1Binding(
        metadata=client.V1ObjectMeta(name="p"),
        target=client.V1ObjectReference(kind="Node", name="node-a")), _preload_content=False)
    pod = core.read_namespaced_pod("p", ns)
    assert pod.spec.node_name == "node-a"
    assert [(c.type, c.status) for c in pod.status.conditions] == [("PodScheduled", "True")]
    code, status = _binding(cluster, ns, "p", {
        "apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"},
        "target": {"kind": "Node", "name": "node-b"}})
    assert code == 409 and isinstance(status, dict)
    assert status["reason"] == "Conflict"
    assert status["message"] == ('Operation cannot be fulfilled on pods/binding "p": pod p is '
                                 'already assigned to node "node-a"')
    # nodeName cannot be changed by an update either.
    proc = cluster.kubectl("patch", "pod", "p", "-n", ns, "-p",
                           '{"spec":{"nodeName":"node-b"}}', check=False)
    assert proc.returncode == 1 and "Forbidden: pod updates may not change fields" in proc.stderr


def test_binding_refusals(cluster: Cluster, ns: str) -> None:
    core = client.CoreV1Api(cluster.api())
    _pod(core, ns, "q")
    code, status = _binding(cluster, ns, "q", {"metadata": {"name": "q"},
                                               "target": {"kind": "Pod", "name": "x"}})
    assert code == 422 and isinstance(status, dict)
    assert status["details"]["causes"][0]["field"] == "target.kind"
    code, status = _binding(cluster, ns, "q", {"metadata": {"name": "other"},
                                               "target": {"name": "n"}})
    assert code == 400 and isinstance(status, dict)
    assert status["message"] == "name in URL does not match name in Binding object"
    code, status = _binding(cluster, ns, "missing", {"target": {"name": "n"}})
    assert code == 404
    code, status = cluster.raw("POST", f"/api/v1/namespaces/{ns}/bindings",
                               json.dumps({"target": {"name": "n"}}).encode())
    assert code == 400 and isinstance(status, dict)
    assert status["message"] == "a Binding must name the Pod in metadata.name"
    with pytest.raises(ApiException) as e:
        core.read_namespaced_pod_log("q", ns)
    assert e.value.status == 400
    assert "started without a kubelet" in json.loads(e.value.body)["message"]


def test_exec_and_attach_are_refused_naming_what_is_missing(cluster: Cluster, ns: str) -> None:
    core = client.CoreV1Api(cluster.api())
    _pod(core, ns, "r")
    proc = cluster.kubectl("exec", "r", "-n", ns, "--", "true", check=False)
    assert proc.returncode == 1
    assert "pods/exec is not served: this server runs no kubelet" in proc.stderr
    attach = cluster.raw("POST", f"/api/v1/namespaces/{ns}/pods/r/attach?stdout=true")
    assert attach[0] == 400 and isinstance(attach[1], dict)
    assert "pods/attach is not served" in attach[1]["message"]
