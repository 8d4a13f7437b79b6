"""The VM's mesh names without sockets: queries go through MeshNames.answer and
the replies are checked after a round trip through wire format."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import pytest

from mesh.dns import Forward, Reply, udp_wire
from mesh.errors import ConfigError, DiscoveryError
from vm_agent.dns import MeshDnsServer, MeshNames

WEB = "web.default.svc.cluster.local"


def names() -> MeshNames:
    table = MeshNames("cluster.local")
    table.set(WEB, ["10.96.0.12"])
    table.set("web-west.default.svc.cluster.local", ["10.96.0.40", "fd00::40"])
    return table


def ask(table: MeshNames, name: str, rdtype: str = "A") -> dns.message.Message:
    request = dns.message.make_query(name, rdtype)
    decision = table.answer(request)
    assert isinstance(decision, Reply)
    return dns.message.from_wire(udp_wire(decision.response, request))


def addresses(response: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in response.answer for rd in rrset)


def assert_negative(response: dns.message.Message, rcode: dns.rcode.Rcode) -> None:
    assert response.rcode() == rcode and response.flags & dns.flags.AA
    assert response.answer == []
    (soa,) = response.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.name == dns.name.from_text("cluster.local")


def test_known_names_get_their_addresses_with_a_five_second_ttl() -> None:
    table = names()
    response = ask(table, WEB)
    assert response.rcode() == dns.rcode.NOERROR and response.flags & dns.flags.AA
    assert addresses(response) == ["10.96.0.12"] and response.answer[0].ttl == 5
    assert addresses(ask(table, "WEB-west.Default.svc.cluster.local.", "AAAA")) == ["fd00::40"]
    assert addresses(ask(table, "web-west.default.svc.cluster.local")) == ["10.96.0.40"]


def test_unknown_names_in_the_domain_are_nxdomain_and_missing_types_nodata() -> None:
    table = names()
    assert_negative(ask(table, "nope.default.svc.cluster.local"), dns.rcode.NXDOMAIN)
    assert_negative(ask(table, "web.other.svc.cluster.local"), dns.rcode.NXDOMAIN)
    # The search list makes glibc try outside names under the domain: answered here.
    assert_negative(ask(table, "example.com.default.svc.cluster.local"), dns.rcode.NXDOMAIN)
    assert_negative(ask(table, "x.pod.cluster.local"), dns.rcode.NXDOMAIN)
    assert_negative(ask(table, WEB, "AAAA"), dns.rcode.NOERROR)
    assert_negative(ask(table, "default.svc.cluster.local"), dns.rcode.NOERROR)
    assert_negative(ask(table, "svc.cluster.local"), dns.rcode.NOERROR)


def test_names_outside_the_domain_are_forwarded_and_inside_never() -> None:
    table = names()
    for name in ("example.com", "cluster.local.example.com", "local"):
        assert isinstance(table.answer(dns.message.make_query(name, "A")), Forward)
    for name in (WEB, "anything.cluster.local", "cluster.local"):
        assert isinstance(table.answer(dns.message.make_query(name, "A")), Reply)


def test_set_replaces_and_remove_makes_a_name_nxdomain() -> None:
    table = names()
    table.set(WEB, ["10.96.0.13", "10.96.0.13"])
    assert addresses(ask(table, WEB)) == ["10.96.0.13"]
    serial = table.zone.serial
    table.set(WEB, ["10.96.0.13"])
    assert table.zone.serial == serial  # nothing changed: negative caches keep their SOA
    table.set(WEB, [])
    assert_negative(ask(table, WEB), dns.rcode.NOERROR)
    table.remove(WEB)
    table.remove(WEB)
    assert_negative(ask(table, WEB), dns.rcode.NXDOMAIN)
    assert table.table() == {"web-west.default.svc.cluster.local": ("10.96.0.40", "fd00::40")}


def test_another_cluster_domain() -> None:
    table = MeshNames("corp.internal")
    table.set("db.prod.svc.corp.internal", ["10.0.0.5"])
    assert addresses(ask(table, "db.prod.svc.corp.internal")) == ["10.0.0.5"]
    assert isinstance(table.answer(dns.message.make_query(WEB, "A")), Forward)


@pytest.mark.parametrize("name, ips", [
    ("web.example.com", ["10.0.0.1"]),
    ("cluster.local", ["10.0.0.1"]),
    ("svc.cluster.local", ["10.0.0.1"]),
    (WEB, ["not-an-ip"]),
])
def test_bad_names_and_addresses_are_discovery_errors(name: str, ips: list[str]) -> None:
    with pytest.raises(DiscoveryError, match=r"control plane|only the cluster"):
        MeshNames().set(name, ips)


def test_the_server_refuses_itself_as_upstream() -> None:
    with pytest.raises(ConfigError, match="itself"):
        MeshDnsServer(MeshNames(), ("127.0.0.153", 53), upstreams=[("127.0.0.153", 53)])
