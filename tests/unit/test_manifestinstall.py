"""What `cluster up` adds to meshgate's manifests and waits for after applying them
(localcluster.manifestinstall): the cluster's own control plane flags, CRDs
Established, Deployments available, and a deadline that names what is not there yet."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from localcluster.manifestinstall import (
    InstallError,
    add_control_args,
    available,
    established,
    wait_until_none,
)
from mesh import install
from mesh.identity.ca import IssuerDir


def deployment(replicas: int, *, ready: bool, available_n: int, updated: int
               ) -> dict[str, Any]:
    return {"spec": {"replicas": replicas}, "status": {
        "conditions": [{"type": "Available", "status": "True" if ready else "False"}],
        "availableReplicas": available_n, "updatedReplicas": updated}}


def test_a_deployment_is_available_once_every_replica_is_updated_and_available() -> None:
    assert available(deployment(2, ready=True, available_n=2, updated=2))
    assert not available(deployment(2, ready=True, available_n=1, updated=2))
    assert not available(deployment(2, ready=True, available_n=2, updated=1))
    assert not available(deployment(1, ready=False, available_n=1, updated=1))
    assert not available({"spec": {"replicas": 1}})


def test_a_crd_is_established_by_its_condition() -> None:
    assert established({"status": {"conditions": [{"type": "Established", "status": "True"}]}})
    assert not established({"status": {"conditions": [
        {"type": "NamesAccepted", "status": "True"}]}})


def test_waiting_ends_when_nothing_is_pending_or_names_what_is_left() -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    left = [["meshgate-control", "meshgate-gateway"], ["meshgate-gateway"], []]
    wait_until_none(lambda: left.pop(0), 10, "Deployments", clock=lambda: now[0],
                    sleep=sleep)
    assert now[0] == pytest.approx(0.4)
    with pytest.raises(InstallError) as e:
        wait_until_none(lambda: ["meshgate-gateway"], 3, "meshgate's Deployments to be "
                        "Available", clock=lambda: now[0], sleep=sleep)
    assert str(e.value) == (
        "timed out after 3s waiting for meshgate's Deployments to be Available: "
        "meshgate-gateway not yet; see `kubectl -n meshgate get pods,events`")


def test_the_control_plane_gets_the_clusters_flags_after_its_own(tmp_path: Any) -> None:
    IssuerDir(tmp_path).init("cluster.local", anchor_lifetime=dt.timedelta(days=1),
                             issuer_lifetime=dt.timedelta(days=1),
                             now=dt.datetime.now(dt.UTC))
    docs = install.render(IssuerDir(tmp_path))
    add_control_args(docs, ["--cluster-name=east", "--workload-heartbeat=1s"])
    args = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["args"]
            for d in docs if d["kind"] == "Deployment"}
    assert args["meshgate-control"][:3] == ["--log-level=info", "control", "run"]
    assert args["meshgate-control"][-2:] == ["--cluster-name=east", "--workload-heartbeat=1s"]
    assert "--cluster-name=east" not in args["meshgate-gateway"]
