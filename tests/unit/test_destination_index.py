"""The destination side without sockets: the index fed plain API objects, the
watch query and per-watcher buffer of the server, and the client applying the
stream's messages."""

from __future__ import annotations

import json
import logging
import ssl
from typing import Any

import pytest

from mesh.discovery.client import WatchDiscovery
from mesh.discovery.index import (
    INBOUND_PORT_ANNOTATION,
    OPAQUE_PORTS_ANNOTATION,
    SKIP_INBOUND_ANNOTATION,
    Change,
    DestinationIndex,
    ServiceRemoved,
    ServiceUpdated,
)
from mesh.discovery.server import BadQuery, Subscription, Watch, parse_watch
from mesh.errors import ConfigError
from mesh.identity.names import Identity, service_identity
from mesh.informer import ADDED, DELETED, MODIFIED
from mesh.proxy.discovery import DiscoveryFile, ServiceSpec

DOMAIN = "cluster.local"
NS = "shop"
VIP = "10.96.0.10"
WEB = f"web.{NS}.svc.{DOMAIN}"


def service(name: str = "web", *, ip: str | None = VIP,
            ports: tuple[tuple[str, int], ...] = (("http", 80), ("admin", 9090)),
            annotations: dict[str, str] | None = None, kind: str = "ClusterIP"
            ) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": kind, "ports": [
        {"name": n, "port": p, "targetPort": n, "protocol": "TCP"} for n, p in ports]}
    if ip is not None:
        spec["clusterIP"] = ip
    return {"metadata": {"name": name, "namespace": NS, "annotations": annotations or {}},
            "spec": spec}


def endpoint(ip: str, pod: str | None, *, ready: bool | None = True,
             zone: str | None = None) -> dict[str, Any]:
    ep: dict[str, Any] = {"addresses": [ip]}
    if ready is not None:
        ep["conditions"] = {"ready": ready}
    if pod is not None:
        ep["targetRef"] = {"kind": "Pod", "namespace": NS, "name": pod}
    if zone is not None:
        ep["zone"] = zone
    return ep


def endpoint_slice(name: str, *endpoints: dict[str, Any], svc: str = "web",
                   ports: dict[str, int] | None = None) -> dict[str, Any]:
    ports = {"http": 8080, "admin": 9091} if ports is None else ports
    return {"metadata": {"name": name, "namespace": NS,
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "endpoints": list(endpoints),
            "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports.items()]}


def pod(name: str, *, sa: str | None = "web", inbound: str | None = "4143",
        labels: dict[str, str] | None = None) -> dict[str, Any]:
    annotations = {INBOUND_PORT_ANNOTATION: inbound} if inbound is not None else {}
    spec = {"serviceAccountName": sa} if sa is not None else {}
    return {"metadata": {"name": name, "namespace": NS, "annotations": annotations,
                         "labels": labels or {}}, "spec": spec}


def ident(sa: str) -> str:
    return Identity(NS, sa, DOMAIN).dns_name


def updated(changes: list[Change]) -> dict[str, ServiceSpec]:
    return {c.service.address: c.service for c in changes if isinstance(c, ServiceUpdated)}


def eps(spec: ServiceSpec | None) -> list[tuple[str, int, str | None]]:
    assert spec is not None
    return [(e.address, e.target_port, e.identity) for e in spec.endpoints]


@pytest.fixture
def index() -> DestinationIndex:
    return DestinationIndex(trust_domain=DOMAIN)


def test_one_spec_per_port_with_the_slice_port_of_the_same_name(
        index: DestinationIndex) -> None:
    index.pod_event(ADDED, pod("web-1"))
    index.slice_event(ADDED, endpoint_slice("web-a", endpoint("10.244.0.1", "web-1",
                                                              zone="z1")))
    changes = index.service_event(ADDED, service())
    specs = updated(changes)
    assert sorted(specs) == [f"{VIP}:80", f"{VIP}:9090"]
    http, admin = specs[f"{VIP}:80"], specs[f"{VIP}:9090"]
    assert http.name == admin.name == WEB
    assert eps(http) == [("10.244.0.1:4143", 8080, ident("web"))]
    assert eps(admin) == [("10.244.0.1:4143", 9091, ident("web"))]
    ep = http.endpoints[0]
    assert (ep.zone, ep.priority, ep.weight) == ("z1", 0, 1)
    # What the index builds is what a proxy accepts from a discovery file.
    DiscoveryFile(services=index.services())


def test_meshed_pods_are_reached_through_their_proxy_others_directly(
        index: DestinationIndex) -> None:
    index.service_event(ADDED, service(ports=(("http", 80),)))
    index.pod_event(ADDED, pod("meshed", sa="api", inbound="4143"))
    index.pod_event(ADDED, pod("plain", sa=None, inbound=None))
    index.pod_event(ADDED, pod("garbled", inbound="not-a-port"))
    index.slice_event(ADDED, endpoint_slice(
        "web-a", endpoint("10.244.0.1", "meshed"), endpoint("10.244.0.2", "plain"),
        endpoint("10.244.0.3", "garbled"), endpoint("203.0.113.9", None)))
    assert eps(index.by_address(VIP, 80)) == [
        ("10.244.0.1:4143", 8080, ident("api")),
        ("10.244.0.2:8080", 8080, None),
        ("10.244.0.3:8080", 8080, None),  # an unreadable annotation: not meshed
        ("203.0.113.9:8080", 8080, None),  # no Pod behind it (a mirror's gateway)
    ]


def test_ports_a_meshed_pod_skips_are_reached_directly(index: DestinationIndex) -> None:
    index.service_event(ADDED, service())
    skipping = pod("web-1")
    skipping["metadata"]["annotations"][SKIP_INBOUND_ANNOTATION] = "9000-9099, 7"
    index.pod_event(ADDED, skipping)
    index.slice_event(ADDED, endpoint_slice("web-a", endpoint("10.244.0.1", "web-1"),
                                            ports={"http": 8080, "admin": 9091}))
    assert eps(index.by_address(VIP, 80)) == [("10.244.0.1:4143", 8080, ident("web"))]
    assert eps(index.by_address(VIP, 9090)) == [("10.244.0.1:9091", 9091, None)]
    garbled = pod("web-1")
    garbled["metadata"]["annotations"][SKIP_INBOUND_ANNOTATION] = "admin"
    index.pod_event(MODIFIED, garbled)  # unreadable: every port through the proxy
    assert eps(index.by_address(VIP, 9090)) == [("10.244.0.1:4143", 9091, ident("web"))]


def test_not_ready_endpoints_are_left_out(index: DestinationIndex) -> None:
    index.service_event(ADDED, service(ports=(("http", 80),)))
    for name in ("a", "b", "c"):
        index.pod_event(ADDED, pod(name))
    index.slice_event(ADDED, endpoint_slice(
        "web-a", endpoint("10.244.0.1", "a", ready=True),
        endpoint("10.244.0.2", "b", ready=False),
        endpoint("10.244.0.3", "c", ready=None)))  # unknown reads as ready
    assert [e[0] for e in eps(index.by_name(WEB, 80))] == ["10.244.0.1:4143",
                                                          "10.244.0.3:4143"]
    changes = index.slice_event(MODIFIED, endpoint_slice(
        "web-a", endpoint("10.244.0.1", "a", ready=False)))
    assert eps(updated(changes)[f"{VIP}:80"]) == []


def test_service_account_change_updates_the_identity(index: DestinationIndex) -> None:
    index.service_event(ADDED, service())
    index.service_event(ADDED, service("other", ip="10.96.0.11"))
    index.pod_event(ADDED, pod("web-1", sa="web"))
    index.slice_event(ADDED, endpoint_slice("web-a", endpoint("10.244.0.1", "web-1")))
    # A Pod change the index does not read changes nothing.
    assert index.pod_event(MODIFIED, pod("web-1", sa="web", labels={"v": "2"})) == []
    changes = index.pod_event(MODIFIED, pod("web-1", sa="web-v2"))
    assert sorted(updated(changes)) == [f"{VIP}:80", f"{VIP}:9090"]  # not "other"
    assert eps(index.by_address(VIP, 80))[0][2] == ident("web-v2")
    # Unmeshing the Pod sends traffic to its port directly.
    index.pod_event(MODIFIED, pod("web-1", inbound=None))
    assert eps(index.by_address(VIP, 80)) == [("10.244.0.1:8080", 8080, None)]


def test_an_endpoint_waits_for_its_pod(index: DestinationIndex) -> None:
    index.service_event(ADDED, service(ports=(("http", 80),)))
    index.slice_event(ADDED, endpoint_slice("web-a", endpoint("10.244.0.1", "web-1")))
    assert eps(index.by_address(VIP, 80)) == []
    assert index.pod_event(ADDED, pod("unrelated")) == []
    changes = index.pod_event(ADDED, pod("web-1"))
    assert eps(updated(changes)[f"{VIP}:80"]) == [("10.244.0.1:4143", 8080, ident("web"))]
    changes = index.pod_event(DELETED, pod("web-1"))
    assert eps(updated(changes)[f"{VIP}:80"]) == []


def test_slice_deletion_and_several_slices(index: DestinationIndex) -> None:
    index.service_event(ADDED, service(ports=(("http", 80),)))
    index.pod_event(ADDED, pod("a"))
    index.pod_event(ADDED, pod("b"))
    index.slice_event(ADDED, endpoint_slice("web-a", endpoint("10.244.0.1", "a")))
    # Pods whose named port resolves differently land in their own slice.
    index.slice_event(ADDED, endpoint_slice("web-b", endpoint("10.244.0.2", "b"),
                                            ports={"http": 8081}))
    assert eps(index.by_address(VIP, 80)) == [("10.244.0.1:4143", 8080, ident("web")),
                                              ("10.244.0.2:4143", 8081, ident("web"))]
    changes = index.slice_event(DELETED, endpoint_slice("web-a"))
    assert eps(updated(changes)[f"{VIP}:80"]) == [("10.244.0.2:4143", 8081, ident("web"))]
    # With its slice gone, Pod b no longer concerns the service.
    index.slice_event(DELETED, endpoint_slice("web-b"))
    assert index.pod_event(MODIFIED, pod("b", sa="x")) == []


def test_headless_external_name_and_udp_are_skipped(index: DestinationIndex) -> None:
    assert index.service_event(ADDED, service("headless", ip="None")) == []
    assert index.service_event(ADDED, service("pending", ip=None)) == []
    assert index.service_event(ADDED, service("ext", ip=None, kind="ExternalName")) == []
    dns = service("dns", ip="10.96.0.53", ports=(("dns", 53), ("dns-tcp", 53)))
    dns["spec"]["ports"][0]["protocol"] = "UDP"
    assert [c.service.address for c in index.service_event(ADDED, dns)
            if isinstance(c, ServiceUpdated)] == ["10.96.0.53:53"]
    assert len(index) == 1


def test_service_deletion_and_lost_ports_are_removals(index: DestinationIndex) -> None:
    index.service_event(ADDED, service())
    changes = index.service_event(MODIFIED, service(ports=(("http", 80),)))
    assert changes == [ServiceRemoved(f"{VIP}:9090", WEB)]
    assert index.service_event(MODIFIED, service(ports=(("http", 80),))) == []
    assert index.service_event(DELETED, service()) == [ServiceRemoved(f"{VIP}:80", WEB)]
    assert index.services() == [] and index.by_name(WEB, 80) is None


def test_opaque_ports_annotation(index: DestinationIndex,
                                 caplog: pytest.LogCaptureFixture) -> None:
    ports = (("http", 80), ("mysql", 3306), ("pg", 5432), ("redis", 6379), ("x", 7000))
    with caplog.at_level(logging.WARNING, logger="mesh.discovery.index"):
        index.service_event(ADDED, service(ports=ports, annotations={
            OPAQUE_PORTS_ANNOTATION: "3306, 5000-6000,redis,bogus,"}))
    opaque = sorted(s.host_port[1] for s in index.services() if s.opaque)
    assert opaque == [3306, 5432, 6379]
    assert "item='bogus'" in caplog.text


def test_lookups_and_ipv6(index: DestinationIndex) -> None:
    index.service_event(ADDED, service("v6", ip="fd00::0a", ports=(("http", 80),)))
    index.pod_event(ADDED, pod("p"))
    s = endpoint_slice("v6-a", endpoint("fd00:10:244::1", "p"), svc="v6")
    s["addressType"] = "IPv6"
    index.slice_event(ADDED, s)
    spec = index.by_address("fd00::a", 80)
    assert spec is not None and spec.address == "[fd00::0a]:80"
    assert index.by_name(f"V6.{NS}.svc.{DOMAIN}.", 80) is spec
    assert eps(spec) == [("[fd00:10:244::1]:4143", 8080, ident("web"))]


# -- the server's watch query and per-watcher buffer -----------------------------------


def test_watch_queries() -> None:
    assert parse_watch({}) == Watch()
    assert parse_watch({"service": f"{WEB}:80"}) == Watch(service=(WEB, 80))
    assert parse_watch({"address": "[fd00::0a]:80"}) == Watch(address=("fd00::a", 80))
    bad = [{"service": WEB}, {"service": f"{WEB}:http"}, {"service": "10.0.0.1:80"},
           {"address": f"{WEB}:80"}, {"address": "10.0.0.1:70000"},
           {"service": f"{WEB}:80", "address": "10.0.0.1:80"}, {"watch": "all"}]
    for query in bad:
        with pytest.raises(BadQuery):
            parse_watch(query)
    with pytest.raises(BadQuery, match="once"):
        parse_watch({"service": f"{WEB}:80"}, repeated=frozenset({"service"}))
    w = Watch(service=(WEB, 80))
    assert w.matches(WEB, (VIP, 80)) and not w.matches(WEB, (VIP, 9090))


def test_a_slow_watcher_gets_newest_states_then_is_cut_off() -> None:
    cut: list[bool] = []
    sub = Subscription(Watch(), limit=2, on_overflow=lambda: cut.append(True))
    assert sub.offer(("10.0.0.1", 80), b"a1\n") and sub.offer(("10.0.0.1", 80), b"a2\n")
    assert sub.offer(("10.0.0.2", 80), b"b1\n")
    assert sub.take() == [b"a2\n", b"b1\n"]  # only the newest state of each port
    sub.offer(("10.0.0.1", 80), b"a3\n")
    sub.offer(("10.0.0.2", 80), b"b2\n")
    assert not sub.offer(("10.0.0.3", 80), b"c1\n")
    assert sub.overflowed and sub.closed and cut == [True]
    assert not sub.offer(("10.0.0.1", 80), b"a4\n")


# -- the client's handling of messages --------------------------------------------------


def _client() -> WatchDiscovery:
    return WatchDiscovery("https://127.0.0.1:8086", context=ssl.create_default_context,
                          server_identity=service_identity(DOMAIN))


def _svc(ip: str, *endpoints: str) -> dict[str, Any]:
    return {"name": WEB, "address": f"{ip}:80", "opaque": False, "endpoints": [
        {"address": f"{e}:4143", "targetPort": 8080, "identity": ident("web")}
        for e in endpoints]}


def _line(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg).encode()


def test_client_applies_snapshots_as_diffs() -> None:
    d = _client()
    seen: list[tuple[str, int]] = []
    d.subscribe(lambda s: seen.append((s.address, len(s.endpoints))))
    d.receive_line(_line({"type": "snapshot", "services": [_svc("10.96.0.1", "10.0.0.1"),
                                                           _svc("10.96.0.2", "10.0.0.2")]}))
    assert d.ready.is_set() and d.connections == 1 and len(seen) == 2
    spec = d.resolve(("10.96.0.1", 80))
    assert spec is not None and spec.endpoints[0].target_port == 8080
    seen.clear()
    d.receive_line(_line({"type": "update", "service": _svc("10.96.0.1", "10.0.0.1",
                                                            "10.0.0.3")}))
    d.receive_line(_line({"type": "update", "service": _svc("10.96.0.1", "10.0.0.1",
                                                            "10.0.0.3")}))
    assert seen == [("10.96.0.1:80", 2)]
    seen.clear()
    # A reconnection's snapshot announces only what differs from what was known.
    d.receive_line(_line({"type": "snapshot", "services": [_svc("10.96.0.1", "10.0.0.1",
                                                                "10.0.0.3")]}))
    assert seen == [("10.96.0.2:80", 0)] and d.resolve(("10.96.0.2", 80)) is None
    d.receive_line(_line({"type": "delete", "address": "10.96.0.1:80", "name": WEB}))
    assert seen[-1] == ("10.96.0.1:80", 0) and d.services() == []
    assert d.resolve_name(f"{WEB}:80") is None


def test_client_skips_what_it_cannot_use(caplog: pytest.LogCaptureFixture) -> None:
    d = _client()
    bad = _svc("10.96.0.2", "10.0.0.2")
    bad["endpoints"][0]["targetPort"] = 0
    with caplog.at_level(logging.WARNING, logger="mesh.discovery.client"):
        d.receive_line(b"{not json")
        d.receive_line(_line({"type": "snapshot", "services": [_svc("10.96.0.1", "10.0.0.1"),
                                                               bad, "nonsense"]}))
        d.receive_line(_line({"type": "update", "service": {"name": WEB}}))
        d.receive_line(_line({"type": "delete", "address": "nowhere"}))
        d.receive_line(_line({"type": "from-the-future"}))
    assert [s.address for s in d.services()] == ["10.96.0.1:80"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5, lines
    assert any("services[1].endpoints[0].targetPort" in line for line in lines)
    assert any("service.address: required field is missing" in line for line in lines)


def test_client_backoff_is_exponential_capped_and_jittered() -> None:
    import random

    d = WatchDiscovery("https://127.0.0.1:8086", context=ssl.create_default_context,
                       server_identity=service_identity(DOMAIN), min_backoff=0.5,
                       max_backoff=8.0, rng=random.Random(7))
    for attempt, step in [(0, 0.5), (1, 1.0), (3, 4.0), (4, 8.0), (50, 8.0)]:
        delays = {d._backoff(attempt) for _ in range(20)}
        assert all(step / 2 <= x <= step for x in delays) and len(delays) > 1
    with pytest.raises(ConfigError, match="https://"):
        WatchDiscovery("http://127.0.0.1:8086", context=ssl.create_default_context,
                       server_identity=service_identity(DOMAIN))


def test_a_mirror_is_reached_through_its_gateway_with_the_remote_name(
        index: DestinationIndex) -> None:
    gateway = "meshgate-gateway.meshgate.serviceaccount.identity.meshgate.cluster.local"
    index.service_event(ADDED, service("web-west", ports=(("http", 80),)))
    mirror_slice = endpoint_slice("web-west-gw", endpoint("192.0.2.7", None),
                                  endpoint("192.0.2.8", None, ready=False),
                                  svc="web-west", ports={"http": 4143})
    mirror_slice["metadata"]["labels"].update({
        "endpointslice.kubernetes.io/managed-by": "mirror.meshgate.io",
        "mirror.meshgate.io/cluster-name": "west"})
    mirror_slice["metadata"]["annotations"] = {
        "mirror.meshgate.io/remote-gateway-identity": gateway,
        "mirror.meshgate.io/remote-svc-fq-name": "web.default.svc.cluster.local"}
    changes = index.slice_event(ADDED, mirror_slice)
    spec = updated(changes)[f"{VIP}:80"]
    assert eps(spec) == [("192.0.2.7:4143", 80, gateway)]  # the not-ready one is left out
    ep = spec.endpoints[0]
    assert (ep.cluster, ep.authority) == ("west", "web.default.svc.cluster.local")
    DiscoveryFile(services=index.services())

    # Only the mirror controller's slices may name a gateway.
    forged = endpoint_slice("web-west-forged", endpoint("192.0.2.9", None), svc="web-west",
                            ports={"http": 4143})
    forged["metadata"]["annotations"] = {
        "mirror.meshgate.io/remote-gateway-identity": gateway,
        "mirror.meshgate.io/remote-svc-fq-name": "web.default.svc.cluster.local"}
    spec = updated(index.slice_event(ADDED, forged))[f"{VIP}:80"]
    assert ("192.0.2.9:4143", 4143, None) in eps(spec)


# ---------------------------------------------------------------- ExternalWorkloads


def vm_endpoint(ip: str, workload: str, *, ready: bool = True) -> dict[str, Any]:
    return {"addresses": [ip], "conditions": {"ready": ready},
            "targetRef": {"kind": "ExternalWorkload", "namespace": NS, "name": workload}}


def external_workload(name: str, *, identity: str | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NS},
            "spec": {"meshTLS": {"identity": ident(name) if identity is None else identity,
                                 "serverName": name},
                     "workloadIPs": [{"ip": "192.0.2.7"}]}}


def test_a_vm_endpoint_is_its_proxy_with_its_identity_once_seen(
        index: DestinationIndex) -> None:
    index.service_event(ADDED, service(ports=(("http", 80),)))
    index.slice_event(ADDED, endpoint_slice("web-ew", vm_endpoint("192.0.2.7", "vm1")))
    assert eps(index.by_address(VIP, 80)) == []  # the workload is not known yet
    assert index.workload_event(ADDED, external_workload("unrelated")) == []
    changes = index.workload_event(ADDED, external_workload("vm1"))
    assert eps(updated(changes)[f"{VIP}:80"]) == [("192.0.2.7:4143", 8080, ident("vm1"))]
    # What the index does not read changes nothing; a new identity does.
    relabelled = external_workload("vm1")
    relabelled["metadata"]["labels"] = {"v": "2"}
    assert index.workload_event(MODIFIED, relabelled) == []
    changes = index.workload_event(MODIFIED, external_workload("vm1", identity=ident("vm2")))
    assert eps(updated(changes)[f"{VIP}:80"])[0][2] == ident("vm2")
    changes = index.workload_event(DELETED, external_workload("vm1"))
    assert eps(updated(changes)[f"{VIP}:80"]) == []


def test_a_not_ready_vm_endpoint_is_left_out(index: DestinationIndex) -> None:
    index.service_event(ADDED, service(ports=(("http", 80),)))
    index.workload_event(ADDED, external_workload("vm1"))
    index.slice_event(ADDED, endpoint_slice("web-ew", vm_endpoint("192.0.2.7", "vm1")))
    assert len(eps(index.by_address(VIP, 80))) == 1
    changes = index.slice_event(MODIFIED, endpoint_slice(
        "web-ew", vm_endpoint("192.0.2.7", "vm1", ready=False)))
    assert eps(updated(changes)[f"{VIP}:80"]) == []


@pytest.mark.parametrize("identity", ["", "vm1.shop", "not an identity",
                                      Identity(NS, "vm1", "other.example").dns_name])
def test_a_vm_without_a_usable_identity_is_skipped_with_a_warning(
        index: DestinationIndex, identity: str, caplog: pytest.LogCaptureFixture) -> None:
    index.service_event(ADDED, service(ports=(("http", 80),)))
    index.slice_event(ADDED, endpoint_slice("web-ew", vm_endpoint("192.0.2.7", "vm1")))
    with caplog.at_level(logging.WARNING):
        index.workload_event(ADDED, external_workload("vm1", identity=identity))
    assert eps(index.by_address(VIP, 80)) == []
    assert any("workload=shop/vm1" in r.getMessage() for r in caplog.records)
