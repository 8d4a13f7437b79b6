"""Server-side printing: AGE formatting and kube's columns."""

from __future__ import annotations

import pytest

from localcluster.resources import BUILTIN
from localcluster.tables import human_duration, table


@pytest.mark.parametrize(("seconds", "shown"), [
    (-5, "<invalid>"), (0, "0s"), (119, "119s"), (120, "2m"), (125, "2m5s"), (600, "10m"),
    (3 * 3600, "3h"), (3 * 3600 + 60 * 7, "3h7m"), (20 * 3600, "20h"), (49 * 3600, "2d1h"),
    (10 * 86400, "10d"), (800 * 86400, "2y70d"), (9 * 365 * 86400, "9y"),
])
def test_human_duration(seconds: int, shown: str) -> None:
    assert human_duration(seconds) == shown


def test_service_row() -> None:
    rt = next(r for r in BUILTIN if r.plural == "services")
    svc = {"metadata": {"name": "web", "namespace": "default",
                        "creationTimestamp": "2020-01-01T00:00:00Z"},
           "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10",
                    "ports": [{"port": 80, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}],
                    "selector": {"app": "web"}}}
    t = table(rt, [svc], {"resourceVersion": "7"})
    assert [c["name"] for c in t["columnDefinitions"]] == [
        "Name", "Type", "Cluster-IP", "External-IP", "Port(s)", "Age", "Selector"]
    cells = t["rows"][0]["cells"]
    assert cells[:5] == ["web", "ClusterIP", "10.96.0.10", "<none>", "80/TCP,53/UDP"]
    assert cells[6] == "app=web"
    assert t["rows"][0]["object"]["metadata"]["namespace"] == "default"
    assert t["metadata"] == {"resourceVersion": "7"}


def test_printer_columns_read_lists_and_filters_as_kube_apiserver_does() -> None:
    from localcluster.tables import jsonpath

    ew = {"spec": {"workloadIPs": [{"ip": "172.30.0.9"}, {"ip": "fd00::9"}]},
          "status": {"conditions": [{"type": "Other", "status": "False"},
                                    {"type": "Ready", "status": "True"}]}}
    assert jsonpath(ew, ".spec.workloadIPs[*].ip") == ["172.30.0.9", "fd00::9"]
    assert jsonpath(ew, '.status.conditions[?(@.type=="Ready")].status') == ["True"]
    assert jsonpath(ew, ".spec.workloadIPs[0].ip") == ["172.30.0.9"]
    assert jsonpath(ew, ".spec.missing[*].ip") == []
    assert jsonpath({"spec": {"workloadIPs": []}}, ".spec.workloadIPs[*].ip") == []
