"""ThroughGateway: a VM's proxy reaches every meshed pod through the home gateway,
told the service's name and port; what already goes through a gateway is kept and
what is outside the mesh is dropped."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import yaml

from mesh.identity.names import Identity
from mesh.proxy.assertion import peer_header
from mesh.proxy.discovery import ServiceSpec, StaticDiscovery
from mesh.proxy.pool import Pool
from mesh.proxy.through_gateway import ThroughGateway, through_gateway
from mesh.structs import convert

DOMAIN = "cluster.local"
GATEWAY = Identity("multicluster", "gateway", DOMAIN).dns_name
LINKED = Identity("multicluster", "gateway", "west.local").dns_name
WEB = Identity("default", "web", DOMAIN).dns_name
GW = "203.0.113.5:4143"


def pod(address: str, *, meshed: bool = True, priority: int = 0, weight: int = 1
        ) -> dict[str, Any]:
    return {"address": address, "targetPort": 8080, "priority": priority, "weight": weight,
            **({"identity": WEB} if meshed else {})}


def spec(name: str, address: str, *endpoints: dict[str, Any]) -> dict[str, Any]:
    return {"name": f"{name}.default.svc.{DOMAIN}", "address": address,
            "endpoints": list(endpoints)}


def write(path: Path, *services: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"services": list(services)}))
    return path


def test_meshed_pods_become_one_gateway_endpoint_named_for_the_service() -> None:
    svc = convert(spec(
        "web", "10.96.0.12:80", pod("10.0.1.5:4143", weight=2), pod("10.0.1.6:4143", weight=3),
        pod("10.0.1.7:4143", priority=1)), ServiceSpec)
    [ep] = through_gateway(svc, address=GW, identity=GATEWAY).endpoints
    assert (ep.address, ep.target_port, ep.identity, ep.authority, ep.cluster) == \
        (GW, 80, GATEWAY, "web.default.svc.cluster.local", "")
    assert (ep.weight, ep.priority) == (6, 0)


def test_linked_gateways_stay_and_unmeshed_endpoints_go() -> None:
    linked = {"address": "198.51.100.9:4143", "targetPort": 80, "identity": LINKED,
              "authorityOverride": "web.default.svc.cluster.local", "priority": 1,
              "cluster": "west"}
    svc = convert(spec("web", "10.96.0.12:80", pod("10.0.1.5:4143"),
                                          pod("10.0.1.8:8080", meshed=False), linked), ServiceSpec)
    out = through_gateway(svc, address=GW, identity=GATEWAY).endpoints
    assert [(ep.address, ep.identity, ep.priority) for ep in out] == \
        [(GW, GATEWAY, 0), ("198.51.100.9:4143", LINKED, 1)]
    assert out[1] == svc.endpoints[2]
    only_linked = convert(spec("web", "10.96.0.12:80", linked), ServiceSpec)
    assert through_gateway(only_linked, address=GW, identity=GATEWAY) is only_linked
    unmeshed = convert(spec("db", "10.96.0.13:5432",
                                               pod("10.0.1.9:5432", meshed=False)), ServiceSpec)
    assert through_gateway(unmeshed, address=GW, identity=GATEWAY).endpoints == []


def test_lookups_and_subscribers_see_the_rewritten_services(tmp_path: Path) -> None:
    path = write(tmp_path / "services.yaml",
                 spec("web", "10.96.0.12:80", pod("10.0.1.5:4143")),
                 spec("api", "10.96.0.14:8080", pod("10.0.1.6:4143")))
    inner = StaticDiscovery.load(path)
    discovery = ThroughGateway(inner, address=GW, identity=GATEWAY)
    seen: list[ServiceSpec] = []
    discovery.subscribe(seen.append)

    web = discovery.resolve(("10.96.0.12", 80))
    assert web is not None and [ep.address for ep in web.endpoints] == [GW]
    assert discovery.resolve(("10.96.0.12", 80)) is web  # rewritten once, not per call
    assert discovery.resolve_name("api.default.svc.cluster.local:8080") == \
        discovery.resolve(("10.96.0.14", 8080))
    assert discovery.resolve(("10.96.0.99", 80)) is None
    assert sorted(s.name for s in discovery.services()) == [
        "api.default.svc.cluster.local", "web.default.svc.cluster.local"]

    write(path, spec("web", "10.96.0.12:80", pod("10.0.1.5:4143"),
                     pod("10.0.1.8:80", meshed=False)))
    assert inner.reload()
    by_name = {s.name: s for s in seen}
    assert [ep.address for ep in by_name["web.default.svc.cluster.local"].endpoints] == [GW]
    assert by_name["api.default.svc.cluster.local"].endpoints == []  # removed
    assert discovery.resolve(("10.96.0.14", 8080)) is None


def test_the_transport_header_and_pool_key_name_the_service() -> None:
    """The gateway routes a whole connection by the header's name and port, so a
    pooled connection must never carry another service's requests."""
    web = through_gateway(convert(spec("web", "10.96.0.12:80", pod("10.0.1.5:4143")),
                                  ServiceSpec), address=GW, identity=GATEWAY)
    api = through_gateway(convert(spec("api", "10.96.0.14:80", pod("10.0.1.6:4143")),
                                  ServiceSpec), address=GW, identity=GATEWAY)
    header = peer_header(ssl.create_default_context, web.endpoints[0], web)
    assert (header.name, header.port) == ("web.default.svc.cluster.local", 80)
    assert Pool.key(web, web.endpoints[0]) != Pool.key(api, api.endpoints[0])
    assert Pool.key(web, web.endpoints[0])[-1] == "web.default.svc.cluster.local"
