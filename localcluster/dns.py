"""Cluster DNS: `<svc>.<ns>.svc.<cluster-domain>` answered from the cluster's
Services and EndpointSlices over UDP and TCP, as kube-dns and CoreDNS do.

Three layers, the first two without sockets:

- `ClusterZone` is the zone as data. It follows Service and EndpointSlice events
  and answers (name, type) lookups: A/AAAA for a ClusterIP (the ready endpoint
  addresses for a headless Service), SRV for named ports, CNAME for ExternalName.
- `decode_request` and `respond` turn bytes and messages into decisions: a reply,
  or "forward this upstream". Names outside the cluster domain are refused unless
  upstream resolvers were given.
- `DNSServer` is the thin asyncio layer: listeners (which may be handed in
  already bound, e.g. inside a network namespace), forwarding with dnspython,
  metrics and rate-limited logs. `start` wires it to a cluster with informers.

Not served: pod names (`a-b-c-d.<ns>.pod.<domain>`), per-endpoint hostnames of
headless Services (their SRV records point at the Service name instead), reverse
(PTR) lookups of Service IPs, and zone transfers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import logging
import re
import signal
import socket
import struct
import sys
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.asyncquery
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
import yaml
from kubernetes import client
from prometheus_client import CollectorRegistry, Counter

from mesh.errors import ConfigError
from mesh.informer import DELETED, Informer, Obj, key_of
from mesh.kube import api_client

log = logging.getLogger(__name__)

TTL = 5
"""Seconds, for answers and (through the SOA) for negative caching."""
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
UPSTREAM_PAYLOAD = 1232
_UDP_MINIMUM = 512
_MAX_CNAME_CHAIN = 8
_MAX_TCP_QUERIES = 1000
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


class Complaints:
    """One warning per cause per `interval`, counting the rest, so a flood of bad
    packets costs a line a minute rather than a line a packet."""

    def __init__(self, *, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._quiet: Tally[str] = Tally()

    def note(self, cause: str, detail: str) -> None:
        now = self._clock()
        last = self._last.get(cause)
        if last is not None and now - last < self._interval:
            self._quiet[cause] += 1
            return
        self._last[cause] = now
        log.warning("dns: cause=%r %s suppressed=%d", cause, detail, self._quiet.pop(cause, 0))


@dataclass
class DNSMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.queries = Counter("dns_queries", "DNS responses sent, by response code",
                               ("rcode",), registry=self.registry)
        self.malformed = Counter("dns_malformed", "DNS messages that could not be parsed, "
                                 "dropped or answered FORMERR", registry=self.registry)


# -- the server -------------------------------------------------------------------------


class DNSServer:
    """Serves a `ClusterZone` on UDP and TCP; answers SERVFAIL in the zone until all
    `informers` have synced."""

    def __init__(self, zone: ClusterZone, *, informers: Sequence[Informer] = (),
                 upstreams: Sequence[Address] = (), upstream_timeout: float = 2.0,
                 registry: CollectorRegistry | None = None, tcp_idle_timeout: float = 10.0,
                 max_pending: int = 256, clock: Callable[[], float] = time.monotonic) -> None:
        self.zone = zone
        self.upstreams = tuple(upstreams)
        self.metrics = DNSMetrics(registry if registry is not None else CollectorRegistry())
        self.registry = self.metrics.registry
        self.address: Address = ("", 0)
        self._informers = tuple(informers)
        self._timeout = upstream_timeout
        self._idle = tcp_idle_timeout
        self._max_pending = max_pending
        self._complaints = Complaints(clock=clock)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def ready(self) -> bool:
        return all(i.synced for i in self._informers)

    async def listen(self, udp_sock: socket.socket | None, tcp_sock: socket.socket | None
                     ) -> None:
        """Serve on already-bound sockets; the server owns them from here on."""
        bound = udp_sock if udp_sock is not None else tcp_sock
        if bound is None:
            raise ValueError("DNSServer.listen needs a UDP socket, a TCP socket or both")
        self.address = bound.getsockname()[:2]
        loop = asyncio.get_running_loop()
        if udp_sock is not None:
            self._udp, _ = await loop.create_datagram_endpoint(lambda: _UDP(self), sock=udp_sock)
        if tcp_sock is not None:
            self._tcp = await asyncio.start_server(self._tcp_client, sock=tcp_sock)

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()
        await asyncio.gather(*(asyncio.to_thread(i.stop) for i in self._informers))

    # -- UDP ------------------------------------------------------------------------

    def _datagram(self, wire: bytes, peer: Any) -> None:
        request = decode_request(wire)
        if isinstance(request, Malformed):
            self._malformed(request, "udp", peer)
            if request.reply is not None:
                self._send_udp(request.reply, peer, dns.rcode.FORMERR)
            return
        decision = self._decide(request)
        if isinstance(decision, Reply) and (decision.chase is None or not self.upstreams):
            self._send_udp(udp_wire(decision.response, request), peer,
                           decision.response.rcode())
        elif len(self._tasks) >= self._max_pending:
            self._complaints.note("overloaded", f"pending={len(self._tasks)} "
                                  f"peer={_peer(peer)}")
            response = dns.message.make_response(request)
            response.set_rcode(dns.rcode.SERVFAIL)
            self._send_udp(udp_wire(response, request), peer, dns.rcode.SERVFAIL)
        else:
            self._track(asyncio.ensure_future(self._answer_udp(request, decision, peer)))

    async def _answer_udp(self, request: dns.message.Message, decision: Reply | Forward,
                          peer: Any) -> None:
        response = await self._complete(request, decision)
        self._send_udp(udp_wire(response, request), peer, response.rcode())

    def _send_udp(self, wire: bytes, peer: Any, rcode: dns.rcode.Rcode) -> None:
        if self._udp is not None and not self._udp.is_closing():
            self.metrics.queries.labels(dns.rcode.to_text(rcode)).inc()
            self._udp.sendto(wire, peer)

    # -- TCP ------------------------------------------------------------------------

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                          ) -> None:
        peer = writer.get_extra_info("peername")
        task = asyncio.current_task()
        try:
            if task is None or len(self._tasks) >= self._max_pending:
                self._complaints.note("overloaded", f"pending={len(self._tasks)} "
                                      f"peer={_peer(peer)}")
                return
            self._track(task)
            for _ in range(_MAX_TCP_QUERIES):
                wire = await self._read_frame(reader)
                if wire is None:
                    return
                request = decode_request(wire) if isinstance(wire, bytes) else wire
                if isinstance(request, Malformed):
                    self._malformed(request, "tcp", peer)
                    return
                response = await self._complete(request, self._decide(request))
                self.metrics.queries.labels(dns.rcode.to_text(response.rcode())).inc()
                writer.write(response.to_wire(max_size=65535, prefer_truncation=True,
                                              prepend_length=True))
                async with asyncio.timeout(self._idle):
                    await writer.drain()
        except (ConnectionError, TimeoutError) as e:
            log.debug("dns: tcp peer=%s closed: %s", _peer(peer), type(e).__name__)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _read_frame(self, reader: asyncio.StreamReader) -> bytes | Malformed | None:
        """One length-prefixed message; None when the client is done or idle."""
        try:
            async with asyncio.timeout(self._idle):
                head = await reader.readexactly(2)
        except asyncio.IncompleteReadError as e:
            return Malformed("truncated length") if e.partial else None
        except TimeoutError:
            return None
        (size,) = struct.unpack("!H", head)
        try:
            async with asyncio.timeout(self._idle):
                return await reader.readexactly(size) if size else Malformed("empty message")
        except (asyncio.IncompleteReadError, TimeoutError):
            return Malformed("truncated message")

    # -- answering ------------------------------------------------------------------

    def _decide(self, request: dns.message.Message) -> Reply | Forward:
        return respond(self.zone, request, synced=self.ready, forwarding=bool(self.upstreams))

    async def _complete(self, request: dns.message.Message, decision: Reply | Forward
                        ) -> dns.message.Message:
        if isinstance(decision, Forward):
            return await self._forward(request)
        if decision.chase is not None and self.upstreams:
            question = request.question[0]
            found = await self._ask(dns.message.make_query(
                decision.chase, question.rdtype, use_edns=0, payload=UPSTREAM_PAYLOAD))
            if found is not None and found.rcode() == dns.rcode.NOERROR:
                decision.response.answer.extend(found.answer)
        return decision.response

    async def _forward(self, request: dns.message.Message) -> dns.message.Message:
        question = request.question[0]
        # A fresh query with our own id: the client's id must not reach the upstream.
        query = dns.message.make_query(question.name, question.rdtype, question.rdclass,
                                       use_edns=0, payload=UPSTREAM_PAYLOAD,
                                       want_dnssec=bool(request.ednsflags & dns.flags.DO))
        query.flags = request.flags & (dns.flags.RD | dns.flags.CD)
        response = dns.message.make_response(request, recursion_available=True)
        found = await self._ask(query)
        if found is None:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        response.flags |= found.flags & (dns.flags.AA | dns.flags.AD)
        response.set_rcode(found.rcode())
        response.answer, response.authority = found.answer, found.authority
        response.additional = found.additional
        return response

    async def _ask(self, query: dns.message.Message) -> dns.message.Message | None:
        """The first upstream's answer (UDP, then TCP if truncated), or None."""
        for host, port in self.upstreams:
            try:
                async with asyncio.timeout(self._timeout):
                    found, _ = await dns.asyncquery.udp_with_fallback(
                        query, host, timeout=self._timeout, port=port)
                return found
            except (dns.exception.DNSException, OSError, EOFError) as e:
                self._complaints.note(f"upstream {host}:{port} failed",
                                      f"name={query.question[0].name} error={type(e).__name__}")
        return None

    def _malformed(self, bad: Malformed, transport: str, peer: Any) -> None:
        self.metrics.malformed.inc()
        self._complaints.note(f"malformed {transport}: {bad.cause}", f"peer={_peer(peer)}")

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _peer(address: Any) -> str:
    return format_address(address[:2]) if isinstance(address, tuple) else str(address)


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self._server = server

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._server._datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors from earlier replies (a client that went away): not ours to fix.
        log.debug("dns: udp error: %s", exc)


# -- wiring -----------------------------------------------------------------------------


def bind_sockets(host: str, port: int, *, attempts: int = 20
                 ) -> tuple[socket.socket, socket.socket]:
    """A UDP and a listening TCP socket on the same address; port 0 picks a port free
    for both."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(attempts if port == 0 else 1):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            udp.bind((host, port))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, udp.getsockname()[1]))
            tcp.listen(128)
            return udp, tcp
        except OSError as e:
            udp.close()
            tcp.close()
            if port == 0 and e.errno == errno.EADDRINUSE:
                continue  # the UDP port was free, its TCP twin was not
            raise ConfigError(f"cannot listen for DNS on {format_address((host, port))}: "
                              f"{e.strerror}; choose another --listen") from e
    raise ConfigError(f"found no port free for both UDP and TCP on {host} in {attempts} tries")


async def start(api: client.ApiClient, *, cluster_domain: str = "cluster.local",
                upstreams: Sequence[Address] = (), udp_sock: socket.socket | None = None,
                tcp_sock: socket.socket | None = None, listen: Address | None = None,
                registry: CollectorRegistry | None = None,
                upstream_timeout: float = 2.0) -> DNSServer:
    """Serve the cluster's DNS from its Services and EndpointSlices, on the given
    bound sockets or on `listen`."""
    zone = ClusterZone(cluster_domain)
    if listen is not None:
        if udp_sock is not None or tcp_sock is not None:
            raise ValueError("pass either listen or sockets, not both")
        udp_sock, tcp_sock = bind_sockets(*listen)
    core, discovery = client.CoreV1Api(api), client.DiscoveryV1Api(api)
    informers = (
        Informer(core.list_service_for_all_namespaces, kind="services", handler=zone.on_service),
        Informer(discovery.list_endpoint_slice_for_all_namespaces, kind="endpointslices",
                 handler=zone.on_endpoint_slice),
    )
    server = DNSServer(zone, informers=informers, upstreams=upstreams, registry=registry,
                       upstream_timeout=upstream_timeout)
    try:
        await server.listen(udp_sock, tcp_sock)
    except BaseException:
        await server.close()
        for sock in (udp_sock, tcp_sock):
            if sock is not None:
                sock.close()
        raise
    loop = asyncio.get_running_loop()
    for informer in informers:
        informer.start(loop)
    return server


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


async def _serve_until_signalled(api: client.ApiClient, args: argparse.Namespace) -> int:
    server = await start(api, cluster_domain=args.cluster_domain,
                         upstreams=[parse_address(u, 53) for u in args.upstream],
                         listen=parse_address(args.listen, 53),
                         upstream_timeout=args.upstream_timeout)
    print(f"dns: serving {server.zone.origin} on {format_address(server.address)} (udp, tcp)",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localcluster.dns",
                                     description="Serve cluster DNS from a cluster's Services.")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--listen", default="127.0.0.1:5353", help="address:port, UDP and TCP")
    parser.add_argument("--cluster-domain", default="cluster.local")
    parser.add_argument("--upstream", action="append", default=[],
                        help="resolver for names outside the cluster domain (repeatable); "
                             "without one they are refused")
    parser.add_argument("--upstream-timeout", type=float, default=2.0)
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        for address in (args.listen, *args.upstream):
            parse_address(address, 53)
        ClusterZone(args.cluster_domain)
        try:
            api = api_client(args.kubeconfig)
        except yaml.YAMLError as e:  # mesh.kube lets YAML errors through
            raise ConfigError(f"kubeconfig {args.kubeconfig} is not valid YAML: "
                              f"{' '.join(str(e).split())}") from e
        return asyncio.run(_serve_until_signalled(api, args))
    except ConfigError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
