"""The destination API: a streaming watch of the destination index over mTLS.

``GET /v1/destinations`` streams newline-delimited JSON, one message a line:

- ``{"type": "snapshot", "heartbeatSeconds": 10, "services": [ServiceSpec, ...]}``
  first, with every service the watch selects (possibly none);
- ``{"type": "update", "service": ServiceSpec}`` when a service port appears or
  changes (the whole new state, not a delta);
- ``{"type": "delete", "address": "10.96.0.10:80", "name": "web.ns.svc.cluster.local"}``
  when it goes away;
- ``{"type": "heartbeat"}`` after ``heartbeatSeconds`` without another message,
  so that a client can tell a quiet stream from a dead one.

ServiceSpec is the proxy's own model in JSON, fields by alias (``targetPort``).
``?service=<name>:<port>`` or ``?address=<vip>:<port>`` narrows the watch to one
service port, which need not exist yet.

Callers present a certificate of the trust bundle (any identity may watch);
it is checked again against the current bundle, so an anchor removed by a
rotation stops its leaves at once. Refusals are JSON ``{"error", "message"}``.

Each watcher has a bounded buffer of pending messages, coalesced per service
port (only the newest state of a port is worth sending). A watcher too slow to
keep its buffer under the bound is cut off, and counted: it reconnects and
starts again from a fresh snapshot, and no other watcher waits for it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
from aiohttp import web
from kubernetes import client
from prometheus_client import CollectorRegistry, Counter, Gauge

from mesh.control.watches import watch_destinations
from mesh.discovery.index import (
    Address,
    Change,
    DestinationIndex,
    Obj,
    ServiceUpdated,
    address_key,
)
from mesh.errors import IdentityError
from mesh.identity.bundle import TrustBundle
from mesh.identity.names import Identity, InvalidName
from mesh.identity.service import Refusal
from mesh.identity.tls import peer_chain
from mesh.informer import Informer, all_synced, stop_all
from mesh.proxy.discovery import ServiceSpec, canonical_address, split_host_port

log = logging.getLogger(__name__)

PATH = "/v1/destinations"
CONTENT_TYPE = "application/x-ndjson"
HEARTBEAT = b'{"type":"heartbeat"}\n'


class BadQuery(ValueError):
    """The query string of a watch cannot be understood; the message says why."""


@dataclass(frozen=True)
class Watch:
    """Which service ports a watcher wants: one by name, one by VIP, or (neither) all."""

    service: tuple[str, int] | None = None
    address: Address | None = None

    def matches(self, name: str, address: Address) -> bool:
        if self.service is not None:
            return (name, address[1]) == self.service
        return self.address is None or self.address == address


def parse_watch(query: Mapping[str, str], *, repeated: frozenset[str] = frozenset()) -> Watch:
    """A `Watch` from the query parameters; `repeated` names those given more than once."""
    unknown = sorted(set(query) - {"service", "address"})
    if unknown:
        raise BadQuery(f"unknown query parameter {unknown[0]!r}; use ?service=<name>:<port> or "
                       "?address=<vip>:<port>, or neither to watch every service")
    if repeated:
        raise BadQuery(f"give {sorted(repeated)[0]} once")
    if "service" in query and "address" in query:
        raise BadQuery("give ?service= or ?address=, not both")
    if "service" in query:
        text = query["service"]
        host, port = _host_port(text, "service", "web.default.svc.cluster.local:80")
        if _is_ip(host):
            raise BadQuery(f"service={text!r} names an IP address; use ?address= for a VIP")
        return Watch(service=(host.lower().rstrip("."), port))
    if "address" in query:
        text = query["address"]
        host, port = _host_port(text, "address", "10.96.0.10:80")
        if not _is_ip(host):
            raise BadQuery(f"address={text!r}: the host must be the service's IP address")
        return Watch(address=canonical_address(host, port))
    return Watch()


def _host_port(text: str, what: str, example: str) -> tuple[str, int]:
    try:
        return split_host_port(text)
    except ValueError as e:
        raise BadQuery(f"{what}: {e}; expected such as {example}") from None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Subscription:
    """One watcher's pending messages, newest per service port, at most `limit` ports."""

    def __init__(self, watch: Watch, *, limit: int, peer: str = "",
                 on_overflow: Callable[[], None] | None = None) -> None:
        self.watch = watch
        self.limit = limit
        self.peer = peer
        self.pending: dict[Address, bytes] = {}
        self.wake = asyncio.Event()
        self.closed = False
        self.overflowed = False
        self._on_overflow = on_overflow

    def offer(self, key: Address, line: bytes) -> bool:
        """Queue `line` as the newest state of `key`; False once the watcher is cut off."""
        if self.closed:
            return False
        if key not in self.pending and len(self.pending) >= self.limit:
            self.overflowed = True
            self.close()
            if self._on_overflow is not None:
                self._on_overflow()
            return False
        self.pending[key] = line
        self.wake.set()
        return True

    def take(self) -> list[bytes]:
        lines = list(self.pending.values())
        self.pending.clear()
        self.wake.clear()
        return lines

    def close(self) -> None:
        self.closed = True
        self.wake.set()


class DestinationService:
    """Serves the index to watchers; `publish` fans its changes out."""

    def __init__(self, index: DestinationIndex, *, trust: Callable[[], TrustBundle],
                 registry: CollectorRegistry, heartbeat: float = 10.0,
                 queue_limit: int = 10_000) -> None:
        self.index = index
        self.heartbeat = heartbeat
        self.queue_limit = queue_limit
        self._trust = trust
        self._subscriptions: set[Subscription] = set()
        self._encoded: dict[Address, tuple[ServiceSpec, str]] = {}
        self._informers: list[Informer] = []
        # Linkerd's destination metric names.
        self.subscribers = Gauge("endpoints_subscribers", "Open destination watches",
                                 registry=registry)
        self.updates = Counter("endpoints_updates", "Update and delete messages sent to "
                               "watchers", registry=registry)
        self.overflows = Counter("endpoint_updates_queue_overflow", "Watchers cut off because "
                                 "they fell too far behind", registry=registry)
        services = Gauge("destination_services", "Service ports in the destination index",
                         registry=registry)
        services.set_function(lambda: len(self.index))

    # -- feeding the index ---------------------------------------------------------

    def watch_cluster(self, kube: client.ApiClient, loop: asyncio.AbstractEventLoop) -> None:
        """Keep the index current from the cluster: informers on Pods, slices, Services
        and ExternalWorkloads."""
        self._informers += watch_destinations(
            kube, loop, pods=self._feed(self.index.pod_event),
            slices=self._feed(self.index.slice_event),
            services=self._feed(self.index.service_event),
            workloads=self._feed(self.index.workload_event))

    def _feed(self, apply: Callable[[str, Obj], list[Change]]) -> Callable[[str, Obj], None]:
        def handle(event: str, obj: Obj) -> None:
            self.publish(apply(event, obj))

        return handle

    @property
    def ready(self) -> bool:
        """Every informer has listed once: the index reflects the cluster."""
        return all_synced(self._informers)

    def stop(self) -> None:
        """Stop the informers and end every stream (watchers then reconnect elsewhere)."""
        stop_all(self._informers)
        for sub in list(self._subscriptions):
            sub.close()

    # -- fan-out -------------------------------------------------------------------

    def publish(self, changes: list[Change]) -> None:
        for change in changes:
            key = address_key(change)
            if isinstance(change, ServiceUpdated):
                name = change.service.name
                line = f'{{"type":"update","service":{self._encode(change.service)}}}\n'
            else:
                name = change.name
                self._encoded.pop(key, None)
                line = json.dumps({"type": "delete", "address": change.address,
                                   "name": change.name}, separators=(",", ":")) + "\n"
            data = line.encode()
            for sub in list(self._subscriptions):
                if sub.watch.matches(name, key):
                    sub.offer(key, data)

    def _encode(self, spec: ServiceSpec) -> str:
        key = canonical_address(*spec.host_port)
        hit = self._encoded.get(key)
        if hit is not None and hit[0] is spec:
            return hit[1]
        text = msgspec.json.encode(spec).decode()
        self._encoded[key] = (spec, text)
        return text

    def snapshot(self, watch: Watch) -> bytes:
        if watch.service is not None:
            one = self.index.by_name(*watch.service)
            specs = [one] if one is not None else []
        elif watch.address is not None:
            one = self.index.by_address(*watch.address)
            specs = [one] if one is not None else []
        else:
            specs = self.index.services()
        body = ",".join(self._encode(s) for s in specs)
        return (f'{{"type":"snapshot","heartbeatSeconds":{json.dumps(self.heartbeat)},'
                f'"services":[{body}]}}\n').encode()

    # -- HTTP ----------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(PATH, self.destinations)

    async def ready_page(self, request: web.Request) -> web.Response:
        if self.ready:
            return web.Response(text="ready\n")
        return web.Response(text="not ready: the cluster has not been read yet\n", status=503)

    async def destinations(self, request: web.Request) -> web.StreamResponse:
        try:
            peer = self._peer(request)
            repeated = frozenset(k for k in request.query if len(request.query.getall(k)) > 1)
            try:
                watch = parse_watch(request.query, repeated=repeated)
            except BadQuery as e:
                raise Refusal(400, "malformed", str(e)) from e
            if not self.ready:
                raise Refusal(503, "not-ready", "the control plane is still reading the "
                              "cluster; retry shortly")
        except Refusal as e:
            log.info("destination watch refused peer=%s reason=%s cause=%r", request.remote,
                     e.reason, e.message)
            return web.json_response({"error": e.reason, "message": e.message},
                                     status=e.status)
        transport = request.transport
        sub = Subscription(watch, limit=self.queue_limit, peer=f"{peer}@{request.remote}",
                           on_overflow=transport.abort if transport is not None else None)
        # Snapshot and registration in one step: no change can fall between them.
        first = self.snapshot(watch)
        self._subscriptions.add(sub)
        self.subscribers.inc()
        log.info("destination watch opened peer=%s watch=%s", sub.peer, _describe(watch))
        resp = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE,
                                           "Cache-Control": "no-store"})
        try:
            await resp.prepare(request)
            await resp.write(first)
            del first  # a snapshot is large; do not hold it for the life of the watch
            await pump(sub, resp, heartbeat=self.heartbeat, sent=self.updates)
        except ConnectionError as e:
            if not sub.overflowed:
                log.info("destination watch ended peer=%s cause=%s", sub.peer,
                         type(e).__name__)
        finally:
            self._subscriptions.discard(sub)
            self.subscribers.dec()
        if sub.overflowed:
            self.overflows.inc()
            log.warning("destination watch cut off peer=%s cause=more than %d service ports "
                        "pending; it will reconnect and start from a snapshot", sub.peer,
                        self.queue_limit)
        return resp

    def _peer(self, request: web.Request) -> Identity:
        return peer_identity(request, self._trust())


async def pump(sub: Subscription, resp: web.StreamResponse, *, heartbeat: float,
               sent: Counter) -> None:
    """Write a watcher's pending messages as they come, and a heartbeat after each
    `heartbeat` seconds of silence, until the subscription closes."""
    while not sub.closed:
        if not sub.pending:
            try:
                async with asyncio.timeout(heartbeat):
                    await sub.wake.wait()
            except TimeoutError:
                await resp.write(HEARTBEAT)
                continue
        if sub.closed:
            break
        lines = sub.take()
        if lines:
            await resp.write(b"".join(lines))
            sent.inc(len(lines))


def peer_identity(request: web.Request, trust: TrustBundle) -> Identity:
    """The caller's identity, from a certificate the current trust bundle accepts."""
    transport = request.transport
    sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
    if sslobj is None or not sslobj.getpeercert(binary_form=True):
        raise Refusal(401, "no-certificate", "watching the control plane takes mutual TLS: "
                      "present a workload certificate issued under the trust bundle")
    chain = peer_chain(sslobj, verified=False)
    try:
        trust.verify(chain, now=datetime.now(UTC))
    except IdentityError as e:
        raise Refusal(401, "untrusted-certificate", f"the certificate presented is not "
                      f"trusted: {e}") from e
    try:
        return Identity.from_certificate(chain[0])
    except InvalidName as e:
        raise Refusal(403, "no-identity", str(e)) from e


def _describe(watch: Watch) -> str:
    if watch.service is not None:
        return f"service:{watch.service[0]}:{watch.service[1]}"
    if watch.address is not None:
        return f"address:{watch.address[0]}:{watch.address[1]}"
    return "all"
