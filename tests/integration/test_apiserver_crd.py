"""CustomResourceDefinitions and their custom resources, validated by schema."""

from __future__ import annotations

import json
import uuid

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.cluster import Cluster

GROUP = "multicluster.meshgate.io"


def _crd(plural: str = "links", kind: str = "Link") -> dict[str, object]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP, "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind,
                      "shortNames": [kind.lower()[:3]]},
            "versions": [{
                "name": "v1alpha1", "served": True, "storage": True,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {"type": "object", "required": ["targetClusterName"],
                                 "properties": {
                                     "targetClusterName": {"type": "string",
                                                           "pattern": "^[a-z0-9-]+$"},
                                     "gatewayPort": {"type": "integer", "minimum": 1,
                                                     "maximum": 65535},
                                     "mode": {"type": "string", "enum": ["mirror", "none"]},
                                     "selector": {"type": "object",
                                                  "x-kubernetes-preserve-unknown-fields": True},
                                 }},
                        "status": {"type": "object", "properties": {
                            "alive": {"type": "boolean"}}},
                    }}},
            }],
        },
    }


@pytest.fixture(scope="module")
def links(cluster: Cluster) -> str:
    client.ApiextensionsV1Api(cluster.api()).create_custom_resource_definition(_crd())
    return GROUP


def _ns(cluster: Cluster) -> str:
    name = f"c-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(cluster.api()).create_namespace({"metadata": {"name": name}})
    return name


def _link(name: str, **spec: object) -> dict[str, object]:
    return {"apiVersion": f"{GROUP}/v1alpha1", "kind": "Link", "metadata": {"name": name},
            "spec": {"targetClusterName": "west", **spec}}


def test_crd_is_established_and_discoverable(cluster: Cluster, links: str) -> None:
    api = cluster.api()
    crd = client.ApiextensionsV1Api(api).read_custom_resource_definition(f"links.{GROUP}")
    conditions = {c.type: c.status for c in crd.status.conditions}
    assert conditions == {"NamesAccepted": "True", "Established": "True"}
    resources = client.CustomObjectsApi(api).get_api_resources(GROUP, "v1alpha1")
    names = {r.name for r in resources.resources}
    assert names == {"links", "links/status"}


def test_custom_resource_crud(cluster: Cluster, links: str) -> None:
    co = client.CustomObjectsApi(cluster.api())
    ns = _ns(cluster)
    created = co.create_namespaced_custom_object(GROUP, "v1alpha1", ns, "links",
                                                 _link("west", gatewayPort=4143,
                                                       selector={"any": {"thing": 1}}))
    assert created["metadata"]["generation"] == 1
    assert created["spec"]["selector"] == {"any": {"thing": 1}}
    patched = co.patch_namespaced_custom_object(
        GROUP, "v1alpha1", ns, "links", "west", {"spec": {"gatewayPort": 4144}},
        _content_type="application/merge-patch+json")
    assert patched["spec"]["gatewayPort"] == 4144 and patched["metadata"]["generation"] == 2
    status = co.patch_namespaced_custom_object_status(
        GROUP, "v1alpha1", ns, "links", "west", {"status": {"alive": True}},
        _content_type="application/merge-patch+json")
    assert status["status"] == {"alive": True} and status["metadata"]["generation"] == 2
    listed = co.list_namespaced_custom_object(GROUP, "v1alpha1", ns, "links")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["west"]
    co.delete_namespaced_custom_object(GROUP, "v1alpha1", ns, "links", "west")
    assert co.list_namespaced_custom_object(GROUP, "v1alpha1", ns, "links")["items"] == []


def test_custom_resource_schema_violations_are_422(cluster: Cluster, links: str) -> None:
    co = client.CustomObjectsApi(cluster.api())
    ns = _ns(cluster)
    bad = _link("bad", gatewayPort="many", mode="bridge")
    bad["spec"].pop("targetClusterName")  # type: ignore[attr-defined]
    with pytest.raises(ApiException) as e:
        co.create_namespaced_custom_object(GROUP, "v1alpha1", ns, "links", bad)
    assert e.value.status == 422
    status = json.loads(e.value.body)
    fields = {c["field"] for c in status["details"]["causes"]}
    assert fields == {"spec.gatewayPort", "spec.mode", "spec.targetClusterName"}
    assert co.list_namespaced_custom_object(GROUP, "v1alpha1", ns, "links")["items"] == []

    with pytest.raises(ApiException) as e:
        co.create_namespaced_custom_object(GROUP, "v1alpha1", ns, "links",
                                           _link("Bad_Name"))
    assert e.value.status == 422 and "metadata.name" in e.value.body


def test_unknown_fields_pruned_or_refused(cluster: Cluster, links: str) -> None:
    co = client.CustomObjectsApi(cluster.api())
    ns = _ns(cluster)
    obj = _link("extra", surprise="x")
    with pytest.raises(ApiException) as e:
        co.create_namespaced_custom_object(GROUP, "v1alpha1", ns, "links", obj,
                                           field_validation="Strict")
    assert e.value.status == 400
    assert 'unknown field "spec.surprise"' in json.loads(e.value.body)["message"]
    created = co.create_namespaced_custom_object(GROUP, "v1alpha1", ns, "links", obj)
    assert "surprise" not in created["spec"]


def test_strategic_merge_patch_on_custom_resource_is_415(cluster: Cluster, links: str) -> None:
    ns = _ns(cluster)
    client.CustomObjectsApi(cluster.api()).create_namespaced_custom_object(
        GROUP, "v1alpha1", ns, "links", _link("w"))
    status, body = cluster.raw(
        "PATCH", f"/apis/{GROUP}/v1alpha1/namespaces/{ns}/links/w", b'{"spec":{}}',
        content_type="application/strategic-merge-patch+json")
    assert status == 415 and body["reason"] == "UnsupportedMediaType"


def test_deleting_crd_removes_resources(cluster: Cluster) -> None:
    ext = client.ApiextensionsV1Api(cluster.api())
    co = client.CustomObjectsApi(cluster.api())
    ext.create_custom_resource_definition(_crd("gateways", "Gateway"))
    ns = _ns(cluster)
    co.create_namespaced_custom_object(GROUP, "v1alpha1", ns, "gateways", {
        "apiVersion": f"{GROUP}/v1alpha1", "kind": "Gateway", "metadata": {"name": "g"},
        "spec": {"targetClusterName": "east"}})
    ext.delete_custom_resource_definition(f"gateways.{GROUP}")
    status, _ = cluster.raw("GET", f"/apis/{GROUP}/v1alpha1/namespaces/{ns}/gateways")
    assert status == 404
    ext.create_custom_resource_definition(_crd("gateways", "Gateway"))
    assert co.list_namespaced_custom_object(GROUP, "v1alpha1", ns, "gateways")["items"] == []


def test_invalid_crd_is_422(cluster: Cluster) -> None:
    bad = _crd("widgets", "Widget")
    bad["metadata"] = {"name": "wrong.example.com"}
    with pytest.raises(ApiException) as e:
        client.ApiextensionsV1Api(cluster.api()).create_custom_resource_definition(bad)
    assert e.value.status == 422 and "metadata.name" in e.value.body
