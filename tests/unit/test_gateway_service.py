"""`multicluster link` finds the exporting cluster's gateway from its Service, as Linkerd's
link does: the load balancer's ingress, else externalIPs, else the nodes' addresses with
the node ports; each miss is named, with the flag that overrides it."""

from __future__ import annotations

from typing import Any

import pytest

from mirror.gatewayservice import NoGatewayAddress, gateway_address, node_addresses


def gateway(kind: str = "LoadBalancer", *, ingress: list[dict[str, str]] | None = None,
            external: list[str] | None = None, node_ports: bool = True,
            names: tuple[str, str] = ("mc-gateway", "mc-probe")) -> dict[str, Any]:
    ports = [{"name": names[0], "port": 4143, "targetPort": 4143},
             {"name": names[1], "port": 4191, "targetPort": 4191}]
    if node_ports:
        ports[0]["nodePort"], ports[1]["nodePort"] = 31143, 31191
    spec: dict[str, Any] = {"type": kind, "ports": ports}
    if external:
        spec["externalIPs"] = external
    return {"metadata": {"namespace": "meshgate", "name": "meshgate-gateway"}, "spec": spec,
            "status": {"loadBalancer": {"ingress": ingress or []}}}


def node(*addresses: tuple[str, str]) -> dict[str, Any]:
    return {"status": {"addresses": [{"type": t, "address": a} for t, a in addresses]}}


def test_the_load_balancer_ingress_comes_first() -> None:
    found = gateway_address(gateway(ingress=[{"ip": "203.0.113.5"},
                                             {"hostname": "gw.example.com"}],
                                    external=["198.51.100.1"]))
    assert found.addresses == ("203.0.113.5", "gw.example.com")
    assert (found.port, found.probe_port) == (4143, 4191)
    assert found.source == "its load balancer's ingress"


def test_external_ips_without_an_ingress() -> None:
    found = gateway_address(gateway("ClusterIP", external=["198.51.100.1"], node_ports=False))
    assert found.addresses == ("198.51.100.1",) and found.port == 4143


def test_node_ports_with_the_nodes_addresses() -> None:
    nodes = [node(("InternalIP", "172.18.0.2")),
             node(("InternalIP", "172.18.0.3"), ("ExternalIP", "203.0.113.9"))]
    found = gateway_address(gateway("NodePort"), nodes)
    assert found.addresses == ("172.18.0.2", "203.0.113.9")
    assert (found.port, found.probe_port) == (31143, 31191)
    # A LoadBalancer whose ingress has not come yet is reached on its node ports too.
    assert gateway_address(gateway(), nodes).port == 31143


def test_node_addresses_are_each_nodes_once() -> None:
    assert node_addresses([node(("Hostname", "n1"), ("InternalIP", "10.0.0.1")),
                           node(("InternalIP", "10.0.0.1"))]) == ("10.0.0.1",)


@pytest.mark.parametrize(("service", "nodes", "message"), [
    (gateway("ClusterIP", node_ports=False), [], "ClusterIP) has no load-balancer ingress, "
     "no externalIPs and no node ports"),
    (gateway("NodePort"), [], "NodePort without an ingress and no node has an address"),
    (gateway(names=("gateway", "mc-probe")), [], "no port named mc-gateway"),
])
def test_what_is_missing_is_named_with_the_override(service: dict[str, Any],
                                                    nodes: list[dict[str, Any]],
                                                    message: str) -> None:
    with pytest.raises(NoGatewayAddress, match="--gateway-address") as caught:
        gateway_address(service, nodes)
    assert message in str(caught.value)
