"""Watch-list (``sendInitialEvents=true``) as kube-apiserver 1.32+ serves it: the
current objects as ADDED, a bookmark annotated ``k8s.io/initial-events-end``,
then live changes; and kube's 422 for option combinations it refuses."""

from __future__ import annotations

import json
import ssl
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import pytest
from kubernetes import client, watch

from tests.cluster import Cluster

INITIAL_END = "k8s.io/initial-events-end"


def _ns(cluster: Cluster) -> str:
    name = f"wl-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(cluster.api()).create_namespace({"metadata": {"name": name}})
    return name


@contextmanager
def _stream(cluster: Cluster, path: str) -> Iterator[Iterator[dict[str, Any]]]:
    """The decoded events of one raw watch request, read one at a time as they come."""
    ctx = ssl.create_default_context(cafile=str(cluster.state_dir / "ca.crt"))
    req = urllib.request.Request(cluster.server + path)
    req.add_header("Authorization", f"Bearer {cluster.token}")
    with urllib.request.urlopen(req, context=ctx, timeout=15) as resp:
        yield (json.loads(line) for line in resp)


def _watchlist(ns: str, *, extra: str = "") -> str:
    return (f"/api/v1/namespaces/{ns}/configmaps?watch=true&sendInitialEvents=true"
            f"&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=10"
            f"&fieldSelector={quote('metadata.name!=kube-root-ca.crt')}{extra}")


@pytest.mark.parametrize("rv", ["", "0", "given"])
def test_initial_events_then_bookmark_then_live_changes(cluster: Cluster, rv: str) -> None:
    core = client.CoreV1Api(cluster.api())
    ns = _ns(cluster)
    for name in ("a", "b"):
        core.create_namespaced_config_map(ns, {"metadata": {"name": name}})
    version = core.list_namespaced_config_map(ns).metadata.resource_version
    query = f"&resourceVersion={version if rv == 'given' else rv}"
    with _stream(cluster, _watchlist(ns, extra=query)) as events:
        first = [next(events) for _ in range(3)]
        assert [(e["type"], e["object"]["metadata"].get("name")) for e in first] == [
            ("ADDED", "a"), ("ADDED", "b"), ("BOOKMARK", None)]
        mark = first[2]["object"]
        assert mark["kind"] == "ConfigMap" and mark["apiVersion"] == "v1"
        assert mark["metadata"]["annotations"] == {INITIAL_END: "true"}
        assert int(mark["metadata"]["resourceVersion"]) >= int(version)
        core.create_namespaced_config_map(ns, {"metadata": {"name": "c"}})
        core.delete_namespaced_config_map("a", ns)
        live = [next(events) for _ in range(2)]
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in live] == [
            ("ADDED", "c"), ("DELETED", "a")]
        assert int(live[0]["object"]["metadata"]["resourceVersion"]) > int(
            mark["metadata"]["resourceVersion"])


def test_empty_collection_gets_the_bookmark_then_periodic_ones(cluster: Cluster) -> None:
    ns = _ns(cluster)
    with _stream(cluster, _watchlist(ns)) as events:
        mark, periodic = next(events), next(events)  # the test cluster bookmarks every 0.5s
    assert mark["type"] == "BOOKMARK"
    assert mark["object"]["metadata"]["annotations"][INITIAL_END] == "true"
    assert periodic["type"] == "BOOKMARK"
    assert "annotations" not in periodic["object"]["metadata"]
    assert int(periodic["object"]["metadata"]["resourceVersion"]) >= int(
        mark["object"]["metadata"]["resourceVersion"])


def test_without_allow_bookmarks_no_initial_end_bookmark(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api())
    ns = _ns(cluster)
    core.create_namespaced_config_map(ns, {"metadata": {"name": "only"}})
    path = _watchlist(ns).replace("&allowWatchBookmarks=true", "").replace(
        "timeoutSeconds=10", "timeoutSeconds=1")
    with _stream(cluster, path) as events:
        seen = list(events)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in seen] == [("ADDED", "only")]


def test_send_initial_events_false_starts_from_now(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api())
    ns = _ns(cluster)
    core.create_namespaced_config_map(ns, {"metadata": {"name": "old"}})
    path = (_watchlist(ns).replace("sendInitialEvents=true", "sendInitialEvents=false")
            .replace("&allowWatchBookmarks=true", ""))
    with _stream(cluster, path) as events:
        core.create_namespaced_config_map(ns, {"metadata": {"name": "new"}})
        event = next(events)
    assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "new")


@pytest.mark.parametrize(("query", "message"), [
    ("watch=true&sendInitialEvents=true",
     'ListOptions.meta.k8s.io "" is invalid: resourceVersionMatch: Forbidden: '
     "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan"),
    ("watch=true&resourceVersionMatch=NotOlderThan",
     'ListOptions.meta.k8s.io "" is invalid: resourceVersionMatch: Forbidden: '
     "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided"),
    ("watch=true&sendInitialEvents=true&resourceVersionMatch=Exact",
     'ListOptions.meta.k8s.io "" is invalid: [resourceVersionMatch: Forbidden: '
     "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan, "
     'resourceVersionMatch: Unsupported value: "Exact": supported values: "NotOlderThan"]'),
    ("sendInitialEvents=true",
     'ListOptions.meta.k8s.io "" is invalid: sendInitialEvents: Forbidden: '
     "sendInitialEvents is forbidden for list"),
    ("resourceVersionMatch=NotOlderThan",
     'ListOptions.meta.k8s.io "" is invalid: resourceVersionMatch: Forbidden: '
     "resourceVersionMatch is forbidden unless resourceVersion is provided"),
    ("resourceVersion=0&resourceVersionMatch=Exact",
     'ListOptions.meta.k8s.io "" is invalid: resourceVersionMatch: Forbidden: '
     'resourceVersionMatch "exact" is forbidden for resourceVersion "0"'),
])
def test_refused_combinations(cluster: Cluster, query: str, message: str) -> None:
    status, body = cluster.raw("GET", f"/api/v1/namespaces/default/configmaps?{query}")
    assert status == 422
    assert body["reason"] == "Invalid"
    assert body["message"] == message
    assert body["details"]["kind"] == "ListOptions"
    assert body["details"]["group"] == "meta.k8s.io"


def test_bad_resource_version_is_400(cluster: Cluster) -> None:
    status, body = cluster.raw("GET", "/api/v1/namespaces/default/configmaps?watch=true"
                               "&sendInitialEvents=true&resourceVersionMatch=NotOlderThan"
                               "&resourceVersion=abc")
    assert status == 400
    assert body["message"] == "invalid resourceVersion 'abc'"


def test_bad_boolean_is_400(cluster: Cluster) -> None:
    status, body = cluster.raw("GET", "/api/v1/namespaces/default/configmaps?watch=true"
                               "&sendInitialEvents=maybe&resourceVersionMatch=NotOlderThan")
    assert status == 400
    assert "maybe" in body["message"]


def test_kubectl_wait_for_established_crd_returns_at_once(cluster: Cluster) -> None:
    group = f"w{uuid.uuid4().hex[:6]}.example.com"
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"gadgets.{group}"},
        "spec": {"group": group, "scope": "Namespaced",
                 "names": {"kind": "Gadget", "plural": "gadgets"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {
                     "openAPIV3Schema": {"type": "object",
                                         "x-kubernetes-preserve-unknown-fields": True}}}]}}))
    out = cluster.kubectl("wait", "--for=condition=Established", f"crd/gadgets.{group}",
                          "--timeout=5s", timeout=8)
    assert "condition met" in out.stdout


def test_kubectl_wait_for_delete_and_delete_namespace_return(cluster: Cluster) -> None:
    ns = _ns(cluster)
    out = cluster.kubectl("delete", "namespace", ns, "--timeout=5s", timeout=8)
    assert f'namespace "{ns}" deleted' in out.stdout
    other = _ns(cluster)
    cluster.kubectl("delete", "namespace", other, "--wait=false")
    cluster.kubectl("wait", "--for=delete", f"namespace/{other}", "--timeout=5s", timeout=8)


def test_kubectl_wait_for_delete_times_out_while_present(cluster: Cluster) -> None:
    ns = _ns(cluster)
    out = cluster.kubectl("wait", "--for=delete", f"namespace/{ns}", "--timeout=1s",
                          check=False, timeout=8)
    assert out.returncode != 0
    assert "timed out" in out.stderr


def test_official_client_watch_still_works(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api())
    ns = _ns(cluster)
    core.create_namespaced_config_map(ns, {"metadata": {"name": "seen"}})
    names = [e["object"].metadata.name for e in watch.Watch().stream(
        core.list_namespaced_config_map, ns, timeout_seconds=1)]
    assert "seen" in names



def test_official_client_watch_list(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api())
    ns = _ns(cluster)
    core.create_namespaced_config_map(ns, {"metadata": {"name": "x"}})
    w = watch.Watch()
    seen = []
    for e in w.stream(core.list_namespaced_config_map, ns, send_initial_events=True,
                      resource_version_match="NotOlderThan", allow_watch_bookmarks=True,
                      field_selector="metadata.name=x", timeout_seconds=5):
        seen.append(e)
        if e["type"] == "BOOKMARK":
            w.stop()
    assert [e["type"] for e in seen] == ["ADDED", "BOOKMARK"]
    assert seen[0]["object"].metadata.name == "x"
    # The client hands bookmarks over undecoded, and resumes from their resourceVersion.
    assert seen[1]["object"]["metadata"]["annotations"] == {INITIAL_END: "true"}
    assert w.resource_version == seen[1]["object"]["metadata"]["resourceVersion"]
