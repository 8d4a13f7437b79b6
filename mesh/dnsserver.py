"""A DNS server over UDP and TCP: the thin asyncio layer around mesh.dns.

`DNSServer` reads queries from listeners (which may be handed in already bound,
e.g. inside a network namespace), asks its `answer` function what to do with
each (mesh.dns.respond over some zone), forwards what is not its own to the
upstream resolvers in order with dnspython (a timeout each, falling back to the
next, again over TCP when a UDP answer is truncated, SERVFAIL when none
answers), and keeps metrics and rate-limited logs. The embedded cluster's DNS
(localcluster.dns) and the VM agent's (vm_agent.dns) both serve through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
import time
from collections import Counter as Tally
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
from prometheus_client import CollectorRegistry, Counter

from mesh.dns import (
    MAX_TCP_QUERIES,
    UPSTREAM_PAYLOAD,
    Address,
    Forward,
    Malformed,
    Reply,
    decode_request,
    format_address,
    udp_wire,
)
from mesh.errors import ConfigError

log = logging.getLogger(__name__)

Answer = Callable[[dns.message.Message], Reply | Forward]
"""What to do with one parsed query; mesh.dns.respond over a zone."""


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
        self.answers = Counter("dns_answers", "DNS queries by where their answer came from: "
                               "local (this server's zone or a refusal), forwarded (an "
                               "upstream resolver), failed (no upstream answered)",
                               ("source",), registry=self.registry)
        self.malformed = Counter("dns_malformed", "DNS messages that could not be parsed, "
                                 "dropped or answered FORMERR", registry=self.registry)


class DNSServer:
    """Serves the answers of `answer` on UDP and TCP, forwarding to `upstreams`."""

    def __init__(self, answer: Answer, *, upstreams: Sequence[Address] = (),
                 upstream_timeout: float = 2.0, registry: CollectorRegistry | None = None,
                 tcp_idle_timeout: float = 10.0, max_pending: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.upstreams = tuple(upstreams)
        self.metrics = DNSMetrics(registry if registry is not None else CollectorRegistry())
        self.registry = self.metrics.registry
        self.address: Address = ("", 0)
        self._answer = answer
        self._timeout = upstream_timeout
        self._idle = tcp_idle_timeout
        self._max_pending = max_pending
        self._complaints = Complaints(clock=clock)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

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

    # -- UDP ------------------------------------------------------------------------

    def _datagram(self, wire: bytes, peer: Any) -> None:
        request = decode_request(wire)
        if isinstance(request, Malformed):
            self._malformed(request, "udp", peer)
            if request.reply is not None:
                self._send_udp(request.reply, peer, dns.rcode.FORMERR)
            return
        decision = self._answer(request)
        if isinstance(decision, Reply) and (decision.chase is None or not self.upstreams):
            self.metrics.answers.labels("local").inc()
            self._send_udp(udp_wire(decision.response, request), peer,
                           decision.response.rcode())
        elif len(self._tasks) >= self._max_pending:
            self._complaints.note("overloaded", f"pending={len(self._tasks)} "
                                  f"peer={_peer(peer)}")
            response = dns.message.make_response(request)
            response.set_rcode(dns.rcode.SERVFAIL)
            self.metrics.answers.labels("failed").inc()
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
                response = await self._complete(request, self._answer(request))
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
        self.metrics.answers.labels("local").inc()
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
            self.metrics.answers.labels("failed").inc()
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        self.metrics.answers.labels("forwarded").inc()
        response.flags |= found.flags & (dns.flags.AA | dns.flags.AD)
        response.set_rcode(found.rcode())
        response.answer, response.authority = found.answer, found.authority
        response.additional = found.additional
        return response

    async def _ask(self, query: dns.message.Message) -> dns.message.Message | None:
        """The first upstream's answer (UDP, then TCP if truncated), or None after one
        line naming every upstream tried and why it failed."""
        failures = []
        for host, port in self.upstreams:
            try:
                async with asyncio.timeout(self._timeout):
                    found, _ = await dns.asyncquery.udp_with_fallback(
                        query, host, timeout=self._timeout, port=port)
                return found
            except (dns.exception.DNSException, OSError, EOFError) as e:
                failures.append(f"{format_address((host, port))}:{type(e).__name__}")
        question = query.question[0]
        self._complaints.note("no upstream answered",
                              f"name={question.name} type={dns.rdatatype.to_text(question.rdtype)}"
                              f" tried={','.join(failures) or 'none'}")
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
                              f"{e.strerror}; choose another address") from e
    raise ConfigError(f"found no port free for both UDP and TCP on {host} in {attempts} tries")
