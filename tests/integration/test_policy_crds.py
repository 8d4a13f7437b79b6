"""The policy.meshgate.io CRDs in the embedded API server: installed by
`install_crds`, used with kubectl, enforced by schema, and read back by the index."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from mesh.authz import AccessPolicy
from mesh.control.crds import crd_documents, install_crds
from mesh.control.policy import ADDED, GROUP, PLURALS, VERSION, PolicyIndex
from tests.cluster import Cluster

TD = "cluster.local"
CLIENT = f"web-client.{{ns}}.serviceaccount.identity.meshgate.{TD}"

EXAMPLES = """\
apiVersion: policy.meshgate.io/v1alpha1
kind: Server
metadata:
  name: web-http
spec:
  podSelector:
    matchLabels:
      app: web
  port: http
  proxyProtocol: HTTP/1
---
apiVersion: policy.meshgate.io/v1alpha1
kind: Server
metadata:
  name: web-metrics
spec:
  podSelector:
    matchExpressions:
      - {key: app, operator: In, values: [web, api]}
      - {key: canary, operator: DoesNotExist}
  port: 9990
  accessPolicy: all-authenticated
---
apiVersion: policy.meshgate.io/v1alpha1
kind: MeshTLSAuthentication
metadata:
  name: web-clients
spec:
  identities:
    - "*.prod.serviceaccount.identity.meshgate.cluster.local"
  identityRefs:
    - kind: ServiceAccount
      name: web-client
---
apiVersion: policy.meshgate.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: web-http-clients
spec:
  targetRef:
    group: policy.meshgate.io
    kind: Server
    name: web-http
  requiredAuthenticationRefs:
    - group: policy.meshgate.io
      kind: MeshTLSAuthentication
      name: web-clients
---
apiVersion: policy.meshgate.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: monitoring
spec:
  targetRef:
    kind: Namespace
    name: {ns}
  requiredAuthenticationRefs:
    - kind: ServiceAccount
      name: prometheus
      namespace: monitoring
"""


@pytest.fixture(scope="module")
def installed(cluster: Cluster) -> dict[str, str]:
    return install_crds(cluster.api())


def _namespace(cluster: Cluster) -> str:
    name = f"p-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(cluster.api()).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    return name


def _table(text: str) -> list[list[str]]:
    """kubectl's columns, split on runs of two or more spaces."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.strip().splitlines()]


def test_install_creates_then_changes_nothing(cluster: Cluster, installed: dict[str, str]) -> None:
    names = [doc["metadata"]["name"] for doc in crd_documents()]
    assert installed == {name: "created" for name in names}
    assert install_crds(cluster.api()) == {name: "unchanged" for name in names}
    resources = client.CustomObjectsApi(cluster.api()).get_api_resources(GROUP, VERSION)
    assert {r.name for r in resources.resources} == {
        *PLURALS.values(), *(f"{plural}/status" for plural in PLURALS.values())}


def test_install_restores_a_changed_crd(cluster: Cluster, installed: dict[str, str]) -> None:
    name = f"servers.{GROUP}"
    path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
    status, crd = cluster.raw("GET", path)
    assert status == 200
    crd["spec"]["versions"][0]["additionalPrinterColumns"] = []
    status, _ = cluster.raw("PUT", path, json.dumps(crd).encode())
    assert status == 200
    assert install_crds(cluster.api())[name] == "updated"
    _, crd = cluster.raw("GET", path)
    columns = [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns == ["Port", "Protocol", "Access Policy", "Age"]


def test_kubectl_applies_examples_and_prints_columns(cluster: Cluster,
                                                    installed: dict[str, str]) -> None:
    ns = _namespace(cluster)
    manifest = EXAMPLES.replace("{ns}", ns)
    out = cluster.kubectl("apply", "-n", ns, "-f", "-", input=manifest).stdout
    assert sorted(out.splitlines()) == sorted([
        "server.policy.meshgate.io/web-http created",
        "server.policy.meshgate.io/web-metrics created",
        "meshtlsauthentication.policy.meshgate.io/web-clients created",
        "authorizationpolicy.policy.meshgate.io/web-http-clients created",
        "authorizationpolicy.policy.meshgate.io/monitoring created"])
    again = cluster.kubectl("apply", "-n", ns, "-f", "-", input=manifest).stdout
    assert all(line.endswith(" unchanged") for line in again.splitlines())

    rows = _table(cluster.kubectl("get", "servers", "-n", ns).stdout)
    assert rows[0] == ["NAME", "PORT", "PROTOCOL", "ACCESS POLICY", "AGE"]
    assert [row[:4] for row in rows[1:]] == [
        ["web-http", "http", "HTTP/1", "deny"],
        ["web-metrics", "9990", "unknown", "all-authenticated"]]
    rows = _table(cluster.kubectl("get", "authorizationpolicies", "-n", ns).stdout)
    assert rows[0] == ["NAME", "TARGET KIND", "TARGET", "AGE"]
    assert [row[:3] for row in rows[1:]] == [["monitoring", "Namespace", ns],
                                            ["web-http-clients", "Server", "web-http"]]
    rows = _table(cluster.kubectl("get", "meshtlsauthentications", "-n", ns).stdout)
    assert rows[0] == ["NAME", "IDENTITIES", "AGE"]


def test_objects_from_the_api_feed_the_index(cluster: Cluster,
                                             installed: dict[str, str]) -> None:
    ns = _namespace(cluster)
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=EXAMPLES.replace("{ns}", ns))
    co = client.CustomObjectsApi(cluster.api())
    idx = PolicyIndex(TD, default_policy=AccessPolicy.DENY)
    for kind, plural in PLURALS.items():
        listed: Any = co.list_namespaced_custom_object(GROUP, VERSION, ns, plural)
        for obj in listed["items"]:
            idx.apply(kind, ADDED, obj)
    assert idx.invalid == [] and idx.problems() == []

    web = {"app": "web"}
    http = idx.for_port(ns, web, 8080, port_names={"http": 8080})
    assert http.server == f"{ns}/web-http"
    client_id = CLIENT.replace("{ns}", ns)
    assert http.allows(client_id).allowed
    assert http.allows(f"batch.prod.serviceaccount.identity.meshgate.{TD}").allowed
    prometheus = f"prometheus.monitoring.serviceaccount.identity.meshgate.{TD}"
    assert http.allows(prometheus).reason == (
        f"allowed: AuthorizationPolicy {ns}/monitoring on Server {ns}/web-http authorizes "
        f"{prometheus}")
    assert not http.allows(f"other.{ns}.serviceaccount.identity.meshgate.{TD}").allowed
    assert not http.allows(None).allowed

    metrics = idx.for_port(ns, web, 9990)
    assert metrics.access is AccessPolicy.ALL_AUTHENTICATED
    assert metrics.allows(client_id).allowed and not metrics.allows(None).allowed
    assert idx.for_port(ns, {**web, "canary": "1"}, 9990).server is None


def _bad(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name},
            "spec": spec}


_SELECTOR = {"matchLabels": {"app": "web"}}


@pytest.mark.parametrize(("obj", "fields"), [
    (_bad("Server", "port-too-big", {"podSelector": _SELECTOR, "port": 70000}), {"spec.port"}),
    (_bad("Server", "port-number-as-name", {"podSelector": _SELECTOR, "port": "80"}),
     {"spec.port"}),
    (_bad("Server", "bad-protocol", {"podSelector": _SELECTOR, "port": 80,
                                     "proxyProtocol": "HTTP/3"}), {"spec.proxyProtocol"}),
    (_bad("Server", "no-selector", {"port": 80, "accessPolicy": "allow"}),
     {"spec", "spec.accessPolicy"}),
    (_bad("Server", "two-selectors", {"podSelector": _SELECTOR, "port": 80,
                                      "externalWorkloadSelector": _SELECTOR}), {"spec"}),
    (_bad("MeshTLSAuthentication", "nobody", {}), {"spec"}),
    (_bad("MeshTLSAuthentication", "bad-identity", {"identities": ["Web.*"]}),
     {"spec.identities[0]"}),
    (_bad("AuthorizationPolicy", "no-target", {"requiredAuthenticationRefs": []}),
     {"spec.targetRef"}),
    (_bad("AuthorizationPolicy", "network-authn", {
        "targetRef": {"group": GROUP, "kind": "Server", "name": "web"},
        "requiredAuthenticationRefs": [{"kind": "NetworkAuthentication", "name": "x"}]}),
     {"spec.requiredAuthenticationRefs[0].kind"}),
])
def test_invalid_resources_are_422_naming_the_field(cluster: Cluster, installed: dict[str, str],
                                                    obj: dict[str, Any],
                                                    fields: set[str]) -> None:
    ns = _namespace(cluster)
    plural = {"Server": "servers", "MeshTLSAuthentication": "meshtlsauthentications",
              "AuthorizationPolicy": "authorizationpolicies"}[obj["kind"]]
    co = client.CustomObjectsApi(cluster.api())
    with pytest.raises(ApiException) as e:
        co.create_namespaced_custom_object(GROUP, VERSION, ns, plural, obj)
    assert e.value.status == 422
    status = json.loads(e.value.body or "{}")
    assert status["reason"] == "Invalid"
    assert {c["field"] for c in status["details"]["causes"]} == fields
    listed: Any = co.list_namespaced_custom_object(GROUP, VERSION, ns, plural)
    assert listed["items"] == []


def test_kubectl_reports_the_invalid_field(cluster: Cluster, installed: dict[str, str]) -> None:
    ns = _namespace(cluster)
    bad = _bad("Server", "web", {"podSelector": _SELECTOR, "port": 70000})
    proc = cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(bad), check=False)
    assert proc.returncode != 0
    assert 'The Server "web" is invalid' in proc.stderr
    assert "spec.port" in proc.stderr and "65535" in proc.stderr
