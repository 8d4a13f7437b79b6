"""Gateway liveness: an HTTP probe of every gateway address each period (with
±10 % jitter), and a hysteresis state machine per address, so that one lost or
late probe never turns a cluster's endpoints not-ready.

`GatewayHealth` is the pure state machine; `GatewayProber` is the thin asyncio
loop that feeds it with ``GET http://<address>:<port><path>`` results, keeps
the metrics, and tells its owner when an address changed state.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp

from mirror.link import ProbeSpec
from mirror.metrics import MirrorMetrics
from mirror.mirrors import GatewayEndpoint

log = logging.getLogger(__name__)

JITTER = 0.1
LATENCY_WINDOW = 100
"""Successful probes the Link's latency percentiles are computed over (5 minutes at
the default 3 s period)."""


@dataclass
class GatewayHealth:
    """Alive until `failure_threshold` consecutive probes fail; alive again after
    `success_threshold` consecutive probes succeed. Starts alive, so a restarted
    controller does not fail a whole cluster before it has probed it."""

    failure_threshold: int
    success_threshold: int = 1
    alive: bool = True
    probed: bool = False
    failures: int = 0
    successes: int = 0
    last_error: str = ""

    def record(self, ok: bool, error: str = "") -> bool:
        """Feed one probe's outcome; returns whether `alive` changed."""
        self.probed = True
        if ok:
            self.failures, self.last_error = 0, ""
            self.successes += 1
            if not self.alive and self.successes >= self.success_threshold:
                self.alive = True
                return True
        else:
            self.successes, self.last_error = 0, error
            self.failures += 1
            if self.alive and self.failures >= self.failure_threshold:
                self.alive = False
                return True
        return False


@dataclass(frozen=True)
class ProbeResult:
    address: str
    ok: bool
    latency_ms: float
    error: str = ""


class GatewayProber:
    """Probes the addresses `addresses()` returns, every `spec.period`."""

    def __init__(self, cluster: str, spec: ProbeSpec, addresses: Callable[[], Sequence[str]],
                 *, metrics: MirrorMetrics, on_change: Callable[[], None],
                 rng: random.Random | None = None) -> None:
        self.cluster = cluster
        self.spec = spec
        self.health: dict[str, GatewayHealth] = {}
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        """Milliseconds of the latest successful probes, every address together."""
        self.probes = 0
        """Probe rounds so far."""
        self._addresses = addresses
        self._metrics = metrics
        self._on_change = on_change
        self._rng = rng or random.Random()

    # -- what it knows ------------------------------------------------------------

    def endpoints(self) -> list[GatewayEndpoint]:
        return [GatewayEndpoint(a, self._health(a).alive) for a in self._addresses()]

    @property
    def alive(self) -> bool:
        return any(ep.ready for ep in self.endpoints())

    def summary(self) -> tuple[bool | None, str, str]:
        """(status, reason, message) for the Link's GatewayAlive condition."""
        addresses = list(self._addresses())
        if not addresses:
            return False, "NoAddresses", ("the gateway has no address yet: gatewayAddress is "
                                          "empty or its names have not resolved")
        if not any(self._health(a).probed for a in addresses):
            return None, "NotProbed", "the gateway has not been probed yet"
        dead = [a for a in addresses if not self._health(a).alive]
        where = f"port {self.spec.port} path {self.spec.path}"
        if not dead:
            return True, "ProbeSucceeded", f"every gateway address answers its probe ({where})"
        causes = "; ".join(f"{a}: {self._health(a).last_error or 'failing'}" for a in dead)
        if len(dead) == len(addresses):
            return False, "ProbeFailed", (f"no gateway address answers its probe ({where}) "
                                          f"{self.spec.failure_threshold} times in a row: "
                                          f"{causes}")
        return True, "PartiallyAlive", f"some gateway addresses fail their probe: {causes}"

    def _health(self, address: str) -> GatewayHealth:
        found = self.health.get(address)
        if found is None:
            found = self.health[address] = GatewayHealth(self.spec.failure_threshold,
                                                         self.spec.success_threshold)
        return found

    # -- the loop -----------------------------------------------------------------

    async def run(self) -> None:
        """Probe now, then every period with jitter, until cancelled."""
        timeout = aiohttp.ClientTimeout(total=self.spec.timeout)
        connector = aiohttp.TCPConnector(force_close=True)  # each probe a fresh connection
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            while True:
                await self.probe_once(session)
                period = self.spec.period * self._rng.uniform(1 - JITTER, 1 + JITTER)
                await asyncio.sleep(period)

    async def probe_once(self, session: aiohttp.ClientSession) -> None:
        addresses = list(self._addresses())
        for gone in set(self.health) - set(addresses):
            del self.health[gone]
        before = self.summary()[:2]
        results = await asyncio.gather(*(self._probe(session, a) for a in addresses))
        changed = False
        for result in results:
            self._metrics.probes.labels(self.cluster, str(result.ok).lower()).inc()
            if result.ok:
                self._metrics.probe_latency.labels(self.cluster).observe(result.latency_ms)
                self.latencies.append(result.latency_ms)
            health = self._health(result.address)
            if health.record(result.ok, result.error):
                changed = True
                log.info("gateway %s cluster=%s address=%s probe=%s cause=%s",
                         "alive" if health.alive else "not alive", self.cluster,
                         result.address, self._url(result.address),
                         "probe succeeded" if result.ok else
                         f"{health.failures} probes failed in a row, last: {result.error}")
        self._metrics.gateway_alive.labels(self.cluster).set(1 if self.alive else 0)
        self.probes += 1
        if changed or self.summary()[:2] != before:
            self._on_change()

    def _url(self, address: str) -> str:
        host = f"[{address}]" if ":" in address else address
        return f"http://{host}:{self.spec.port}{self.spec.path}"

    async def _probe(self, session: aiohttp.ClientSession, address: str) -> ProbeResult:
        start = time.monotonic()
        try:
            async with session.get(self._url(address), allow_redirects=False) as resp:
                await resp.read()
                ok = 200 <= resp.status < 300
                error = "" if ok else f"HTTP {resp.status}"
        except TimeoutError:
            ok, error = False, f"no answer within {self.spec.timeout:g}s"
        except aiohttp.ClientConnectorError as e:
            ok, error = False, f"cannot connect: {e.os_error.strerror or e.os_error}"
        except (aiohttp.ClientError, OSError) as e:
            ok, error = False, f"{type(e).__name__}: {e}"
        return ProbeResult(address, ok, (time.monotonic() - start) * 1000, error)
