"""ExternalWorkloads as the control plane reads them, and the EndpointSlices made from
them: pure functions fed dicts, with the controller's clock given as numbers."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.control.externalworkloads import (
    KIND,
    LEFT_REASON,
    MANAGED_BY,
    Heartbeats,
    workload_ready,
)
from mesh.control.workloadslices import desired_slices, owner_service, up_to_date
from mesh.discovery.index import MANAGED_BY_LABEL, SERVICE_NAME_LABEL


def workload(name: str = "vm1", *, ns: str = "default", ips: tuple[str, ...] = ("192.0.2.7",),
             labels: dict[str, str] | None = None, ready: str | None = "True",
             probe: str = "2026-01-01T00:00:00Z", reason: str = "Heartbeat",
             ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "workload.meshgate.io/v1beta1", "kind": KIND,
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}",
                     "labels": {"app": "legacy"} if labels is None else labels},
        "spec": {"meshTLS": {"identity": f"{name}.{ns}.serviceaccount.identity.meshgate."
                                         "example.org", "serverName": name},
                 "ports": ports if ports is not None else [{"name": "http", "port": 8080}],
                 "workloadIPs": [{"ip": ip} for ip in ips]},
    }
    if ready is not None:
        obj["status"] = {"conditions": [{"type": "Ready", "status": ready,
                                         "lastProbeTime": probe, "reason": reason}]}
    return obj


def service(name: str = "legacy", *, ns: str = "default",
            selector: dict[str, str] | None = None, target: Any = "http") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}"},
            "spec": {"selector": {"app": "legacy"} if selector is None else selector,
                     "clusterIP": "10.96.0.50",
                     "ports": [{"name": "web", "port": 80, "targetPort": target,
                                "protocol": "TCP"}]}}


def seen(*workloads: dict[str, Any], at: float = 0.0, interval: float = 10.0,
         missed: int = 3) -> Heartbeats:
    beats = Heartbeats(interval=interval, missed=missed)
    for wl in workloads:
        beats.observe(wl, at)
    return beats


def endpoints(slices: dict[str, dict[str, Any]]) -> list[tuple[str, bool, str]]:
    return sorted((ep["addresses"][0], ep["conditions"]["ready"], ep["targetRef"]["name"])
                  for s in slices.values() for ep in s["endpoints"])


# ---------------------------------------------------------------- heartbeats


def test_first_sight_counts_as_a_heartbeat_just_seen() -> None:
    wl = workload(probe="1999-01-01T00:00:00Z")  # the VM's clock is far behind: no matter
    beats = seen(wl, at=100.0)
    assert workload_ready(wl, beats, 100.0)
    assert workload_ready(wl, beats, 129.9)
    assert not workload_ready(wl, beats, 130.0)


def test_only_a_changed_probe_time_renews_the_heartbeat() -> None:
    wl = workload(probe="2026-01-01T00:00:00Z")
    beats = seen(wl, at=0.0)
    beats.observe(wl, 20.0)  # the same heartbeat delivered again (a relist)
    assert not workload_ready(wl, beats, 30.0)
    fresh = workload(probe="2026-01-01T00:00:10Z")
    beats.observe(fresh, 31.0)
    assert workload_ready(fresh, beats, 31.0)
    assert beats.expires(("default", "vm1"), 31.0) == pytest.approx(30.0)
    assert beats.expires(("default", "vm1"), 70.0) is None


@pytest.mark.parametrize("wl", [workload(ready="False"), workload(ready="Unknown"),
                                workload(ready=None), workload(reason=LEFT_REASON)],
                         ids=["false", "unknown", "no-condition", "left"])
def test_a_workload_that_does_not_say_ready_is_not(wl: dict[str, Any]) -> None:
    assert not workload_ready(wl, seen(wl), 0.0)


def test_forgotten_workloads_are_not_ready() -> None:
    wl = workload()
    beats = seen(wl)
    beats.forget(("default", "vm1"))
    assert not workload_ready(wl, beats, 0.0)


def test_heartbeat_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        Heartbeats(interval=0)
    with pytest.raises(ValueError):
        Heartbeats(missed=0)


# ---------------------------------------------------------------- slices


def test_a_selected_workload_gets_one_endpoint_per_ip_with_its_named_port() -> None:
    wl = workload()
    slices = desired_slices(service(), [wl], heartbeats=seen(wl), now=1.0)
    [(name, sl)] = slices.items()
    assert sl["metadata"]["labels"] == {SERVICE_NAME_LABEL: "legacy",
                                        MANAGED_BY_LABEL: MANAGED_BY}
    assert sl["metadata"]["ownerReferences"][0]["uid"] == "uid-legacy"
    assert "-ew-" in name and sl["addressType"] == "IPv4"
    assert sl["ports"] == [{"name": "web", "port": 8080, "protocol": "TCP"}]
    assert sl["endpoints"] == [{
        "addresses": ["192.0.2.7"],
        "conditions": {"ready": True, "serving": True, "terminating": False},
        "targetRef": {"kind": KIND, "namespace": "default", "name": "vm1", "uid": "uid-vm1"}}]


def test_a_stale_heartbeat_keeps_the_endpoint_but_not_ready() -> None:
    wl = workload()
    beats = seen(wl, at=0.0)
    assert endpoints(desired_slices(service(), [wl], heartbeats=beats, now=31.0)) == [
        ("192.0.2.7", False, "vm1")]
    again = workload(probe="2026-01-01T00:01:00Z")
    beats.observe(again, 40.0)
    assert endpoints(desired_slices(service(), [again], heartbeats=beats, now=41.0)) == [
        ("192.0.2.7", True, "vm1")]


def test_numeric_target_ports_and_workloads_resolving_ports_differently() -> None:
    a = workload("a", ips=("192.0.2.1",), ports=[{"name": "http", "port": 8080}])
    b = workload("b", ips=("192.0.2.2",), ports=[{"name": "http", "port": 9090}])
    c = workload("c", ips=("2001:db8::3",), ports=[{"name": "http", "port": 8080}])
    slices = desired_slices(service(), [a, b, c], heartbeats=seen(a, b, c), now=0.0)
    assert sorted((s["addressType"], s["ports"][0]["port"], len(s["endpoints"]))
                  for s in slices.values()) == [("IPv4", 8080, 1), ("IPv4", 9090, 1),
                                                ("IPv6", 8080, 1)]
    numeric = desired_slices(service(target=7000), [a], heartbeats=seen(a), now=0.0)
    assert [s["ports"][0]["port"] for s in numeric.values()] == [7000]
    unknown = desired_slices(service(target="grpc"), [a], heartbeats=seen(a), now=0.0)
    assert [s["ports"] for s in unknown.values()] == [[]]


def test_what_is_not_selected_or_has_no_ip_has_no_endpoint() -> None:
    others = [workload("elsewhere", ns="other"), workload("db", labels={"app": "db"}),
              workload("joining", ips=()), workload("bad", ips=("not-an-ip",))]
    assert desired_slices(service(), others, heartbeats=seen(*others), now=0.0) == {}
    wl = workload()
    assert desired_slices(service(selector={}), [wl], heartbeats=seen(wl), now=0.0) == {}
    external = service()
    external["spec"]["type"] = "ExternalName"
    assert desired_slices(external, [wl], heartbeats=seen(wl), now=0.0) == {}


def test_owner_and_up_to_date_read_what_the_server_holds() -> None:
    wl = workload()
    [want] = desired_slices(service(), [wl], heartbeats=seen(wl), now=0.0).values()
    assert owner_service(want) == ("default", "legacy")
    theirs = {"metadata": {"namespace": "default", "labels": {
        SERVICE_NAME_LABEL: "legacy", MANAGED_BY_LABEL: "endpointslice-controller.k8s.io"}}}
    assert owner_service(theirs) is None
    # The server may add fields of its own (a resourceVersion, defaults): still current.
    held = {**want, "metadata": {**want["metadata"], "resourceVersion": "7"},
            "endpoints": [{**want["endpoints"][0], "nodeName": "n"}]}
    assert up_to_date(held, want)
    flipped = desired_slices(service(), [wl], heartbeats=seen(wl), now=99.0)
    assert not up_to_date(held, next(iter(flipped.values())))
