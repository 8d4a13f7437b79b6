"""The cluster DNS zone as data, and DNS messages in and out, without sockets.

- `ClusterZone` follows Service and EndpointSlice events and answers (name,
  type) lookups: A/AAAA for a ClusterIP (the ready endpoint addresses for a
  headless Service), SRV for named ports, CNAME for ExternalName.
- `decode_request` and `respond` turn bytes and messages into decisions: a
  reply, or "forward this upstream". Names outside the cluster domain are
  refused unless upstream resolvers were given.

localcluster.dns serves it.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import struct
from collections import Counter as Tally
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from mesh.errors import ConfigError
from mesh.informer import DELETED, Obj, key_of

log = logging.getLogger(__name__)

TTL = 5
"""Seconds, for answers and (through the SOA) for negative caching."""
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
UPSTREAM_PAYLOAD = 1232
_UDP_MINIMUM = 512
_MAX_CNAME_CHAIN = 8
MAX_TCP_QUERIES = 1000
_HEADER = struct.Struct("!HHHHHH")
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")

Address = tuple[str, int]
ServiceKey = tuple[str, str]
Rdatas = dict[dns.rdatatype.RdataType, tuple[dns.rdata.Rdata, ...]]
IN = dns.rdataclass.IN
A, AAAA, CNAME, SRV, SOA, ANY = (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.CNAME,
                                 dns.rdatatype.SRV, dns.rdatatype.SOA, dns.rdatatype.ANY)


# -- the zone ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Lookup:
    """What the zone holds for one (name, type): an rcode and the sections."""

    rcode: dns.rcode.Rcode
    answer: tuple[dns.rrset.RRset, ...] = ()
    additional: tuple[dns.rrset.RRset, ...] = ()
    authority: tuple[dns.rrset.RRset, ...] = ()
    chase: dns.name.Name | None = None
    """A CNAME target outside the zone that the answer ends at."""


@dataclass(frozen=True)
class _Slice:
    service: ServiceKey
    ready: tuple[str, ...]
    every: tuple[str, ...]


class ClusterZone:
    """The names of one cluster domain, kept from Service and EndpointSlice events.

    A name exists when it owns records or has a name below it (an empty
    non-terminal such as `<ns>.svc.<domain>`); only a name that does not exist
    is NXDOMAIN, so a resolver's negative cache never hides a real name.
    """

    def __init__(self, domain: str = "cluster.local", *, ttl: int = TTL) -> None:
        try:
            self.origin = dns.name.from_text(domain)
        except dns.exception.DNSException as e:
            raise ConfigError(f"cluster domain {domain!r} is not a DNS name: {e}") from e
        if self.origin == dns.name.root:
            raise ConfigError("the cluster domain cannot be the root; use e.g. cluster.local")
        self.ttl = ttl
        self.serial = 1
        self._svc = dns.name.from_text("svc", self.origin)
        self._services: dict[ServiceKey, Obj] = {}
        self._slices: dict[ServiceKey, dict[str, _Slice]] = {}
        self._slice_owner: dict[str, ServiceKey] = {}
        self._owned: dict[ServiceKey, list[dns.name.Name]] = {}
        self._nodes: dict[dns.name.Name, Rdatas] = {}
        self._below: Tally[dns.name.Name] = Tally()

    # -- events (informer handlers) -------------------------------------------------

    def on_service(self, event: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        if event == DELETED:
            self._services.pop(key, None)
        else:
            self._services[key] = obj
        self._reindex(key)

    def on_endpoint_slice(self, event: str, obj: Obj) -> None:
        slice_key = key_of(obj)
        touched = set()
        old = self._slice_owner.pop(slice_key, None)
        if old is not None:
            self._slices[old].pop(slice_key, None)
            if not self._slices[old]:
                del self._slices[old]
            touched.add(old)
        parsed = None if event == DELETED else _parse_slice(obj)
        if parsed is not None:
            self._slices.setdefault(parsed.service, {})[slice_key] = parsed
            self._slice_owner[slice_key] = parsed.service
            touched.add(parsed.service)
        for key in touched:
            self._reindex(key)

    # -- lookups --------------------------------------------------------------------

    def contains(self, name: dns.name.Name) -> bool:
        return name.is_subdomain(self.origin)

    def exists(self, name: dns.name.Name) -> bool:
        return name in (self.origin, self._svc) or self._below[name] > 0

    def soa(self) -> dns.rrset.RRset:
        o = self.origin.to_text()
        return dns.rrset.from_text(self.origin, self.ttl, IN, SOA,
                                   f"ns.dns.{o} hostmaster.{o} {self.serial} 7200 1800 86400 "
                                   f"{self.ttl}")

    def lookup(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> Lookup:
        answer: list[dns.rrset.RRset] = []
        name = qname
        for _ in range(_MAX_CNAME_CHAIN):
            if not self.contains(name):
                return Lookup(dns.rcode.NOERROR, tuple(answer), chase=name)
            node = self._node(name)
            if node is None:
                rcode = dns.rcode.NOERROR if self.exists(name) else dns.rcode.NXDOMAIN
                return Lookup(rcode, tuple(answer), authority=(self.soa(),))
            if CNAME in node and rdtype not in (CNAME, ANY):
                answer.append(self._rrset(name, node[CNAME]))
                name = node[CNAME][0].target  # type: ignore[attr-defined]
                continue
            found = [self._rrset(name, node[t]) for t in (node if rdtype == ANY else (rdtype,))
                     if t in node]
            if not found:
                return Lookup(dns.rcode.NOERROR, tuple(answer), authority=(self.soa(),))
            targets = [rd.target for rrset in found if rrset.rdtype == SRV for rd in rrset]
            return Lookup(dns.rcode.NOERROR, (*answer, *found), self._addresses(targets))
        log.warning("dns: CNAME chain longer than %d at name=%s", _MAX_CNAME_CHAIN, qname)
        return Lookup(dns.rcode.SERVFAIL, tuple(answer))

    # -- the index ------------------------------------------------------------------

    def _node(self, name: dns.name.Name) -> Rdatas | None:
        if name == self.origin:
            return {SOA: tuple(self.soa())}
        return self._nodes.get(name)

    def _addresses(self, names: Sequence[dns.name.Name]) -> tuple[dns.rrset.RRset, ...]:
        """The A and AAAA records of in-zone SRV targets, for the additional section."""
        return tuple(self._rrset(name, rdatas) for name in dict.fromkeys(names)
                     for t, rdatas in (self._node(name) or {}).items() if t in (A, AAAA))

    def _rrset(self, name: dns.name.Name, rdatas: Sequence[dns.rdata.Rdata]) -> dns.rrset.RRset:
        return dns.rrset.from_rdata_list(name, self.ttl, list(rdatas))

    def _ancestry(self, name: dns.name.Name) -> Iterator[dns.name.Name]:
        while name != self.origin:
            yield name
            name = name.parent()

    def _reindex(self, key: ServiceKey) -> None:
        for name in self._owned.pop(key, ()):
            del self._nodes[name]
            for n in self._ancestry(name):
                self._below[n] -= 1
                if not self._below[n]:
                    del self._below[n]
        svc = self._services.get(key)
        owned = []
        for name, rdatas in (self._records(key, svc) if svc is not None else {}).items():
            if name in self._nodes:  # only reachable with names the API should have refused
                log.warning("dns: name=%s claimed twice; keeping the first", name)
                continue
            self._nodes[name] = rdatas
            self._below.update(self._ancestry(name))
            owned.append(name)
        if owned:
            self._owned[key] = owned
        self.serial = self.serial % 0xFFFFFFFF + 1

    def _records(self, key: ServiceKey, svc: Obj) -> dict[dns.name.Name, Rdatas]:
        ns, name = key
        if not (_LABEL.fullmatch(ns) and _LABEL.fullmatch(name)):
            return {}
        owner = dns.name.from_text(f"{name}.{ns}", self._svc)
        spec = svc.get("spec") or {}
        if spec.get("type") == "ExternalName":
            try:
                target = dns.name.from_text(str(spec.get("externalName") or ""))
            except dns.exception.DNSException:
                return {owner: {}}
            if target == dns.name.root:
                return {owner: {}}
            return {owner: {CNAME: (dns.rdata.from_text(IN, CNAME, target.to_text()),)}}
        if spec.get("clusterIP") == "None":
            addresses = self._endpoint_addresses(key, bool(spec.get("publishNotReadyAddresses")))
        else:
            addresses = list(spec.get("clusterIPs") or [spec.get("clusterIP")])
        nodes: dict[dns.name.Name, Rdatas] = {owner: _address_rdatas(addresses)}
        for port in spec.get("ports") or []:
            port_name, number = port.get("name"), port.get("port")
            proto = str(port.get("protocol") or "TCP").lower()
            if not (isinstance(port_name, str) and _LABEL.fullmatch(f"_{port_name}")
                    and _LABEL.fullmatch(f"_{proto}") and isinstance(number, int)
                    and 0 < number < 65536):
                continue
            srv = dns.rdata.from_text(IN, SRV, f"0 100 {number} {owner}")
            nodes[dns.name.from_text(f"_{port_name}._{proto}", owner)] = {SRV: (srv,)}
        return nodes

    def _endpoint_addresses(self, key: ServiceKey, not_ready_too: bool) -> list[str]:
        slices = self._slices.get(key, {})
        return [a for s in slices.values() for a in (s.every if not_ready_too else s.ready)]


def _parse_slice(obj: Obj) -> _Slice | None:
    meta = obj.get("metadata") or {}
    service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    if not service or obj.get("addressType") not in ("IPv4", "IPv6"):
        return None
    ready, every = [], []
    for endpoint in obj.get("endpoints") or []:
        addresses = [str(a) for a in endpoint.get("addresses") or []]
        every += addresses
        # As in Kubernetes: a missing `ready` condition means ready.
        if (endpoint.get("conditions") or {}).get("ready") is not False:
            ready += addresses
    return _Slice((str(meta.get("namespace") or ""), str(service)), tuple(ready), tuple(every))


def _address_rdatas(addresses: Sequence[Any]) -> Rdatas:
    by_type: dict[dns.rdatatype.RdataType, dict[str, None]] = {}
    for text in addresses:
        try:
            ip = ipaddress.ip_address(str(text))
        except ValueError:
            continue
        by_type.setdefault(A if ip.version == 4 else AAAA, {})[str(ip)] = None
    return {t: tuple(dns.rdata.from_text(IN, t, a) for a in ips) for t, ips in by_type.items()}


# -- messages (sans-IO) -----------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """Send `response`; if `chase` is set and upstreams exist, first append what they
    answer for that out-of-zone CNAME target."""

    response: dns.message.Message
    chase: dns.name.Name | None = None


@dataclass(frozen=True)
class Forward:
    """Ask the upstream resolvers and relay their answer."""

    request: dns.message.Message


@dataclass(frozen=True)
class Malformed:
    """Bytes that are not a DNS query; `reply` is a FORMERR to send, when the header
    was readable enough to address one."""

    cause: str
    reply: bytes | None = None


def decode_request(wire: bytes) -> dns.message.Message | Malformed:
    if len(wire) < _HEADER.size:
        return Malformed("short header")
    ident, flags = _HEADER.unpack_from(wire)[:2]
    if flags & dns.flags.QR:  # never answer an answer: two servers could loop
        return Malformed("response sent as a query")
    try:
        return dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError) as e:
        reply = _HEADER.pack(ident, dns.flags.QR | (flags & (0x7800 | dns.flags.RD))
                             | dns.rcode.FORMERR, 0, 0, 0, 0)
        return Malformed(f"unparsable ({type(e).__name__})", reply)


def respond(zone: ClusterZone, request: dns.message.Message, *, synced: bool,
            forwarding: bool) -> Reply | Forward:
    """Decide the answer to one parsed query."""
    response = dns.message.make_response(request, recursion_available=forwarding)
    if request.opcode() != dns.opcode.QUERY:
        return _fail(response, dns.rcode.NOTIMP)
    if len(request.question) != 1:
        return _fail(response, dns.rcode.FORMERR)
    question = request.question[0]
    if not zone.contains(question.name):
        return Forward(request) if forwarding else _fail(response, dns.rcode.REFUSED)
    if request.edns > 0:
        return _fail(response, dns.rcode.BADVERS)
    if question.rdclass != IN or question.rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
        return _fail(response, dns.rcode.REFUSED)
    if not synced:  # an empty cache would turn every name into a cached NXDOMAIN
        return _fail(response, dns.rcode.SERVFAIL)
    found = zone.lookup(question.name, question.rdtype)
    response.flags |= dns.flags.AA
    response.set_rcode(found.rcode)
    response.answer = list(found.answer)
    response.authority = list(found.authority)
    response.additional = list(found.additional)
    return Reply(response, found.chase)


def udp_wire(response: dns.message.Message, request: dns.message.Message) -> bytes:
    """The response within the size the client can take over UDP, truncated (TC)
    when it does not fit, so the client asks again over TCP."""
    limit = max(_UDP_MINIMUM, request.payload) if request.edns >= 0 else _UDP_MINIMUM
    return response.to_wire(max_size=min(limit, 65535), prefer_truncation=True)


def _fail(response: dns.message.Message, rcode: dns.rcode.Rcode) -> Reply:
    response.set_rcode(rcode)
    return Reply(response)


# -- logs and metrics -------------------------------------------------------------------
