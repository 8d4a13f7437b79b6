"""The embedded cluster's service proxy, as rules: Services and EndpointSlices in,
one nftables ruleset out (kube-proxy's nftables mode, cut down to one node).

No I/O here: localcluster.serviceproxyrun watches the API server's store and loads
`ruleset()` into the node's network namespace with ``nft -f``, and writes the
LoadBalancer ingress `load_balancer_status()` computes.

What the ruleset does, in table ``ip meshgate-services`` (localcluster.wan owns the
other table of the node, ``ip meshgate``):

- a ClusterIP:port DNATs to one of the port's ready endpoints, chosen at random
  per connection (``numgen random mod N``, as kube-proxy does);
- a NodePort DNATs the same way when addressed to any of the node's own addresses
  (``fib daddr type local``; the bridge address, and the WAN address with
  --multicluster);
- a LoadBalancer ingress IP:port (the embedded cluster writes the ingress itself:
  the node's WAN address with --multicluster, else its bridge address) likewise,
  and so does each of the Service's ``externalIPs``;
- pods on the bridge reach each other by ClusterIP only if the answer comes back
  through the node, so a pod's connection to a Service is masqueraded to the
  node's bridge address on its way out to the endpoint (kube-proxy's
  mark-for-masquerade; it covers hairpin traffic, a pod reaching itself, too).
  br_netfilter would also catch answers that cross the bridge directly, but it
  is a kernel module not every machine loads, and it does not help hairpin.
  Traffic from outside the pod network keeps its source: the endpoint answers
  through its default route, the node.

A port without ready endpoints gets no rule: its ClusterIP stays unrouted on the
node, so a connection fails at once. ``sessionAffinity`` is ignored (every
connection picks anew), as is ``externalTrafficPolicy``: there is one node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

TABLE = "meshgate-services"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PROTOCOLS = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}


@dataclass(frozen=True, order=True)
class Backend:
    ip: str
    port: int


@dataclass(frozen=True)
class ServicePort:
    """One port of one Service, with where its traffic goes."""

    namespace: str
    service: str
    port_name: str
    protocol: str
    """TCP, UDP or SCTP, as the Service writes it."""
    cluster_ip: str | None
    port: int
    node_port: int | None
    ingress_ips: tuple[str, ...]
    """A LoadBalancer's ingress and the Service's ``externalIPs``: DNATed as the
    ClusterIP is."""
    backends: tuple[Backend, ...]

    @property
    def label(self) -> str:
        """namespace/name:port, as comments and logs name it."""
        return f"{self.namespace}/{self.service}:{self.port_name or self.port}"

    @property
    def chain(self) -> str:
        return f"svc-{_digest(f'{self.label}/{self.protocol}')}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _ready(endpoint: Mapping[str, Any]) -> bool:
    """kube-proxy's reading: a missing ``ready`` counts as ready; a terminating
    endpoint is not used for new connections."""
    conditions = endpoint.get("conditions") or {}
    return conditions.get("ready") is not False and conditions.get("terminating") is not True


def _ipv4(text: Any) -> str | None:
    try:
        return str(IPv4Address(str(text)))
    except ValueError:
        return None


def service_ports(services: Iterable[Mapping[str, Any]],
                  slices: Iterable[Mapping[str, Any]]) -> list[ServicePort]:
    """Every port of every Service that the proxy serves, in a stable order.

    Headless Services (``clusterIP: None``) and ExternalName Services have no virtual
    IP and are left to DNS, as kube-proxy leaves them. A Service port takes the
    endpoints of its Service's IPv4 slices whose port has the same name and
    protocol."""
    by_service: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for s in slices:
        meta = s.get("metadata") or {}
        owner = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if owner and s.get("addressType", "IPv4") == "IPv4":
            by_service.setdefault((meta.get("namespace", ""), owner), []).append(s)
    out: list[ServicePort] = []
    for svc in services:
        meta, spec = svc.get("metadata") or {}, svc.get("spec") or {}
        kind = spec.get("type", "ClusterIP")
        cluster_ip = _ipv4(spec.get("clusterIP"))
        if kind == "ExternalName" or cluster_ip is None:
            continue
        ns, name = meta.get("namespace", ""), meta.get("name", "")
        lb = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        ingress = tuple(dict.fromkeys(ip for ip in (
            *(_ipv4(i.get("ip")) for i in (lb if kind == "LoadBalancer" else [])),
            *(_ipv4(a) for a in spec.get("externalIPs") or [])) if ip is not None))
        for sp in spec.get("ports") or []:
            protocol = str(sp.get("protocol", "TCP"))
            if protocol not in PROTOCOLS:
                continue
            port_name = str(sp.get("name", ""))
            backends = _backends(by_service.get((ns, name), []), port_name, protocol)
            node_port = sp.get("nodePort") if kind in ("NodePort", "LoadBalancer") else None
            out.append(ServicePort(
                namespace=ns, service=name, port_name=port_name, protocol=protocol,
                cluster_ip=cluster_ip, port=int(sp["port"]),
                node_port=int(node_port) if node_port else None, ingress_ips=ingress,
                backends=tuple(backends)))
    return sorted(out, key=lambda p: (p.namespace, p.service, p.port, p.protocol))


def _backends(slices: Iterable[Mapping[str, Any]], port_name: str, protocol: str
              ) -> list[Backend]:
    """The ready endpoints of one Service port across its slices (an endpoint's first
    address, as kube-proxy takes it), without duplicates, in order."""
    out: set[Backend] = set()
    for s in slices:
        for p in s.get("ports") or []:
            if (str(p.get("name", "")) != port_name or not p.get("port")
                    or str(p.get("protocol", "TCP")) != protocol):
                continue
            for ep in s.get("endpoints") or []:
                ip = _ipv4((ep.get("addresses") or [None])[0])
                if ip is not None and _ready(ep):
                    out.add(Backend(ip, int(p["port"])))
    return sorted(out)


def ruleset(ports: Iterable[ServicePort], *, pod_cidr: IPv4Network, bridge: str) -> str:
    """The whole table, as one ``nft -f`` transaction that replaces whatever an earlier
    load left (declaring the table first makes the delete valid the first time)."""
    lines = [f"table ip {TABLE} {{}}", f"delete table ip {TABLE}", f"table ip {TABLE} {{",
             "  chain nat-prerouting {",
             "    type nat hook prerouting priority dstnat; policy accept;",
             "    jump services",
             "  }",
             "  chain nat-output {",
             "    type nat hook output priority -100; policy accept;",
             "    jump services",
             "  }",
             "  chain nat-postrouting {",
             "    type nat hook postrouting priority srcnat; policy accept;",
             f"    ip saddr {pod_cidr} oifname \"{bridge}\" ct status dnat masquerade",
             "  }"]
    dispatch: list[str] = []
    chains: list[str] = []
    for p in ports:
        if not p.backends:
            continue
        proto = PROTOCOLS[p.protocol]
        comment = f"comment \"{p.label}\""
        if p.cluster_ip is not None:
            dispatch.append(f"    ip daddr {p.cluster_ip} {proto} dport {p.port} "
                            f"goto {p.chain} {comment}")
        for ip in p.ingress_ips:
            dispatch.append(f"    ip daddr {ip} {proto} dport {p.port} goto {p.chain} {comment}")
        if p.node_port is not None:
            dispatch.append(f"    fib daddr type local ip daddr != 127.0.0.0/8 {proto} dport "
                            f"{p.node_port} goto {p.chain} {comment}")
        chains.extend(_service_chain(p, proto))
    lines += ["  chain services {", *dispatch, "  }", *chains, "}"]
    return "\n".join(lines) + "\n"


def _service_chain(p: ServicePort, proto: str) -> list[str]:
    out = [f"  chain {p.chain} {{"]
    if len(p.backends) == 1:
        b = p.backends[0]
        out.append(f"    meta l4proto {proto} dnat to {b.ip}:{b.port}")
    else:
        choices = ", ".join(f"{i} : {b.ip} . {b.port}" for i, b in enumerate(p.backends))
        out.append(f"    meta l4proto {proto} dnat to numgen random mod {len(p.backends)} "
                   f"map {{ {choices} }}")
    out.append("  }")
    return out


def load_balancer_status(svc: Mapping[str, Any], address: str) -> dict[str, Any] | None:
    """The status to write on a LoadBalancer Service so that its ingress is `address`
    (the node's), as a cloud's load-balancer controller would; None: nothing to write
    (not a LoadBalancer, or already so)."""
    spec = svc.get("spec") or {}
    if spec.get("type") != "LoadBalancer":
        return None
    want = {"ingress": [{"ip": address}]}
    current = (svc.get("status") or {}).get("loadBalancer") or {}
    if [i.get("ip") for i in current.get("ingress") or []] == [address]:
        return None
    return {"loadBalancer": want}
