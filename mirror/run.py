"""``meshgate mirror run``: the mirror controller process of one Link.

It serves ``/metrics``, ``/ready`` and ``/live`` on a small HTTP listener,
waits to hold the Link's Lease (`mirror.lease`), and mirrors while it holds it
(`mirror.controller`). A Lease that is lost stops the mirroring at once and
the process stands by again; SIGINT or SIGTERM stop it and release the Lease,
so a standby takes over without waiting for it to expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mesh.errors import ConfigError
from mesh.kube import api_client
from mirror.controller import LinkController
from mirror.lease import LeaseLock, LeaseSettings, default_identity, lease_name
from mirror.metrics import MirrorMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MirrorSettings:
    kubeconfig: Path
    link: str
    namespace: str = "meshgate"
    metrics_listen: tuple[str, int] = ("127.0.0.1", 9999)
    resync: float = 60.0
    lease_duration: float = 15.0
    lease_renew: float = 5.0
    identity: str | None = None


class Role(Enum):
    STANDBY = "standby"
    ACTIVE = "active"


class MirrorProcess:
    """One Link's controller behind its Lease, with its metrics listener."""

    def __init__(self, settings: MirrorSettings) -> None:
        self.settings = settings
        self.kube = api_client(settings.kubeconfig)
        self.identity = settings.identity or default_identity()
        self.metrics = MirrorMetrics()
        self.role = Role.STANDBY
        self.controller: LinkController | None = None
        self.address: tuple[str, int] | None = None
        self._lock = LeaseLock(self.kube, LeaseSettings(
            lease_name(settings.link), settings.namespace, self.identity,
            duration=settings.lease_duration, renew_period=settings.lease_renew))
        self._runner: web.AppRunner | None = None

    # -- the HTTP listener ---------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/live", self._live)
        return app

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _ready(self, request: web.Request) -> web.Response:
        if self.role is Role.STANDBY:
            return web.Response(text=f"ready: standing by for {self._lock.holder or 'nobody'}\n")
        if self.controller is not None and self.controller.ready:
            return web.Response(text="ready: mirroring\n")
        why = (self.controller.problem if self.controller is not None else "") or \
            "the clusters have not been read yet"
        return web.Response(status=503, text=f"not ready: {why}\n")

    async def _live(self, request: web.Request) -> web.Response:
        return web.Response(text="live\n")

    async def start(self) -> None:
        host, port = self.settings.metrics_listen
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as e:
            await runner.cleanup()
            raise ConfigError(f"cannot listen on {host}:{port} for metrics: {e.strerror or e}; "
                              "choose another address with --metrics-listen") from e
        self._runner = runner
        self.address = (str(runner.addresses[0][0]), int(runner.addresses[0][1]))

    async def close(self) -> None:
        if self.role is Role.ACTIVE:
            await asyncio.to_thread(self._lock.release)
        if self._runner is not None:
            await self._runner.cleanup()

    # -- leading and standing by -----------------------------------------------------

    async def run(self) -> None:
        """Mirror whenever this process holds the Lease, until cancelled."""
        s = self.settings
        while True:
            self.role = Role.STANDBY
            await self._lock.acquire()
            self.role = Role.ACTIVE
            controller = self.controller = LinkController(
                self.kube, link=s.link, namespace=s.namespace, metrics=self.metrics,
                resync=s.resync)
            work = asyncio.create_task(controller.run())
            hold = asyncio.create_task(self._lock.hold())
            try:
                done, _ = await asyncio.wait({work, hold}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (work, hold):
                    task.cancel()
                for task in (work, hold):
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                self.controller = None
            if work in done:
                work.result()  # the controller only ends by failing: let the process fail
            log.info("mirroring stopped link=%s/%s self=%s cause=lease lost", s.namespace,
                     s.link, self.identity)


def run(settings: MirrorSettings) -> None:
    """Run the controller until SIGINT or SIGTERM."""
    process = MirrorProcess(settings)  # the kubeconfig is checked here

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await process.start()
        assert process.address is not None
        host, port = process.address
        print(f"mirror controller for Link {settings.namespace}/{settings.link} as "
              f"{process.identity}; metrics at http://{host}:{port}/metrics", flush=True)
        work = asyncio.create_task(process.run())
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, stopped):
                task.cancel()
            (outcome,) = await asyncio.gather(work, return_exceptions=True)
            await process.close()
        if isinstance(outcome, Exception):
            raise outcome

    asyncio.run(main())
