"""The proxy's side of the destination API: `WatchDiscovery`, a `Discovery` kept
current by the control plane's stream of every service.

It resolves, lists and announces services exactly as `StaticDiscovery` does
(it is one, fed by the stream instead of a file): a fresh snapshot, at the
first connection or after a reconnection, is applied as a diff, so only
services that changed or went away are announced, and a service that went
away is announced once more without endpoints. While the control plane is
away the last known data keeps serving; reconnection backs off exponentially,
capped and jittered, so that proxies do not return in step.

The server is trusted only after its TLS chain verified under the caller's
context and its certificate named the expected identity (`check_peer`).
Messages are validated with the proxy's own models; an invalid one is logged
(one line, with the field path) and skipped, never fatal. Lines are split
here rather than by aiohttp, whose ``readline`` copies a long line once per
chunk: a snapshot of a large cluster is one line of megabytes.

This module runs inside the proxy: it must not import the kubernetes client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
from collections.abc import Callable
from typing import Any

import aiohttp
from pydantic import ValidationError

from mesh.errors import ConfigError, DiscoveryError, IdentityError, MeshError
from mesh.identity.names import Identity
from mesh.identity.tls import check_peer
from mesh.proxy.discovery import (
    DiscoveryFile,
    ServiceSpec,
    StaticDiscovery,
    canonical_address,
    explain,
    split_host_port,
)

log = logging.getLogger(__name__)

PATH = "/v1/destinations"
MAX_LINE = 256 * 1024 * 1024
"""Longest message accepted (a snapshot of every service is one line)."""
DEFAULT_HEARTBEAT = 10.0
"""Assumed until the server's snapshot states its heartbeat interval."""


class WatchDiscovery(StaticDiscovery):
    """Discovery from the control plane at ``url`` (``https://host:port``).

    ``context`` returns the TLS client context to dial with (the workload's,
    asked again at each connection so a renewed or rebuilt context is used);
    ``server_identity`` is the identity the control plane must present.
    `start` runs the watch in a task; `ready` is set once a first snapshot
    has been applied.
    """

    def __init__(self, url: str, *, context: Callable[[], ssl.SSLContext],
                 server_identity: Identity, min_backoff: float = 0.5,
                 max_backoff: float = 30.0, connect_timeout: float = 5.0,
                 stale_after: int = 3, rng: random.Random | None = None) -> None:
        super().__init__(DiscoveryFile(services=[]))
        if not url.startswith("https://"):
            raise ConfigError(f"discovery server {url!r} must be an https:// address: the "
                              "destination API is served over mutual TLS only")
        self.url = url.rstrip("/")
        self.server_identity = server_identity
        self.ready = asyncio.Event()
        self.connected = False
        """True while a stream is open and its snapshot has been applied."""
        self.connections = 0
        """How many streams delivered a snapshot (so, reconnections + 1)."""
        self.last_error: MeshError | None = None
        """Why the last attempt or stream failed; None while connected."""
        self._context = context
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._connect_timeout = connect_timeout
        self._stale_after = stale_after
        self._heartbeat = DEFAULT_HEARTBEAT
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.connected = False

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the first snapshot; True once it arrived."""
        try:
            async with asyncio.timeout(timeout):
                await self.ready.wait()
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        """Watch until cancelled, reconnecting after every failure."""
        attempt = 0
        connector = aiohttp.TCPConnector(force_close=True, limit=1)
        timeout = aiohttp.ClientTimeout(total=None, connect=self._connect_timeout,
                                        sock_read=None)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            while True:
                before = self.connections
                try:
                    await self._watch_once(session)
                    cause: MeshError = DiscoveryError(f"control plane {self.url} ended the "
                                                      "stream")
                except MeshError as e:
                    cause = e
                except (aiohttp.ClientError, OSError, ssl.SSLError, TimeoutError) as e:
                    cause = _translate(e, self.url, self.server_identity)
                except Exception as e:
                    # The watch must outlive any surprise: the proxy depends on it.
                    log.exception("discovery stream failed unexpectedly server=%s", self.url)
                    cause = DiscoveryError(f"unexpected {type(e).__name__}: {e}")
                self.connected = False
                self.last_error = cause
                attempt = 0 if self.connections > before else attempt + 1
                delay = self._backoff(attempt)
                log.warning("discovery stream down server=%s cause=%s retry_in=%.2fs "
                            "services=%d (serving the last known data)", self.url, cause,
                            delay, len(self._by_address))
                await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        """Exponential, capped, with jitter (half to all of the step), so restarts spread."""
        step = min(self._max_backoff, self._min_backoff * 2 ** min(attempt, 30))
        return step * (0.5 + 0.5 * self._rng.random())

    # -- one stream ------------------------------------------------------------------

    async def _watch_once(self, session: aiohttp.ClientSession) -> None:
        ctx = self._context()
        if ctx.verify_mode != ssl.CERT_REQUIRED:
            raise IdentityError("the TLS context for the control plane does not verify the "
                                "server's certificate; use the workload's client context")
        async with session.get(f"{self.url}{PATH}", ssl=ctx,
                               server_hostname=self.server_identity.dns_name) as resp:
            conn = resp.connection
            sslobj = conn.transport.get_extra_info("ssl_object") if (
                conn is not None and conn.transport is not None) else None
            if sslobj is None:
                raise IdentityError(f"control plane {self.url} did not answer over TLS; the "
                                    "discovery server must be an https:// address")
            check_peer(sslobj, expected=self.server_identity, side="server", peer=self.url)
            if resp.status != 200:
                raise DiscoveryError(await _refusal(resp, self.url))
            await self._read(resp)

    async def _read(self, resp: aiohttp.ClientResponse) -> None:
        buffer = bytearray()
        scanned = 0
        while True:
            # Before the snapshot, and between messages: a silent stream is a dead one.
            async with asyncio.timeout(self._heartbeat * self._stale_after):
                chunk = await resp.content.readany()
            if not chunk:
                return
            buffer += chunk
            while (end := buffer.find(b"\n", scanned)) >= 0:
                line = bytes(buffer[:end])
                del buffer[:end + 1]
                scanned = 0
                if line.strip():
                    self.receive_line(line)
            scanned = len(buffer)
            if scanned > MAX_LINE:
                raise DiscoveryError(f"control plane {self.url} sent a message over "
                                     f"{MAX_LINE} bytes; reconnecting")

    # -- messages (no I/O) -----------------------------------------------------------

    def receive_line(self, line: bytes) -> None:
        """Apply one message of the stream; a bad one is logged and skipped."""
        try:
            msg = json.loads(line)
        except ValueError as e:
            log.warning("discovery message skipped server=%s cause=not JSON: %s", self.url, e)
            return
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "snapshot":
            self._snapshot(msg)
        elif kind == "update":
            svc = self._parse(msg.get("service"), "service")
            if svc is not None and self._put(svc):
                self._announce(svc)
        elif kind == "delete":
            self._delete(msg)
        elif kind != "heartbeat":
            log.debug("discovery message ignored server=%s type=%r", self.url, kind)

    def _snapshot(self, msg: dict[str, Any]) -> None:
        heartbeat = msg.get("heartbeatSeconds")
        if isinstance(heartbeat, int | float) and heartbeat > 0:
            self._heartbeat = float(heartbeat)
        items = msg.get("services")
        if not isinstance(items, list):
            log.warning("discovery snapshot skipped server=%s field=services cause=not a list",
                        self.url)
            return
        services = [svc for i, item in enumerate(items)
                    if (svc := self._parse(item, f"services[{i}]")) is not None]
        changed = self._index(services)
        self.connections += 1
        self.connected = True
        self.last_error = None
        log.info("discovery snapshot applied server=%s services=%d changed=%d connection=%d",
                 self.url, len(self._by_address), len(changed), self.connections)
        for svc in changed:
            self._announce(svc)
        self.ready.set()

    def _delete(self, msg: dict[str, Any]) -> None:
        address = msg.get("address")
        try:
            key = canonical_address(*split_host_port(str(address)))
        except ValueError as e:
            log.warning("discovery message skipped server=%s field=address cause=%s",
                        self.url, e)
            return
        old = self._by_address.get(key)
        if old is not None:
            self._unlink(key, old)
            self._announce(old.model_copy(update={"endpoints": []}))

    def _parse(self, item: Any, where: str) -> ServiceSpec | None:
        try:
            return ServiceSpec.model_validate(item)
        except ValidationError as e:
            name = item.get("name") if isinstance(item, dict) else None
            causes = "; ".join(f"{where}.{field}: {reason}" for field, reason in explain(e))
            log.warning("discovery item skipped server=%s service=%s cause=%s", self.url,
                        name, causes)
            return None

    # -- the table, one service at a time --------------------------------------------
    # StaticDiscovery rebuilds its tables from a whole file; one update must not cost
    # a pass over every service, so updates and deletes touch only their own entries.

    def _put(self, svc: ServiceSpec) -> bool:
        key = canonical_address(*svc.host_port)
        old = self._by_address.get(key)
        if old == svc:
            return False
        if old is not None:
            self._unlink(key, old)
        self._by_address[key] = svc
        self._by_authority[(svc.name, key[1])] = svc
        self._by_name.setdefault(svc.name, []).append(svc)
        return True

    def _unlink(self, key: tuple[str, int], old: ServiceSpec) -> None:
        del self._by_address[key]
        if self._by_authority.get((old.name, key[1])) is old:
            del self._by_authority[(old.name, key[1])]
        same = [s for s in self._by_name.get(old.name, []) if s is not old]
        if same:
            self._by_name[old.name] = same
        else:
            self._by_name.pop(old.name, None)


async def _refusal(resp: aiohttp.ClientResponse, url: str) -> str:
    text = await resp.text(errors="replace")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "message" in doc:
        return (f"control plane {url} refused the watch ({resp.status} "
                f"{doc.get('error', '?')}): {doc['message']}")
    return f"control plane {url} answered {resp.status}: {text[:200]}"


def _translate(e: BaseException, url: str, expected: Identity) -> MeshError:
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        return IdentityError(f"control plane {url} is not trusted: {e.certificate_error}; it "
                             f"must present {expected} under an anchor of the trust bundle")
    if isinstance(e, TimeoutError) and not isinstance(e, aiohttp.ClientError):
        return DiscoveryError(f"control plane {url} went silent (no message or heartbeat in "
                              "time); reconnecting")
    return DiscoveryError(f"control plane {url} unreachable: {type(e).__name__}: {e}")
