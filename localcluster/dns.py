"""Cluster DNS: `<svc>.<ns>.svc.<cluster-domain>` answered from the cluster's
Services and EndpointSlices over UDP and TCP, as kube-dns and CoreDNS do.

The zone and the answers are data (localcluster.dnszone, no sockets);
`DNSServer` here is the thin asyncio layer: listeners (which may be handed in
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
import signal
import socket
import struct
import sys
import time
from collections import Counter as Tally
from collections.abc import Callable, Sequence
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

from localcluster.dnszone import (
    MAX_TCP_QUERIES,
    UPSTREAM_PAYLOAD,
    Address,
    ClusterZone,
    Forward,
    Malformed,
    Reply,
    decode_request,
    respond,
    udp_wire,
)
from mesh.errors import ConfigError
from mesh.informer import Informer
from mesh.kube import api_client

log = logging.getLogger(__name__)

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
            for _ in range(MAX_TCP_QUERIES):
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
