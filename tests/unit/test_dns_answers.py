"""The cluster DNS answer logic without sockets: Services and EndpointSlices as
plain dicts go into a ClusterZone, queries go through `respond`, and the
responses are checked after a round trip through wire format."""

from __future__ import annotations

import logging
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from localcluster.dnszone import ClusterZone
from mesh.dns import Forward, Malformed, Reply, decode_request, parse_address, respond, udp_wire
from mesh.dnsserver import Complaints
from mesh.errors import ConfigError
from mesh.informer import ADDED, DELETED, MODIFIED

D = "svc.cluster.local"


def service(name: str, ns: str = "default", *, ip: str | list[str] = "10.96.0.10",
            ports: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    ips = ip if isinstance(ip, list) else [ip]
    body: dict[str, Any] = {"type": "ClusterIP", "clusterIP": ips[0], "clusterIPs": ips,
                            "ports": ports or [{"port": 80, "protocol": "TCP"}], **spec}
    return {"metadata": {"name": name, "namespace": ns}, "spec": body}


def endpoint_slice(name: str, svc: str, ns: str = "default", *,
                   endpoints: list[tuple[str, bool | None]], kind: str = "IPv4"
                   ) -> dict[str, Any]:
    eps = [{"addresses": [ip], "conditions": {} if ready is None else {"ready": ready}}
           for ip, ready in endpoints]
    return {"metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": kind, "endpoints": eps}


def zone_with(*services: dict[str, Any]) -> ClusterZone:
    zone = ClusterZone("cluster.local")
    for obj in services:
        zone.on_service(ADDED, obj)
    return zone


def ask(zone: ClusterZone, name: str, rdtype: str = "A", *, synced: bool = True,
        forwarding: bool = False) -> dns.message.Message:
    request = dns.message.make_query(name, rdtype)
    decision = respond(zone, request, synced=synced, forwarding=forwarding)
    assert isinstance(decision, Reply)
    return dns.message.from_wire(udp_wire(decision.response, request))


def records(response: dns.message.Message, section: str = "answer") -> list[str]:
    rrsets: list[dns.rrset.RRset] = getattr(response, section)
    return sorted(f"{dns.rdatatype.to_text(r.rdtype)} {rd.to_text()}" for r in rrsets for rd in r)


def assert_negative(response: dns.message.Message, rcode: dns.rcode.Rcode) -> None:
    assert response.rcode() == rcode
    assert response.answer == []
    (soa,) = response.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.ttl == 5
    assert soa.name == dns.name.from_text("cluster.local")


def test_a_record_is_the_cluster_ip_with_a_five_second_ttl() -> None:
    response = ask(zone_with(service("web")), f"web.default.{D}")
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert records(response) == ["A 10.96.0.10"]
    assert response.answer[0].ttl == 5


def test_names_are_case_insensitive_and_the_question_case_is_kept() -> None:
    response = ask(zone_with(service("web")), "WEB.Default.SVC.cluster.LOCAL")
    assert records(response) == ["A 10.96.0.10"]
    assert response.answer[0].name.to_text() == "WEB.Default.SVC.cluster.LOCAL."


def test_aaaa_of_an_ipv4_service_is_nodata_and_ipv6_services_get_aaaa() -> None:
    zone = zone_with(service("web"), service("six", ip="fd00:10:96::a"),
                     service("dual", ip=["10.96.0.11", "fd00:10:96::b"]))
    assert_negative(ask(zone, f"web.default.{D}", "AAAA"), dns.rcode.NOERROR)
    assert records(ask(zone, f"six.default.{D}", "AAAA")) == ["AAAA fd00:10:96::a"]
    assert_negative(ask(zone, f"six.default.{D}", "A"), dns.rcode.NOERROR)
    assert records(ask(zone, f"dual.default.{D}", "A")) == ["A 10.96.0.11"]
    assert records(ask(zone, f"dual.default.{D}", "AAAA")) == ["AAAA fd00:10:96::b"]
    assert records(ask(zone, f"dual.default.{D}", "ANY")) == ["A 10.96.0.11",
                                                              "AAAA fd00:10:96::b"]


def test_srv_for_named_ports_with_the_address_in_the_additional_section() -> None:
    zone = zone_with(service("web", ports=[{"name": "http", "port": 80, "protocol": "TCP"},
                                           {"name": "dns", "port": 53, "protocol": "UDP"},
                                           {"port": 9090, "protocol": "TCP"}]))
    response = ask(zone, f"_http._tcp.web.default.{D}", "SRV")
    assert records(response) == [f"SRV 0 100 80 web.default.{D}."]
    assert records(response, "additional") == ["A 10.96.0.10"]
    assert records(ask(zone, f"_dns._udp.web.default.{D}", "SRV")) == \
        [f"SRV 0 100 53 web.default.{D}."]
    # The wrong protocol, an unnamed port, an A query at the SRV name:
    assert_negative(ask(zone, f"_dns._tcp.web.default.{D}", "SRV"), dns.rcode.NXDOMAIN)
    assert_negative(ask(zone, f"_9090._tcp.web.default.{D}", "SRV"), dns.rcode.NXDOMAIN)
    assert_negative(ask(zone, f"_http._tcp.web.default.{D}", "A"), dns.rcode.NOERROR)


def test_nxdomain_only_where_no_name_exists_at_or_below() -> None:
    zone = zone_with(service("web", ports=[{"name": "http", "port": 80, "protocol": "TCP"}]))
    for name in ("cluster.local", D, f"default.{D}", f"_tcp.web.default.{D}"):
        assert_negative(ask(zone, name), dns.rcode.NOERROR)
    for name in (f"nope.default.{D}", f"web.other.{D}", f"x.web.default.{D}",
                 "pod.cluster.local", f"_udp.web.default.{D}"):
        assert_negative(ask(zone, name), dns.rcode.NXDOMAIN)
    soa = ask(zone, "cluster.local", "SOA")
    assert records(soa)[0].startswith("SOA ns.dns.cluster.local. hostmaster.cluster.local.")


def test_changes_and_deletions_follow_the_events() -> None:
    zone = zone_with(service("web"), service("db"))
    serial = zone.serial
    zone.on_service(MODIFIED, service("web", ip="10.96.0.99"))
    assert records(ask(zone, f"web.default.{D}")) == ["A 10.96.0.99"]
    zone.on_service(DELETED, service("web"))
    assert_negative(ask(zone, f"web.default.{D}"), dns.rcode.NXDOMAIN)
    assert_negative(ask(zone, f"default.{D}"), dns.rcode.NOERROR)  # db is still there
    zone.on_service(DELETED, service("db"))
    assert_negative(ask(zone, f"default.{D}"), dns.rcode.NXDOMAIN)
    assert zone.serial > serial


def test_headless_services_answer_ready_endpoint_addresses() -> None:
    zone = zone_with(service("db", ip="None"), service("all", ip="None",
                                                       publishNotReadyAddresses=True))
    assert_negative(ask(zone, f"db.default.{D}"), dns.rcode.NOERROR)
    zone.on_endpoint_slice(ADDED, endpoint_slice("db-1", "db", endpoints=[
        ("10.244.0.1", True), ("10.244.0.2", False), ("10.244.0.3", None)]))
    zone.on_endpoint_slice(ADDED, endpoint_slice("db-2", "db", kind="IPv6",
                                                 endpoints=[("fd00::1", True)]))
    zone.on_endpoint_slice(ADDED, endpoint_slice("all-1", "all", endpoints=[
        ("10.244.1.1", True), ("10.244.1.2", False)]))
    assert records(ask(zone, f"db.default.{D}")) == ["A 10.244.0.1", "A 10.244.0.3"]
    assert records(ask(zone, f"db.default.{D}", "AAAA")) == ["AAAA fd00::1"]
    assert records(ask(zone, f"all.default.{D}")) == ["A 10.244.1.1", "A 10.244.1.2"]
    zone.on_endpoint_slice(DELETED, endpoint_slice("db-1", "db", endpoints=[]))
    assert_negative(ask(zone, f"db.default.{D}"), dns.rcode.NOERROR)
    # A slice that arrives before its Service is used once the Service comes.
    zone.on_endpoint_slice(ADDED, endpoint_slice("late-1", "late", endpoints=[
        ("10.244.2.1", True)]))
    zone.on_service(ADDED, service("late", ip="None"))
    assert records(ask(zone, f"late.default.{D}")) == ["A 10.244.2.1"]


def test_external_name_is_a_cname_chased_inside_the_zone() -> None:
    zone = zone_with(service("web"),
                     service("ext", ip="", type="ExternalName", externalName="example.com"),
                     service("alias", ip="", type="ExternalName",
                             externalName=f"web.default.{D}"))
    request = dns.message.make_query(f"ext.default.{D}", "A")
    decision = respond(zone, request, synced=True, forwarding=False)
    assert isinstance(decision, Reply)
    assert records(decision.response) == ["CNAME example.com."]
    assert decision.chase == dns.name.from_text("example.com")
    assert records(ask(zone, f"ext.default.{D}", "CNAME")) == ["CNAME example.com."]
    alias = ask(zone, f"alias.default.{D}")
    assert [r.rdtype for r in alias.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    assert records(alias) == ["A 10.96.0.10", f"CNAME web.default.{D}."]


def test_outside_the_domain_refused_or_forwarded() -> None:
    zone = zone_with(service("web"))
    for name in ("example.com", "cluster.local.example.com", "xcluster.local"):
        assert ask(zone, name).rcode() == dns.rcode.REFUSED
        request = dns.message.make_query(name, "A")
        assert isinstance(respond(zone, request, synced=True, forwarding=True), Forward)
    # Forwarding never applies to the cluster's own names.
    forwarding = ask(zone, f"web.default.{D}", forwarding=True)
    assert records(forwarding) == ["A 10.96.0.10"] and forwarding.flags & dns.flags.RA


def test_servfail_until_synced_so_no_false_nxdomain_is_cached() -> None:
    zone = ClusterZone("cluster.local")
    assert ask(zone, f"web.default.{D}", synced=False).rcode() == dns.rcode.SERVFAIL
    assert ask(zone, "example.com", synced=False).rcode() == dns.rcode.REFUSED


def test_other_opcodes_classes_and_transfers() -> None:
    zone = zone_with(service("web"))
    update = dns.message.make_query(f"web.default.{D}", "A")
    update.set_opcode(dns.opcode.NOTIFY)
    decision = respond(zone, update, synced=True, forwarding=False)
    assert isinstance(decision, Reply) and decision.response.rcode() == dns.rcode.NOTIMP
    assert ask(zone, "cluster.local", "AXFR").rcode() == dns.rcode.REFUSED
    chaos = dns.message.make_query(f"web.default.{D}", "TXT", "CH")
    decision = respond(zone, chaos, synced=True, forwarding=False)
    assert isinstance(decision, Reply) and decision.response.rcode() == dns.rcode.REFUSED
    two = dns.message.make_query(f"web.default.{D}", "A")
    two.question.append(two.question[0])
    decision = respond(zone, two, synced=True, forwarding=False)
    assert isinstance(decision, Reply) and decision.response.rcode() == dns.rcode.FORMERR


def test_services_with_odd_or_missing_fields_are_skipped_not_fatal() -> None:
    zone = zone_with(
        {"metadata": {"name": "bare", "namespace": "default"}},
        service("badip", ip="not-an-ip"),
        service("dotted.name"),
        service("badport", ports=[{"name": "http", "port": "eighty"},
                                  {"name": "has space", "port": 81}]),
        service("ext", ip="", type="ExternalName"),
    )
    assert_negative(ask(zone, f"bare.default.{D}"), dns.rcode.NOERROR)
    assert_negative(ask(zone, f"badip.default.{D}"), dns.rcode.NOERROR)
    assert_negative(ask(zone, f"name.default.{D}"), dns.rcode.NXDOMAIN)
    assert_negative(ask(zone, f"_http._tcp.badport.default.{D}", "SRV"), dns.rcode.NXDOMAIN)
    assert_negative(ask(zone, f"ext.default.{D}"), dns.rcode.NOERROR)


def test_malformed_bytes_are_dropped_or_answered_formerr() -> None:
    assert decode_request(b"\x00\x01") == Malformed("short header")
    query = dns.message.make_query(f"web.default.{D}", "A")
    query.id = 0x1234
    wire = query.to_wire()
    as_response = bytearray(wire)
    as_response[2] |= 0x80
    assert decode_request(bytes(as_response)) == Malformed("response sent as a query")
    bad = decode_request(wire[:12] + b"\xff\xff\xff")
    assert isinstance(bad, Malformed) and bad.reply is not None
    reply = dns.message.from_wire(bad.reply)
    assert reply.id == 0x1234 and reply.rcode() == dns.rcode.FORMERR
    assert reply.flags & dns.flags.QR and reply.flags & dns.flags.RD
    assert isinstance(decode_request(wire), dns.message.Message)


def test_udp_answers_that_do_not_fit_are_truncated() -> None:
    zone = zone_with(service("many", ip="None"))
    zone.on_endpoint_slice(ADDED, endpoint_slice("many-1", "many", endpoints=[
        (f"10.244.{i // 250}.{i % 250 + 1}", True) for i in range(100)]))
    small = dns.message.make_query(f"many.default.{D}", "A")  # no EDNS: 512 bytes
    decision = respond(zone, small, synced=True, forwarding=False)
    assert isinstance(decision, Reply)
    wire = udp_wire(decision.response, small)
    assert len(wire) <= 512 and dns.message.from_wire(wire).flags & dns.flags.TC
    large = dns.message.make_query(f"many.default.{D}", "A", use_edns=0, payload=4096)
    decision = respond(zone, large, synced=True, forwarding=False)
    assert isinstance(decision, Reply)
    full = dns.message.from_wire(udp_wire(decision.response, large))
    assert not full.flags & dns.flags.TC and len(full.answer[0]) == 100


def test_complaints_are_rate_limited_per_cause(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    complaints = Complaints(interval=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="mesh.dnsserver"):
        for _ in range(100):
            complaints.note("malformed udp: short header", "peer=127.0.0.1")
        complaints.note("malformed tcp: empty message", "peer=127.0.0.1")
        now[0] = 61
        complaints.note("malformed udp: short header", "peer=127.0.0.2")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[2].endswith("peer=127.0.0.2 suppressed=99")


def test_addresses_and_domains_are_checked() -> None:
    assert parse_address("10.0.0.1", 53) == ("10.0.0.1", 53)
    assert parse_address("127.0.0.1:5353", 53) == ("127.0.0.1", 5353)
    assert parse_address("[::1]:5353", 53) == ("::1", 5353)
    assert parse_address("::1", 53) == ("::1", 53)
    for bad in ("localhost:53", "1.2.3.4:x", "1.2.3.4:70000"):
        with pytest.raises(ConfigError):
            parse_address(bad, 53)
    for domain in ("", ".", "a..b"):
        with pytest.raises(ConfigError):
            ClusterZone(domain)
