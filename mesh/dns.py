"""DNS for mesh names as data, and DNS messages in and out, without sockets.

- `Zone` holds the names of one cluster domain (`<svc>.<ns>.svc.<domain>`) and
  answers (name, type) lookups: the records a name owns, NODATA with the SOA for a
  name that exists without that type, NXDOMAIN with the SOA for one that does not.
  What fills it differs by program: the embedded cluster's DNS follows Services and
  EndpointSlices (localcluster.dnszone), the VM agent follows the control plane's
  (name, address) pairs (vm_agent.dns).
- `decode_request` and `respond` turn bytes and messages into decisions: a reply,
  or "forward this upstream". A name under the zone's domain is always answered
  here and never forwarded, so internal names do not leak to outside resolvers.

mesh.dnsserver serves them over UDP and TCP.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

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

log = logging.getLogger(__name__)

TTL = 5
"""Seconds, for answers and (through the SOA) for negative caching."""
UPSTREAM_PAYLOAD = 1232
MAX_TCP_QUERIES = 1000
_UDP_MINIMUM = 512
_MAX_CNAME_CHAIN = 8
_HEADER = struct.Struct("!HHHHHH")

Address = tuple[str, int]
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


class Zone:
    """The names of one cluster domain and their records.

    A name exists when it owns records (possibly none: a Service without addresses)
    or has a name below it (an empty non-terminal such as `<ns>.svc.<domain>`);
    `svc.<domain>` always exists. Only a name that does not exist is NXDOMAIN, so a
    resolver's negative cache never hides a real name.
    """

    def __init__(self, domain: str = "cluster.local", *, ttl: int = TTL) -> None:
        self.origin = domain_name(domain)
        self.ttl = ttl
        self.serial = 1
        self.svc = dns.name.from_text("svc", self.origin)
        self._nodes: dict[dns.name.Name, Rdatas] = {}
        self._below: Tally[dns.name.Name] = Tally()

    def add(self, name: dns.name.Name, rdatas: Rdatas) -> bool:
        """Give `name` these records; False (and nothing changes) if it has some already."""
        if name in self._nodes or not self.contains(name) or name == self.origin:
            return False
        self._nodes[name] = rdatas
        self._below.update(self._ancestry(name))
        self._bump()
        return True

    def discard(self, name: dns.name.Name) -> None:
        if self._nodes.pop(name, None) is None:
            return
        for n in self._ancestry(name):
            self._below[n] -= 1
            if not self._below[n]:
                del self._below[n]
        self._bump()

    def contains(self, name: dns.name.Name) -> bool:
        return name.is_subdomain(self.origin)

    def exists(self, name: dns.name.Name) -> bool:
        return name in (self.origin, self.svc) or self._below[name] > 0

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

    def _bump(self) -> None:
        self.serial = self.serial % 0xFFFFFFFF + 1

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


def domain_name(domain: str) -> dns.name.Name:
    """The cluster domain as an absolute name; ConfigError if it cannot be one."""
    try:
        origin = dns.name.from_text(domain)
    except dns.exception.DNSException as e:
        raise ConfigError(f"cluster domain {domain!r} is not a DNS name: {e}") from e
    if origin == dns.name.root:
        raise ConfigError("the cluster domain cannot be the root; use e.g. cluster.local")
    return origin


def address_rdatas(addresses: Iterable[object]) -> Rdatas:
    """A and AAAA records of the addresses that are IPs, each once; others are skipped."""
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


def respond(zone: Zone, request: dns.message.Message, *, synced: bool,
            forwarding: bool) -> Reply | Forward:
    """Decide the answer to one parsed query: from the zone for a name under its
    domain (SERVFAIL until `synced`), else forward it, or refuse it when not
    `forwarding`."""
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


# -- addresses --------------------------------------------------------------------------


def parse_address(text: str, default_port: int) -> Address:
    """`1.2.3.4`, `1.2.3.4:53`, `::1` or `[::1]:53`."""
    host, port = text.strip(), str(default_port)
    if host.startswith("["):
        host, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else (rest or port)
    elif host.count(":") == 1:
        host, port = host.split(":")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise ConfigError(f"{text!r} is not an IP address with an optional port") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"{text!r}: port {number} is out of range")
    return host, number


def format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
