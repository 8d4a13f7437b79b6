"""Where other clusters reach a cluster's gateway, read from its gateway Service, as
`linkerd multicluster link` reads `linkerd-gateway`: the Service
``meshgate/meshgate-gateway`` with the ports named ``mc-gateway`` (mTLS) and
``mc-probe`` (the probe's HTTP). Its addresses are, in this order, the load
balancer's ingress (IPs or host names), the Service's ``externalIPs``, or, for a
NodePort (or a LoadBalancer without an ingress yet), the nodes' addresses with the
node ports. No I/O here: the caller reads the Service and, when needed, the Nodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mesh.errors import ConfigError
from mesh.identity.names import GATEWAY_SERVICE_ACCOUNT

NAMESPACE = "meshgate"
NAME = GATEWAY_SERVICE_ACCOUNT
"""The gateway's Service is named as its ServiceAccount: ``meshgate-gateway``."""
GATEWAY_PORT_NAME = "mc-gateway"
PROBE_PORT_NAME = "mc-probe"


class NoGatewayAddress(ConfigError):
    """The gateway Service gives no address another cluster could reach."""


@dataclass(frozen=True)
class GatewayAddress:
    addresses: tuple[str, ...]
    port: int
    probe_port: int
    source: str
    """Where the addresses came from, for the message that says so."""


def gateway_address(service: Mapping[str, Any],
                    nodes: Sequence[Mapping[str, Any]] | None = None) -> GatewayAddress:
    """The gateway's addresses and ports from its Service; `nodes` (the cluster's Node
    objects) are read only when the Service has neither an ingress nor external IPs.

    Raises `NoGatewayAddress` naming what is missing and the flag that overrides it.
    """
    spec = service.get("spec") or {}
    ports = {str(p.get("name") or ""): p for p in spec.get("ports") or []}
    missing = [n for n in (GATEWAY_PORT_NAME, PROBE_PORT_NAME) if n not in ports]
    if missing:
        raise NoGatewayAddress(
            f"the gateway Service {NAMESPACE}/{NAME} has no port named "
            f"{' or '.join(missing)}; name its mTLS port {GATEWAY_PORT_NAME} and its probe "
            f"port {PROBE_PORT_NAME}, or give --gateway-address and the ports")
    gateway, probe = ports[GATEWAY_PORT_NAME], ports[PROBE_PORT_NAME]
    ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    found = [str(i.get("ip") or i.get("hostname")) for i in ingress
             if i.get("ip") or i.get("hostname")]
    if found:
        return GatewayAddress(tuple(found), int(gateway["port"]), int(probe["port"]),
                              "its load balancer's ingress")
    external = [str(a) for a in spec.get("externalIPs") or []]
    if external:
        return GatewayAddress(tuple(external), int(gateway["port"]), int(probe["port"]),
                              "its externalIPs")
    kind = spec.get("type") or "ClusterIP"
    if kind in ("NodePort", "LoadBalancer") and gateway.get("nodePort") and \
            probe.get("nodePort"):
        addresses = node_addresses(nodes or ())
        if addresses:
            return GatewayAddress(addresses, int(gateway["nodePort"]), int(probe["nodePort"]),
                                  "the nodes' addresses and its node ports")
        raise NoGatewayAddress(
            f"the gateway Service {NAMESPACE}/{NAME} is a {kind} without an ingress and no "
            "node has an address; give --gateway-address")
    raise NoGatewayAddress(
        f"the gateway Service {NAMESPACE}/{NAME} ({kind}) has no load-balancer ingress, no "
        "externalIPs and no node ports, so no other cluster can reach it; make it a "
        "LoadBalancer or NodePort Service, or give --gateway-address")


def node_addresses(nodes: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """Each node's ExternalIP, or its InternalIP where it has none (kind's nodes)."""
    out: list[str] = []
    for node in nodes:
        by_type: dict[str, str] = {}
        for address in (node.get("status") or {}).get("addresses") or []:
            by_type.setdefault(str(address.get("type")), str(address.get("address")))
        chosen = by_type.get("ExternalIP") or by_type.get("InternalIP")
        if chosen and chosen not in out:
            out.append(chosen)
    return tuple(out)
