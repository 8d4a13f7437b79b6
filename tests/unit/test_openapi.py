"""/openapi/v3 documents: what kubectl create, apply and explain look for in them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from localcluster.crd import resource_types
from localcluster.openapi import (
    document_hash,
    group_version_of,
    openapi_document,
    openapi_index,
    openapi_path,
    schema_name,
)
from localcluster.resources import BUILTIN, ResourceType

LINK_CRD: dict[str, Any] = {
    "metadata": {"name": "links.multicluster.meshgate.io"},
    "spec": {
        "group": "multicluster.meshgate.io", "scope": "Namespaced",
        "names": {"plural": "links", "kind": "Link"},
        "versions": [{"name": "v1alpha1", "served": True, "storage": True,
                      "subresources": {"status": {}},
                      "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                          "metadata": {"type": "object", "properties": {
                              "name": {"type": "string", "maxLength": 30}}},
                          "spec": {"type": "object", "properties": {
                              "targetClusterName": {"type": "string"}}}}}}}],
    },
}
LINKS = resource_types(LINK_CRD)
GROUP_VERSIONS = sorted({r.group_version for r in BUILTIN})
OPERATIONS = ("get", "put", "post", "delete", "patch")


def has_query_param(op: dict[str, Any], name: str) -> bool:
    return any(p["name"] == name and p["in"] == "query" for p in op.get("parameters", []))


def kubectl_supports_field_validation(doc: dict[str, Any], gvk: dict[str, str]) -> bool:
    """kubectl's supportsQueryParamV3: the first patch for the GVK must take fieldValidation."""
    for item in doc["paths"].values():
        op = item.get("patch")
        if op is None or op.get("x-kubernetes-group-version-kind") != gvk:
            continue
        return has_query_param(op, "fieldValidation")
    return False


def resolve(doc: dict[str, Any], ref: str) -> dict[str, Any]:
    assert ref.startswith("#/components/schemas/")
    result: dict[str, Any] = doc["components"]["schemas"][ref.removeprefix("#/components/schemas/")]
    return result


def all_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in all_refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in all_refs(v)]
    return []


def test_index_lists_every_group_version_with_its_hash() -> None:
    index = openapi_index(["v1", "discovery.k8s.io/v1"],
                          {"v1": "AB12", "discovery.k8s.io/v1": "CD34"})
    assert index == {"paths": {
        "api/v1": {"serverRelativeURL": "/openapi/v3/api/v1?hash=AB12"},
        "apis/discovery.k8s.io/v1": {
            "serverRelativeURL": "/openapi/v3/apis/discovery.k8s.io/v1?hash=CD34"},
    }}


def test_paths_and_group_versions_round_trip() -> None:
    for gv in [*GROUP_VERSIONS, "multicluster.meshgate.io/v1alpha1"]:
        assert group_version_of(openapi_path(gv)) == gv
        assert group_version_of(f"/openapi/v3/{openapi_path(gv)}") == gv
    assert group_version_of("apis/only-group") is None
    assert group_version_of("api/v2") is None


def test_hash_is_stable_and_content_sensitive() -> None:
    doc = openapi_document("v1", BUILTIN)
    same = json.loads(json.dumps(doc))
    assert document_hash(doc) == document_hash(same)
    assert len(document_hash(doc)) == 128 and document_hash(doc).isupper() is True
    same["info"]["version"] = "other"
    assert document_hash(doc) != document_hash(same)


def test_schema_names_follow_kube() -> None:
    by_kind = {r.kind: r for r in reversed(BUILTIN)}  # the first of a kind: core/v1 Event
    assert schema_name(by_kind["Service"]) == "io.k8s.api.core.v1.Service"
    assert schema_name(by_kind["Event"]) == "io.k8s.api.core.v1.Event"
    (events_v1,) = [r for r in BUILTIN if r.group == "events.k8s.io"]
    assert schema_name(events_v1) == "io.k8s.api.events.v1.Event"
    assert schema_name(by_kind["EndpointSlice"]) == "io.k8s.api.discovery.v1.EndpointSlice"
    assert schema_name(by_kind["ClusterRole"]) == "io.k8s.api.rbac.v1.ClusterRole"
    assert schema_name(by_kind["CustomResourceDefinition"]) == \
        "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.CustomResourceDefinition"
    assert schema_name(LINKS[0]) == "io.meshgate.multicluster.v1alpha1.Link"


def _cases() -> list[tuple[str, ResourceType]]:
    return [(r.group_version, r) for r in (*BUILTIN, *LINKS)]


@pytest.mark.parametrize(("group_version", "resource"), _cases(),
                         ids=[r.kind for _, r in _cases()])
def test_each_kind_has_what_kubectl_needs(group_version: str, resource: ResourceType) -> None:
    doc = openapi_document(group_version, [*BUILTIN, *LINKS])
    gvk = {"group": resource.group, "version": resource.version, "kind": resource.kind}
    mutating = [(path, method, item[method]) for path, item in doc["paths"].items()
                for method in ("post", "put", "patch") if method in item
                and item[method]["x-kubernetes-group-version-kind"] == gvk]
    assert mutating, "no mutating operation"
    for path, method, op in mutating:
        assert op["x-kubernetes-action"] == method, path
        for param in ("fieldValidation", "dryRun", "fieldManager"):
            assert has_query_param(op, param), (path, method, param)
        body = op["requestBody"]["content"]
        assert all("$ref" in media["schema"] for media in body.values())
    if "patch" in resource.verbs:
        assert kubectl_supports_field_validation(doc, gvk)
    component = doc["components"]["schemas"][schema_name(resource)]
    assert component["x-kubernetes-group-version-kind"] == [gvk]
    assert {"apiVersion", "kind", "metadata"} <= set(component["properties"])


def test_every_ref_resolves_and_documents_are_json() -> None:
    for gv in [*GROUP_VERSIONS, LINKS[0].group_version]:
        doc = openapi_document(gv, [*BUILTIN, *LINKS])
        assert doc["openapi"].startswith("3.0")
        json.dumps(doc)
        for ref in all_refs(doc):
            assert resolve(doc, ref)


def test_namespaced_paths() -> None:
    doc = openapi_document("v1", BUILTIN)
    collection = doc["paths"]["/api/v1/namespaces/{namespace}/services"]
    item = doc["paths"]["/api/v1/namespaces/{namespace}/services/{name}"]
    assert set(collection) >= {"get", "post", "delete", "parameters"}
    assert set(item) >= {"get", "put", "patch", "delete", "parameters"}
    assert collection["get"]["x-kubernetes-action"] == "list"
    assert collection["delete"]["x-kubernetes-action"] == "deletecollection"
    assert item["get"]["x-kubernetes-action"] == "get"
    assert item["put"]["operationId"] == "replaceCoreV1NamespacedService"
    assert [p["name"] for p in item["parameters"] if p["in"] == "path"] == ["name", "namespace"]
    assert collection["post"]["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/io.k8s.api.core.v1.Service"}
    assert resolve(doc, collection["get"]["responses"]["200"]["content"]["application/json"]
                   ["schema"]["$ref"])["properties"]["items"]["items"] == {
        "$ref": "#/components/schemas/io.k8s.api.core.v1.Service"}
    assert "get" in doc["paths"]["/api/v1/services"]  # list across namespaces
    status = doc["paths"]["/api/v1/namespaces/{namespace}/services/{name}/status"]
    assert set(status) == {"get", "put", "patch", "parameters"}


def test_cluster_scoped_paths_have_no_namespace() -> None:
    doc = openapi_document("rbac.authorization.k8s.io/v1", BUILTIN)
    assert "/apis/rbac.authorization.k8s.io/v1/clusterroles/{name}" in doc["paths"]
    assert "/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles/{name}" in doc["paths"]
    cluster = [p for p in doc["paths"] if "/clusterroles" in p]
    assert cluster and all("{namespace}" not in p for p in cluster)


def test_create_only_kinds_have_only_post() -> None:
    doc = openapi_document("authentication.k8s.io/v1", BUILTIN)
    assert sorted(doc["paths"]) == ["/apis/authentication.k8s.io/v1/selfsubjectreviews",
                                    "/apis/authentication.k8s.io/v1/tokenreviews"]
    assert all(set(ops) == {"post", "parameters"} for ops in doc["paths"].values())


def test_patch_types_strategic_merge_only_for_builtins() -> None:
    core = openapi_document("v1", BUILTIN)
    patch = core["paths"]["/api/v1/namespaces/{namespace}/pods/{name}"]["patch"]
    assert "application/strategic-merge-patch+json" in patch["requestBody"]["content"]
    assert "application/merge-patch+json" in patch["requestBody"]["content"]
    custom = openapi_document(LINKS[0].group_version, LINKS)
    patch = custom["paths"][
        "/apis/multicluster.meshgate.io/v1alpha1/namespaces/{namespace}/links/{name}"]["patch"]
    assert "application/strategic-merge-patch+json" not in patch["requestBody"]["content"]
    assert "application/merge-patch+json" in patch["requestBody"]["content"]
    assert patch["operationId"] == "patchMulticlusterMeshgateIoV1alpha1NamespacedLink"


def test_components_carry_patch_extensions_for_apply() -> None:
    doc = openapi_document("v1", BUILTIN)
    pod = doc["components"]["schemas"]["io.k8s.api.core.v1.Pod"]
    containers = pod["properties"]["spec"]["properties"]["containers"]
    assert containers["x-kubernetes-patch-merge-key"] == "name"
    assert containers["x-kubernetes-patch-strategy"] == "merge"
    assert doc["components"]["schemas"]["io.k8s.api.core.v1.PodList"][
        "x-kubernetes-group-version-kind"] == [{"group": "", "version": "v1", "kind": "PodList"}]


def test_custom_resource_component_adds_the_envelope() -> None:
    doc = openapi_document(LINKS[0].group_version, LINKS)
    link = doc["components"]["schemas"]["io.meshgate.multicluster.v1alpha1.Link"]
    assert link["properties"]["apiVersion"]["type"] == "string"
    assert link["properties"]["kind"]["type"] == "string"
    meta = link["properties"]["metadata"]["properties"]
    assert meta["name"] == {"type": "string", "maxLength": 30}
    assert "labels" in meta
    assert link["properties"]["spec"]["properties"]["targetClusterName"] == {"type": "string"}
    assert LINKS[0].schema is not None and "apiVersion" not in LINKS[0].schema["properties"]


def test_documents_only_hold_their_group_version() -> None:
    doc = openapi_document("discovery.k8s.io/v1", BUILTIN)
    assert all(p.startswith("/apis/discovery.k8s.io/v1/") for p in doc["paths"])
    kinds = {gvk["kind"] for schema in doc["components"]["schemas"].values()
             for gvk in schema.get("x-kubernetes-group-version-kind", [])}
    assert kinds == {"EndpointSlice", "EndpointSliceList", "Status"}


def test_builtin_schemas_are_not_mutated_by_documents() -> None:
    from localcluster.schema import builtin_schema

    openapi_document("v1", BUILTIN)
    assert "x-kubernetes-group-version-kind" not in builtin_schema("V1Service")
    assert "x-kubernetes-group-version-kind" not in builtin_schema("V1Status")
