"""List+watch: resume from a resourceVersion, bookmarks, restarts and 410 Gone."""

from __future__ import annotations

import json
import ssl
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from tests.cluster import Cluster, start_cluster


def _ns(cluster: Cluster) -> str:
    name = f"w-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(cluster.api()).create_namespace({"metadata": {"name": name}})
    return name


def _events(cluster: Cluster, path: str, *, count: int, timeout: int = 10) -> list[dict[str, Any]]:
    """Read ``count`` watch lines (or until the server's timeoutSeconds) from a raw stream."""
    ctx = ssl.create_default_context(cafile=str(cluster.state_dir / "ca.crt"))
    req = urllib.request.Request(cluster.server + path)
    req.add_header("Authorization", f"Bearer {cluster.token}")
    out = []
    with urllib.request.urlopen(req, context=ctx, timeout=timeout + 5) as resp:
        for line in resp:
            out.append(json.loads(line))
            if len(out) == count:
                break
    return out


def test_watch_from_resource_version(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api())
    ns = _ns(cluster)
    core.create_namespaced_config_map(ns, {"metadata": {"name": "before"}})
    listed = core.list_namespaced_config_map(ns)
    rv = listed.metadata.resource_version
    core.create_namespaced_config_map(ns, {"metadata": {"name": "a", "labels": {"x": "1"}}})
    core.patch_namespaced_config_map("a", ns, {"data": {"k": "v"}},
                                     _content_type="application/merge-patch+json")
    core.delete_namespaced_config_map("a", ns)
    seen = [(e["type"], e["object"].metadata.name) for e in watch.Watch().stream(
        core.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=1)]
    seen = [s for s in seen if s[1] != "kube-root-ca.crt"]
    assert seen == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]


def test_watch_without_resource_version_starts_with_state(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api())
    ns = _ns(cluster)
    core.create_namespaced_config_map(ns, {"metadata": {"name": "one"}})
    events = _events(cluster, f"/api/v1/namespaces/{ns}/configmaps?watch=true&timeoutSeconds=1"
                     "&fieldSelector=metadata.name%3Done", count=1)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "one")]


def test_label_selector_watch_turns_relabel_into_delete(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api())
    ns = _ns(cluster)
    rv = core.list_namespaced_config_map(ns).metadata.resource_version
    core.create_namespaced_config_map(ns, {"metadata": {"name": "c", "labels": {"team": "a"}}})
    core.patch_namespaced_config_map("c", ns, {"metadata": {"labels": {"team": "b"}}},
                                     _content_type="application/merge-patch+json")
    events = _events(cluster, f"/api/v1/namespaces/{ns}/configmaps?watch=true&resourceVersion="
                     f"{rv}&labelSelector=team%3Da&timeoutSeconds=1", count=2)
    assert [e["type"] for e in events] == ["ADDED", "DELETED"]


def test_bookmarks(cluster: Cluster) -> None:
    ns = _ns(cluster)
    rv = client.CoreV1Api(cluster.api()).list_namespaced_config_map(ns).metadata.resource_version
    events = _events(cluster, f"/api/v1/namespaces/{ns}/configmaps?watch=true&resourceVersion="
                     f"{rv}&allowWatchBookmarks=true&timeoutSeconds=5"
                     "&fieldSelector=metadata.name%3Dnothing-matches", count=1)
    assert events[0]["type"] == "BOOKMARK"
    assert int(events[0]["object"]["metadata"]["resourceVersion"]) >= int(rv)
    assert events[0]["object"]["kind"] == "ConfigMap"


def test_410_gone_after_history_trimmed(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api())
    ns = _ns(cluster)
    old_rv = core.list_namespaced_config_map(ns).metadata.resource_version
    core.create_namespaced_config_map(ns, {"metadata": {"name": "churn"}})
    for i in range(210):  # the module's cluster keeps 200 events
        core.patch_namespaced_config_map("churn", ns, {"data": {"i": str(i)}},
                                         _content_type="application/merge-patch+json")
    events = _events(cluster, f"/api/v1/namespaces/{ns}/configmaps?watch=true&resourceVersion="
                     f"{old_rv}", count=1)
    assert events[0]["type"] == "ERROR"
    assert events[0]["object"]["code"] == 410
    assert "too old resource version" in events[0]["object"]["message"]
    w = watch.Watch()
    try:
        for _ in w.stream(core.list_namespaced_config_map, ns, resource_version=old_rv,
                          timeout_seconds=1, _request_timeout=10):
            pass
    except ApiException as e:
        assert e.status == 410
    else:
        raise AssertionError("the client did not see 410 Gone")


def test_watch_resumes_after_restart(tmp_path: Path) -> None:
    c = start_cluster(tmp_path / "state")
    try:
        core = client.CoreV1Api(c.api())
        rv = core.list_namespaced_config_map("default").metadata.resource_version
        core.create_namespaced_config_map("default", {"metadata": {"name": "x"}})
        c.stop()
        c = start_cluster(tmp_path / "state")
        core = client.CoreV1Api(c.api())
        core.create_namespaced_config_map("default", {"metadata": {"name": "y"}})
        seen = [(e["type"], e["object"].metadata.name) for e in watch.Watch().stream(
            core.list_namespaced_config_map, "default", resource_version=rv, timeout_seconds=1)]
        seen = [s for s in seen if s[1] != "kube-root-ca.crt"]
        assert seen == [("ADDED", "x"), ("ADDED", "y")]
    finally:
        c.stop()
