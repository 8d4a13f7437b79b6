"""Server-side apply, managedFields and /openapi/v2, with kubectl and the official client."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import yaml
from kubernetes import client, dynamic
from kubernetes.client.exceptions import ApiException

from tests.cluster import Cluster, wait_for
from tests.integration.test_apiserver_every_kind import SAMPLES, _crd

APPLY = "application/apply-patch+yaml"


def _ns(cluster: Cluster) -> str:
    ns = f"ssa-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", ns)
    return ns


def _cm(ns: str, data: dict[str, str], name: str = "conf") -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap",
                           "metadata": {"name": name, "namespace": ns}, "data": data})


def _managers(cluster: Cluster, ns: str, name: str = "conf") -> dict[str, dict[str, Any]]:
    obj = yaml.safe_load(cluster.kubectl("get", "configmap", name, "-n", ns, "-o", "yaml",
                                         "--show-managed-fields").stdout)
    return {f"{m['manager']}/{m['operation']}": m for m in obj["metadata"]["managedFields"]}


def test_server_side_apply_creates_updates_and_removes(cluster: Cluster) -> None:
    ns = _ns(cluster)
    out = cluster.kubectl("apply", "--server-side", "-f", "-",
                          input=_cm(ns, {"keep": "1", "drop": "2"}))
    assert out.stdout.strip() == "configmap/conf serverside-applied"
    entry = _managers(cluster, ns)["kubectl/Apply"]
    assert entry["apiVersion"] == "v1" and entry["fieldsType"] == "FieldsV1" and entry["time"]
    assert entry["fieldsV1"] == {"f:data": {"f:drop": {}, "f:keep": {}}}
    # without --show-managed-fields kubectl hides them, as against kube
    plain = yaml.safe_load(cluster.kubectl("get", "configmap", "conf", "-n", ns, "-o",
                                           "yaml").stdout)
    assert "managedFields" not in plain["metadata"]

    cluster.kubectl("apply", "--server-side", "-f", "-", input=_cm(ns, {"keep": "1"}))
    data = json.loads(cluster.kubectl("get", "configmap", "conf", "-n", ns, "-o",
                                      "jsonpath={.data}").stdout)
    assert data == {"keep": "1"}
    assert _managers(cluster, ns)["kubectl/Apply"]["fieldsV1"] == {"f:data": {"f:keep": {}}}

    # other kubectl commands are recorded as Update managers named after the command
    cluster.kubectl("label", "configmap", "conf", "-n", ns, "team=mesh")
    labeled = _managers(cluster, ns)["kubectl-label/Update"]
    assert labeled["fieldsV1"] == {"f:metadata": {"f:labels": {".": {}, "f:team": {}}}}
    assert labeled["apiVersion"] == "v1"


def test_conflict_with_client_side_apply_then_force(cluster: Cluster) -> None:
    ns = _ns(cluster)
    cluster.kubectl("apply", "-f", "-", input=_cm(ns, {"key": "a"}))
    csa = _managers(cluster, ns)["kubectl-client-side-apply/Update"]
    assert csa["fieldsV1"]["f:data"] == {".": {}, "f:key": {}}

    refused = cluster.kubectl("apply", "--server-side", "--field-manager=other", "-f", "-",
                              input=_cm(ns, {"key": "b"}), check=False)
    assert refused.returncode == 1
    assert refused.stderr.startswith(
        'error: Apply failed with 1 conflict: conflict with "kubectl-client-side-apply" '
        'using v1: .data.key\n')
    assert "--force-conflicts" in refused.stderr

    cluster.kubectl("apply", "--server-side", "--field-manager=other", "--force-conflicts",
                    "-f", "-", input=_cm(ns, {"key": "b"}))
    managers = _managers(cluster, ns)
    assert managers["other/Apply"]["fieldsV1"] == {"f:data": {"f:key": {}}}
    # nobody else owns the field now (kubectl also moves what its client-side apply
    # owned to the applying manager)
    assert [m for m, e in managers.items()
            if "f:key" in e["fieldsV1"].get("f:data", {})] == ["other/Apply"]


def test_client_side_apply_then_server_side_apply_migrates(cluster: Cluster) -> None:
    ns = _ns(cluster)
    cluster.kubectl("apply", "-f", "-", input=_cm(ns, {"key": "a", "old": "x"}))
    # kubectl's upgrade: the fields of the last client-side apply become its own, so a
    # changed value is no conflict and a field left out is removed.
    cluster.kubectl("apply", "--server-side", "-f", "-", input=_cm(ns, {"key": "b"}))
    obj = yaml.safe_load(cluster.kubectl("get", "configmap", "conf", "-n", ns, "-o",
                                         "yaml", "--show-managed-fields").stdout)
    assert obj["data"] == {"key": "b"}
    owners = {m["manager"] for m in obj["metadata"]["managedFields"]}
    assert "kubectl-client-side-apply" not in owners
    last = json.loads(obj["metadata"]["annotations"][
        "kubectl.kubernetes.io/last-applied-configuration"])
    assert last["data"] == {"key": "b"}
    # and a client-side apply afterwards still works from that annotation
    out = cluster.kubectl("apply", "-f", "-", input=_cm(ns, {"key": "c"}))
    assert "configured" in out.stdout


def test_server_side_apply_of_a_service_merges_ports_by_key(cluster: Cluster) -> None:
    ns = _ns(cluster)
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": ns},
           "spec": {"selector": {"app": "web"},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                              {"name": "metrics", "port": 9090}]}}
    cluster.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump(svc))
    del svc["spec"]["ports"][1]
    cluster.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump(svc))
    live = yaml.safe_load(cluster.kubectl("get", "service", "web", "-n", ns, "-o", "yaml",
                                          "--show-managed-fields").stdout)
    assert [p["port"] for p in live["spec"]["ports"]] == [80]
    assert live["spec"]["clusterIP"]  # what the server allocated stays
    [entry] = [m for m in live["metadata"]["managedFields"] if m["manager"] == "kubectl"]
    assert list(entry["fieldsV1"]["f:spec"]["f:ports"]) == ['k:{"port":80,"protocol":"TCP"}']


def test_server_side_apply_of_a_custom_resource(cluster: Cluster) -> None:
    crd = """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: gadgets.example.meshgate.io}
spec:
  group: example.meshgate.io
  scope: Namespaced
  names: {plural: gadgets, singular: gadget, kind: Gadget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer}
              mode: {type: string, default: auto}
              tags: {type: array, items: {type: string}, x-kubernetes-list-type: set}
"""
    cluster.kubectl("apply", "--server-side", "-f", "-", input=crd)
    ns = _ns(cluster)
    gadget = (f"apiVersion: example.meshgate.io/v1\nkind: Gadget\nmetadata: {{name: g, "
              f"namespace: {ns}}}\nspec: {{size: 1, tags: [a]}}\n")
    wait_for(lambda: cluster.kubectl("apply", "--server-side", "-f", "-", input=gadget,
                                     check=False).returncode == 0, what="gadget applied")
    other = gadget.replace("size: 1, tags: [a]", "tags: [b]")
    cluster.kubectl("apply", "--server-side", "--field-manager=tagger", "-f", "-", input=other)
    live = yaml.safe_load(cluster.kubectl("get", "gadget", "g", "-n", ns, "-o", "yaml",
                                          "--show-managed-fields").stdout)
    assert live["spec"] == {"mode": "auto", "size": 1, "tags": ["a", "b"]}
    owned = {m["manager"]: m["fieldsV1"] for m in live["metadata"]["managedFields"]}
    assert owned["tagger"] == {"f:spec": {"f:tags": {'v:"b"': {}}}}
    # a default the schema filled in belongs to nobody
    assert owned["kubectl"] == {"f:spec": {"f:size": {}, "f:tags": {'v:"a"': {}}}}


def test_apply_of_an_unknown_kind_says_no_matches(cluster: Cluster) -> None:
    for args in (("apply",), ("apply", "--server-side"), ("create",)):
        out = cluster.kubectl(*args, "-f", "-", check=False,
                              input="apiVersion: example.com/v1\nkind: Nothing\n"
                                    "metadata: {name: x}\n")
        assert out.returncode == 1
        assert out.stderr == ('error: resource mapping not found for name: "x" namespace: "" '
                              'from "STDIN": no matches for kind "Nothing" in version '
                              '"example.com/v1"\nensure CRDs are installed first\n')


def test_explain_reads_openapi_v2_and_v3(cluster: Cluster) -> None:
    v3 = cluster.kubectl("explain", "services.spec.ports.port").stdout
    v2 = cluster.kubectl("explain", "services.spec.ports.port",
                         "--output=plaintext-openapiv2").stdout
    for out in (v3, v2):
        assert "KIND:" in out and "Service" in out and "port" in out


def test_openapi_v2_negotiation(cluster: Cluster) -> None:
    status, doc = cluster.raw("GET", "/openapi/v2")
    assert status == 200 and doc["swagger"] == "2.0"
    svc = doc["definitions"]["io.k8s.api.core.v1.Service"]
    assert svc["x-kubernetes-group-version-kind"] == [
        {"group": "", "version": "v1", "kind": "Service"}]
    ports = svc["properties"]["spec"]["properties"]["ports"]
    assert ports["x-kubernetes-patch-merge-key"] == "port"
    _, index = cluster.raw("GET", "/openapi/v3")
    assert "apis/apiextensions.k8s.io/v1" in index["paths"]
    assert "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.CustomResourceDefinition" \
        in doc["definitions"]


def test_official_client_applies_and_records_its_manager(cluster: Cluster) -> None:
    ns = _ns(cluster)
    core = client.CoreV1Api(cluster.api())
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "conf"},
            "data": {"a": "1"}}
    with pytest.raises(ApiException) as err:
        core.patch_namespaced_config_map("conf", ns, body, _content_type=APPLY)
    assert err.value.status == 422
    assert json.loads(err.value.body)["message"] == (
        'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is required '
        'for apply patch')

    created = core.patch_namespaced_config_map("conf", ns, body, field_manager="tool",
                                               _content_type=APPLY)
    assert created.data == {"a": "1"}
    [entry] = created.metadata.managed_fields
    assert (entry.manager, entry.operation) == ("tool", "Apply")

    # an update without fieldManager is recorded under the client's User-Agent prefix
    created.data["a"] = "2"
    updated = core.replace_namespaced_config_map("conf", ns, created)
    owners = {(m.manager, m.operation) for m in updated.metadata.managed_fields}
    assert owners == {("OpenAPI-Generator", "Update")}

    with pytest.raises(ApiException) as err:
        core.patch_namespaced_config_map("conf", ns, {"data": {"a": "3"}}, field_manager="t",
                                         force=True)
    assert err.value.status == 422
    assert "force: Forbidden: may not be specified for non-apply patch" in err.value.body


def test_apply_bad_input(cluster: Cluster) -> None:
    ns = _ns(cluster)
    path = f"/api/v1/namespaces/{ns}/configmaps/conf?fieldManager=m"
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "other"}}, 400,
         "the name of the object (other) does not match the name on the URL (conf)"),
        ({"metadata": {"name": "conf"}}, 400, "apiVersion and kind must be set"),
        ({"apiVersion": "v1", "kind": "ConfigMap",
          "metadata": {"name": "conf", "managedFields": [{"manager": "x"}]}}, 400,
         "metadata.managedFields must be nil"),
    ]
    for body, code, message in cases:
        status, answer = cluster.raw("PATCH", path, json.dumps(body).encode(),
                                     content_type=APPLY)
        assert (status, answer["code"]) == (code, code), answer
        assert message in answer["message"]
    status, answer = cluster.raw("PATCH", path, b"{not yaml: [", content_type=APPLY)
    assert status == 400 and answer["reason"] == "BadRequest"
    status, answer = cluster.raw("PATCH", path + "&fieldValidation=Strict", json.dumps(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "conf"},
         "bogus": 1}).encode(), content_type=APPLY)
    assert status == 400 and 'unknown field "bogus"' in answer["message"]


def test_apply_to_the_status_subresource(cluster: Cluster) -> None:
    ns = _ns(cluster)
    core = client.CoreV1Api(cluster.api())
    spec = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "lb"},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}}
    core.patch_namespaced_service("lb", ns, spec, field_manager="deployer", _content_type=APPLY)
    status = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "lb"},
              "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.7"}]}}}
    out = core.patch_namespaced_service_status("lb", ns, status, field_manager="lb-controller",
                                               _content_type=APPLY)
    assert out.status.load_balancer.ingress[0].ip == "192.0.2.7"
    assert out.spec.ports[0].port == 80
    by_manager = {m.manager: m for m in out.metadata.managed_fields}
    assert by_manager["lb-controller"].subresource == "status"
    assert list(by_manager["lb-controller"].fields_v1) == ["f:status"]
    assert "f:status" not in by_manager["deployer"].fields_v1
    status, answer = cluster.raw("PATCH", f"/api/v1/namespaces/{ns}/serviceaccounts/default/"
                                 "token?fieldManager=m", b"{}", content_type=APPLY)
    assert status in (404, 405) and answer["kind"] == "Status"


@pytest.mark.parametrize(("api_version", "kind"), list(SAMPLES))
def test_every_kind_can_be_applied(cluster: Cluster, api_version: str, kind: str) -> None:
    dyn = dynamic.DynamicClient(cluster.api())
    res = dyn.resources.get(api_version=api_version, kind=kind)
    ns = _ns(cluster)
    suffix = uuid.uuid4().hex[:6]
    name = f"a{suffix}s.every.meshgate.io" if kind == "CustomResourceDefinition" else f"a{suffix}"
    spec = _crd(name) if kind == "CustomResourceDefinition" else SAMPLES[(api_version, kind)]
    if kind == "Secret":
        spec = {"data": {"k": "dg=="}}  # stringData is write-only: applied again, it is news
    body = {"apiVersion": api_version, "kind": kind, "metadata": {"name": name,
            "labels": {"applied": "yes"}}, **spec}
    where = {"namespace": ns} if res.namespaced else {}
    first = dyn.server_side_apply(res, body=body, field_manager="every", **where).to_dict()
    assert first["metadata"]["labels"] == {"applied": "yes"}
    entries = {(m["manager"], m["operation"]) for m in first["metadata"]["managedFields"]}
    assert ("every", "Apply") in entries
    again = dyn.server_side_apply(res, body=body, field_manager="every", force_conflicts=True,
                                  **where).to_dict()
    assert again["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    del body["metadata"]["labels"]
    dropped = dyn.server_side_apply(res, body=body, field_manager="every", **where).to_dict()
    assert "labels" not in dropped["metadata"]
    res.delete(name=name, **where)
