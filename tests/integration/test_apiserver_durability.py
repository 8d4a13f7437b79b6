"""Acknowledged writes survive `kill -9` with their resourceVersions."""

from __future__ import annotations

import threading
from pathlib import Path

from kubernetes import client
from urllib3.exceptions import HTTPError

from tests.cluster import start_cluster, wait_for


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    state = tmp_path / "state"
    c = start_cluster(state)
    acked: dict[str, str] = {}
    stop = threading.Event()

    def writer() -> None:
        core = client.CoreV1Api(c.api())
        for i in range(5000):  # bounded; the kill ends it much sooner
            if stop.is_set():
                return
            try:
                cm = core.create_namespaced_config_map(
                    "default", {"metadata": {"name": f"w{i}"}, "data": {"i": str(i)}},
                    _request_timeout=5)
            except (client.ApiException, HTTPError, OSError):
                return
            acked[cm.metadata.name] = cm.metadata.resource_version

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_for(lambda: len(acked) >= 150, timeout=60, what="150 acknowledged writes")
        c.kill()  # SIGKILL while the writer is mid-stream
    finally:
        stop.set()
        thread.join(timeout=30)
    c = start_cluster(state)
    try:
        core = client.CoreV1Api(c.api())
        stored = {cm.metadata.name: cm.metadata.resource_version
                  for cm in core.list_namespaced_config_map("default").items}
        missing = {n: rv for n, rv in acked.items() if stored.get(n) != rv}
        assert not missing, f"acknowledged writes lost or changed: {missing}"
        # The counter moves on from where it was: new writes get newer versions.
        newest = max(int(rv) for rv in acked.values())
        fresh = core.create_namespaced_config_map("default", {"metadata": {"name": "after"}})
        assert int(fresh.metadata.resource_version) > newest
    finally:
        c.stop()


def test_default_roles_are_reconciled_on_start_unless_told_not_to(tmp_path: Path) -> None:
    """As kube-apiserver does with its bootstrap policy: a start adds back what a default
    role lacks (a cluster made by an older server gets the newer defaults), takes nothing
    away, and leaves alone a role annotated autoupdate "false"."""
    state = tmp_path / "state"
    c = start_cluster(state)
    try:
        rbac = client.RbacAuthorizationV1Api(c.api())
        basic = rbac.read_cluster_role("system:basic-user")
        assert basic.metadata.annotations["rbac.authorization.kubernetes.io/autoupdate"] == \
            "true"
        extra = client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["get"])
        rbac.patch_cluster_role("system:basic-user", {"rules": [extra]})
        rbac.patch_cluster_role("system:public-info-viewer", {
            "metadata": {"annotations": {
                "rbac.authorization.kubernetes.io/autoupdate": "false"}},
            "rules": [{"nonResourceURLs": ["/version"], "verbs": ["get"]}]})
    finally:
        c.stop()
    c = start_cluster(state)
    try:
        rbac = client.RbacAuthorizationV1Api(c.api())
        rules = rbac.read_cluster_role("system:basic-user").rules
        resources = {r for rule in rules for r in rule.resources or []}
        assert {"configmaps", "selfsubjectaccessreviews", "selfsubjectrulesreviews",
                "selfsubjectreviews"} <= resources
        kept = rbac.read_cluster_role("system:public-info-viewer").rules
        assert [r.non_resource_urls for r in kept] == [["/version"]]
    finally:
        c.stop()
