"""The embedded cluster's service proxy rules: Services and EndpointSlices in, one
nftables table out (localcluster.serviceproxy), and the LoadBalancer ingress it
writes."""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any

from localcluster.serviceproxy import (
    TABLE,
    Backend,
    load_balancer_status,
    ruleset,
    service_ports,
)

POD_CIDR = IPv4Network("10.244.0.0/16")


def svc(name: str, *, kind: str = "ClusterIP", ip: str | None = "10.96.0.10",
        ports: list[dict[str, Any]] | None = None, ingress: tuple[str, ...] = (),
        ns: str = "default") -> dict[str, Any]:
    spec: dict[str, Any] = {"type": kind, "ports": ports or [
        {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    if ip is not None:
        spec["clusterIP"] = ip
    out: dict[str, Any] = {"metadata": {"namespace": ns, "name": name}, "spec": spec}
    if ingress:
        out["status"] = {"loadBalancer": {"ingress": [{"ip": i} for i in ingress]}}
    return out


def eps(service: str, *endpoints: tuple[str, bool | None], port: int = 8080,
        port_name: str = "http", ns: str = "default", protocol: str = "TCP",
        name: str = "") -> dict[str, Any]:
    out = []
    for address, ready in endpoints:
        ep: dict[str, Any] = {"addresses": [address]}
        if ready is not None:
            ep["conditions"] = {"ready": ready}
        out.append(ep)
    return {"metadata": {"namespace": ns, "name": name or f"{service}-x",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "endpoints": out,
            "ports": [{"name": port_name, "port": port, "protocol": protocol}]}


def rules_for(services: list[dict[str, Any]], slices: list[dict[str, Any]]) -> str:
    return ruleset(service_ports(services, slices), pod_cidr=POD_CIDR, bridge="mgbr0")


def test_a_cluster_ip_takes_the_ready_endpoints_of_its_named_port() -> None:
    ports = service_ports([svc("web")], [
        eps("web", ("10.244.0.3", True), ("10.244.0.2", None), ("10.244.0.4", False)),
        eps("web", ("10.244.0.9", True), port_name="metrics", name="web-y"),
        eps("other", ("10.244.0.7", True), name="other-x")])
    assert len(ports) == 1
    p = ports[0]
    assert (p.cluster_ip, p.port, p.protocol, p.label) == (
        "10.96.0.10", 80, "TCP", "default/web:http")
    # A missing ready condition counts as ready (kube-proxy); not-ready is left out.
    assert p.backends == (Backend("10.244.0.2", 8080), Backend("10.244.0.3", 8080))


def test_a_terminating_endpoint_takes_no_new_connections() -> None:
    sl = eps("web", ("10.244.0.2", True))
    sl["endpoints"][0]["conditions"]["terminating"] = True
    assert service_ports([svc("web")], [sl])[0].backends == ()


def test_headless_and_external_name_services_are_left_to_dns() -> None:
    assert service_ports([svc("h", ip="None"), svc("e", kind="ExternalName", ip=None)],
                         [eps("h", ("10.244.0.2", True))]) == []


def test_endpoints_split_across_slices_are_joined_without_duplicates() -> None:
    ports = service_ports([svc("web")], [eps("web", ("10.244.0.2", True), name="a"),
                                         eps("web", ("10.244.0.3", True),
                                             ("10.244.0.2", True), name="b")])
    assert [b.ip for b in ports[0].backends] == ["10.244.0.2", "10.244.0.3"]


def test_the_table_replaces_itself_in_one_transaction() -> None:
    text = rules_for([], [])
    lines = text.splitlines()
    assert lines[:3] == [f"table ip {TABLE} {{}}", f"delete table ip {TABLE}",
                         f"table ip {TABLE} {{"]
    assert "type nat hook prerouting priority dstnat; policy accept;" in text
    assert "type nat hook output priority -100; policy accept;" in text
    # Pod to Service to pod on the same bridge: the answer must come back through the
    # node, so the source is masqueraded.
    assert ('ip saddr 10.244.0.0/16 oifname "mgbr0" ct status dnat masquerade' in text)


def test_one_endpoint_is_a_plain_dnat_several_a_random_choice() -> None:
    one = rules_for([svc("web")], [eps("web", ("10.244.0.2", True))])
    assert ('ip daddr 10.96.0.10 tcp dport 80 goto svc-' in one
            and 'comment "default/web:http"' in one)
    assert "meta l4proto tcp dnat to 10.244.0.2:8080" in one
    two = rules_for([svc("web")], [eps("web", ("10.244.0.2", True), ("10.244.0.3", True))])
    assert ("meta l4proto tcp dnat to numgen random mod 2 map "
            "{ 0 : 10.244.0.2 . 8080, 1 : 10.244.0.3 . 8080 }") in two


def test_a_port_without_endpoints_gets_no_rule() -> None:
    text = rules_for([svc("web")], [eps("web", ("10.244.0.2", False))])
    assert "10.96.0.10" not in text and "svc-" not in text


def test_node_ports_match_every_local_address_but_loopback() -> None:
    text = rules_for([svc("web", kind="NodePort", ports=[
        {"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}])],
        [eps("web", ("10.244.0.2", True))])
    assert "fib daddr type local ip daddr != 127.0.0.0/8 tcp dport 30080 goto svc-" in text


def test_a_load_balancer_dnats_its_ingress_and_its_node_port() -> None:
    text = rules_for([svc("gw", kind="LoadBalancer", ingress=["172.30.0.2"], ports=[
        {"name": "mc-gateway", "port": 4143, "nodePort": 31000, "protocol": "TCP"}])],
        [eps("gw", ("10.244.0.5", True), port=4143, port_name="mc-gateway")])
    assert "ip daddr 172.30.0.2 tcp dport 4143 goto svc-" in text
    assert "tcp dport 31000 goto svc-" in text
    assert "dnat to 10.244.0.5:4143" in text


def test_udp_ports_are_udp_rules_and_chains_differ_by_protocol() -> None:
    dns = svc("dns", ports=[{"name": "dns", "port": 53, "protocol": "UDP"},
                            {"name": "dns-tcp", "port": 53, "protocol": "TCP"}])
    text = rules_for([dns], [eps("dns", ("10.244.0.2", True), port=53, port_name="dns",
                                 protocol="UDP"),
                             eps("dns", ("10.244.0.2", True), port=53, port_name="dns-tcp",
                                 name="dns-y")])
    assert "udp dport 53" in text and "tcp dport 53" in text
    assert "meta l4proto udp dnat to 10.244.0.2:53" in text
    chains = [line.split()[1] for line in text.splitlines()
              if line.strip().startswith("chain svc-")]
    assert len(chains) == len(set(chains)) == 2


def test_load_balancer_status_is_written_once_with_the_node_address() -> None:
    lb = svc("gw", kind="LoadBalancer")
    assert load_balancer_status(lb, "172.30.0.2") == {
        "loadBalancer": {"ingress": [{"ip": "172.30.0.2"}]}}
    assert load_balancer_status(svc("gw", kind="LoadBalancer", ingress=["172.30.0.2"]),
                                "172.30.0.2") is None
    assert load_balancer_status(svc("gw", kind="LoadBalancer", ingress=["10.0.0.1"]),
                                "172.30.0.2") is not None
    assert load_balancer_status(svc("web"), "172.30.0.2") is None


def test_external_ips_are_dnated_as_the_cluster_ip() -> None:
    control = svc("control", ports=[{"name": "grpc", "port": 8086, "protocol": "TCP"}])
    control["spec"]["externalIPs"] = ["10.244.0.1", "172.30.0.2", "not-an-ip"]
    text = rules_for([control], [eps("control", ("10.244.0.7", True), port=8086,
                                     port_name="grpc")])
    assert "ip daddr 10.244.0.1 tcp dport 8086 goto svc-" in text
    assert "ip daddr 172.30.0.2 tcp dport 8086 goto svc-" in text
    # Not a LoadBalancer: a stale ingress in its status is no address of it.
    web = svc("web", ingress=("172.30.0.9",))
    assert "172.30.0.9" not in rules_for([web], [eps("web", ("10.244.0.2", True))])
