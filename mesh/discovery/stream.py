"""A proxy's long-lived stream from the control plane: newline-delimited JSON over
mutual TLS, reconnected with capped, jittered exponential backoff while whoever
reads it keeps serving its last known data.

The server is trusted only after its TLS chain verified under the caller's
context and its certificate named the expected identity (`check_peer`).
Lines are split here, without copying a long line once per chunk: a snapshot
of a large cluster is one line of megabytes.

This module runs inside the proxy: it must not import the kubernetes client or a
web framework (`mesh.https` is its client).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
from collections.abc import Callable

from mesh import https
from mesh.errors import ConfigError, DiscoveryError, IdentityError, MeshError
from mesh.identity.names import Identity
from mesh.identity.tls import check_peer

log = logging.getLogger(__name__)

MAX_LINE = 256 * 1024 * 1024
"""Longest message accepted (a snapshot of every service is one line)."""
DEFAULT_HEARTBEAT = 10.0
"""Assumed until the server's snapshot states its heartbeat interval."""


class ControlStream:
    """One stream from the control plane at ``url`` (``https://host:port``) + ``path``.

    ``context`` returns the TLS client context to dial with (the workload's,
    asked again at each connection so a renewed or rebuilt context is used);
    ``server_identity`` is the identity the control plane must present.
    Subclasses apply each line in `receive_line` and call `snapshot_applied`
    when a stream's first message has been applied. `start` runs the stream
    in a task; `ready` is set once a first snapshot has been applied.
    """

    what = "stream"
    """What the stream carries, for errors and logs."""

    def __init__(self, url: str, path: str, *, context: Callable[[], ssl.SSLContext],
                 server_identity: Identity, min_backoff: float = 0.5,
                 max_backoff: float = 30.0, connect_timeout: float = 5.0,
                 stale_after: int = 3, rng: random.Random | None = None) -> None:
        if not url.startswith("https://"):
            raise ConfigError(f"control plane {url!r} must be an https:// address: it "
                              "serves proxies over mutual TLS only")
        self.stream_path = path
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
        while True:
            before = self.connections
            try:
                await self._watch_once()
                cause: MeshError = DiscoveryError(f"control plane {self.url} ended the "
                                                  f"{self.what}")
            except MeshError as e:
                cause = e
            except (OSError, ssl.SSLError, TimeoutError) as e:
                cause = _translate(e, self.url, self.server_identity)
            except Exception as e:
                # The watch must outlive any surprise: the proxy depends on it.
                log.exception("%s failed unexpectedly server=%s", self.what, self.url)
                cause = DiscoveryError(f"unexpected {type(e).__name__}: {e}")
            self.connected = False
            self.last_error = cause
            attempt = 0 if self.connections > before else attempt + 1
            delay = self._backoff(attempt)
            log.warning("%s down server=%s cause=%s retry_in=%.2fs (serving the last "
                        "known data)", self.what, self.url, cause, delay)
            await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        """Exponential, capped, with jitter (half to all of the step), so restarts spread."""
        step = min(self._max_backoff, self._min_backoff * 2 ** min(attempt, 30))
        return step * (0.5 + 0.5 * self._rng.random())

    # -- one stream ------------------------------------------------------------------

    async def _watch_once(self) -> None:
        ctx = self._context()
        if ctx.verify_mode != ssl.CERT_REQUIRED:
            raise IdentityError("the TLS context for the control plane does not verify the "
                                "server's certificate; use the workload's client context")
        try:
            resp = await https.request(self.url, "GET", self.stream_path, context=ctx,
                                       server_hostname=self.server_identity.dns_name,
                                       timeout=self._connect_timeout)
        except TimeoutError:
            raise DiscoveryError(f"control plane {self.url} did not answer within "
                                 f"{self._connect_timeout:g}s") from None
        try:
            if resp.ssl_object is None:
                raise IdentityError(f"control plane {self.url} did not answer over TLS; the "
                                    "discovery server must be an https:// address")
            check_peer(resp.ssl_object, expected=self.server_identity, side="server",
                       peer=self.url)
            if resp.status != 200:
                raise DiscoveryError(await _refusal(resp, self.url))
            await self._read(resp)
        finally:
            await resp.close()

    async def _read(self, resp: https.Response) -> None:
        buffer = bytearray()
        scanned = 0
        while True:
            # Before the snapshot, and between messages: a silent stream is a dead one.
            async with asyncio.timeout(self._heartbeat * self._stale_after):
                chunk = await resp.chunk()
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

    # -- for subclasses ----------------------------------------------------------------

    def receive_line(self, line: bytes) -> None:
        raise NotImplementedError

    def set_heartbeat(self, seconds: object) -> None:
        """Adopt the heartbeat interval a snapshot announced."""
        if isinstance(seconds, int | float) and seconds > 0:
            self._heartbeat = float(seconds)

    def snapshot_applied(self) -> None:
        self.connections += 1
        self.connected = True
        self.last_error = None
        self.ready.set()


async def _refusal(resp: https.Response, url: str) -> str:
    text = (await resp.read()).decode(errors="replace")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "message" in doc:
        return (f"control plane {url} refused the watch ({resp.status} "
                f"{doc.get('error', '?')}): {doc['message']}")
    return f"control plane {url} answered {resp.status}: {text[:200]}"


def _translate(e: BaseException, url: str, expected: Identity) -> MeshError:
    if isinstance(e, ssl.SSLCertVerificationError):
        return IdentityError(f"control plane {url} is not trusted: {e.verify_message}; it "
                             f"must present {expected} under an anchor of the trust bundle")
    if isinstance(e, TimeoutError):
        return DiscoveryError(f"control plane {url} went silent (no message or heartbeat in "
                              "time); reconnecting")
    return DiscoveryError(f"control plane {url} unreachable: {type(e).__name__}: {e}")
