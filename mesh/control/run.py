"""``meshgate control run``: the per-cluster control-plane process.

One mTLS app serves the identity service (``/v1/certify``, ``/v1/status``),
the destination API (``/v1/destinations``) and the policy API
(``/v1/policy``), with one ``/metrics`` page for all and a ``/ready`` that
holds until the cluster has been read; it listens on every address of
``--listen`` (e.g. the node's address for pods and the WAN address for VMs).
Beside them runs the endpoints controller for ExternalWorkloads
(`mesh.control.workloads`). The listeners accept callers without a
certificate, since a workload asks for its first certificate with a token; the
destination API refuses those itself (see `mesh.discovery.server`). The server
presents the identity service's own identity (`service_identity`), which is
what proxies check for.

Errors a person can fix (a kubeconfig that cannot be used, a missing or
broken identity directory, a trust domain that is not the directory's, an
address in use) end the command with exit status 2 and one line.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

from mesh.control.externalworkloads import DEFAULT_INTERVAL, DEFAULT_MISSED
from mesh.control.policy import PolicyIndex
from mesh.control.policy_api import PolicyService
from mesh.control.workloads import WorkloadEndpoints
from mesh.discovery.index import DestinationIndex
from mesh.discovery.server import DestinationService
from mesh.errors import ConfigError
from mesh.identity.ca import IssuerDir
from mesh.identity.commands import _trust_domain
from mesh.identity.names import DEFAULT_CONTROL_NS
from mesh.identity.service import MAX_BODY, IdentityService
from mesh.identity.trustroots import keep_published
from mesh.injectorserver import PATH as INJECT_PATH
from mesh.injectorserver import Injector, InjectorConfig
from mesh.kube import api_client
from mesh.memory import return_freed_memory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlSettings:
    kubeconfig: Path
    identity_dir: Path
    trust_domain: str
    listen: tuple[tuple[str, int], ...] = (("0.0.0.0", 8086),)
    cluster_domain: str = "cluster.local"
    cluster_name: str | None = None
    control_ns: str = DEFAULT_CONTROL_NS
    heartbeat: float = 10.0
    leaf_lifetime: dt.timedelta = dt.timedelta(hours=24)
    workload_heartbeat: float = DEFAULT_INTERVAL
    """Seconds between an ExternalWorkload's heartbeats."""
    workload_missed_heartbeats: int = DEFAULT_MISSED
    """Heartbeats missed after which an ExternalWorkload's endpoints are not ready."""
    injector_listen: tuple[str, int] | None = None
    """Where to serve the proxy injector webhook (mesh.injectorserver); None: not."""
    service_cidrs: tuple[str, ...] = ()
    """The service CIDRs the injector makes local in pods; empty: the cluster's."""

    def __post_init__(self) -> None:
        if not self.listen:
            raise ConfigError("the control plane needs at least one address to listen on")


class ControlPlane:
    """Identity, destination and policy on every listener; `start` returns once it
    listens on all of them."""

    def __init__(self, settings: ControlSettings) -> None:
        self.settings = settings
        self.kube = api_client(settings.kubeconfig)
        _check_identity_dir(settings.identity_dir, settings.trust_domain)
        self.registry = CollectorRegistry()
        self.identity = IdentityService(settings.identity_dir, self.kube,
                                        trust_domain=settings.trust_domain,
                                        control_ns=settings.control_ns,
                                        leaf_lifetime=settings.leaf_lifetime,
                                        registry=self.registry)
        self.index = DestinationIndex(trust_domain=settings.trust_domain,
                                      cluster_domain=settings.cluster_domain,
                                      control_ns=settings.control_ns,
                                      cluster_name=settings.cluster_name or "")
        self.destinations = DestinationService(
            self.index, trust=lambda: self.identity.issuer().bundle, registry=self.registry,
            heartbeat=settings.heartbeat)
        self.policies = PolicyService(
            PolicyIndex(settings.trust_domain, control_ns=settings.control_ns),
            trust=lambda: self.identity.issuer().bundle, registry=self.registry,
            heartbeat=settings.heartbeat)
        self.workloads = WorkloadEndpoints(self.kube, registry=self.registry,
                                           interval=settings.workload_heartbeat,
                                           missed=settings.workload_missed_heartbeats)
        self.addresses: list[tuple[str, int]] = []
        self._runner: web.AppRunner | None = None
        self._maintain: asyncio.Task[None] | None = None
        self._trimmer: asyncio.Task[None] | None = None
        self._publisher: asyncio.Task[None] | None = None
        self.injector: Injector | None = None
        if settings.injector_listen is not None:
            self.injector = Injector(
                InjectorConfig(trust_domain=settings.trust_domain,
                               cluster_domain=settings.cluster_domain,
                               control_ns=settings.control_ns,
                               service_cidrs=settings.service_cidrs),
                self.kube, lambda: (self.identity.issuer().key, self.identity.issuer().bundle))
        self._injector_renewal: asyncio.Task[None] | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY * 2)
        # Every route of the identity service but its /ready, which knows nothing of
        # the cluster; /metrics serves the registry both services share.
        for route in self.identity.app().router.routes():
            path = route.resource.canonical if route.resource is not None else ""
            if path != "/ready":
                app.router.add_route(route.method, path, route.handler)
        self.destinations.add_routes(app)
        self.policies.add_routes(app)
        app.router.add_get("/ready", self._ready)
        return app

    async def _ready(self, request: web.Request) -> web.Response:
        if self.destinations.ready and self.policies.ready:
            return web.Response(text="ready\n")
        return web.Response(text="not ready: the cluster has not been read yet (are the "
                            "policy CRDs installed?)\n", status=503)

    async def start(self) -> None:
        socks: list[socket.socket] = []
        try:
            for host, port in dict.fromkeys(self.settings.listen):
                socks.append(_bind(host, port))
            ctx = self.identity.server_context()  # loads the issuer: a broken one fails here
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        self.addresses = [sock.getsockname()[:2] for sock in socks]
        # handler_cancellation: a watch whose proxy has gone ends at once, rather than
        # at its next write, and lets go of what it holds.
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                               handler_cancellation=True,
                               shutdown_timeout=1.0)
        await runner.setup()
        self._runner = runner
        for sock, address in zip(socks, self.addresses, strict=True):
            try:
                await web.SockSite(runner, sock, ssl_context=ctx, backlog=1024).start()
            except OSError as e:
                for s in socks:
                    s.close()
                raise ConfigError(f"cannot listen on {_hostport(address)}: "
                                  f"{e.strerror or e}") from e
        if self.injector is not None and self.settings.injector_listen is not None:
            await self.injector.start(*self.settings.injector_listen)
            self._injector_renewal = asyncio.create_task(self.injector.maintain())
        loop = asyncio.get_running_loop()
        self.destinations.watch_cluster(self.kube, loop)
        self.policies.watch_cluster(self.kube, loop)
        self.workloads.start(loop)
        self._maintain = asyncio.create_task(self.identity.maintain())
        self._trimmer = asyncio.create_task(return_freed_memory())
        # The bundle in a ConfigMap too, for tools that compare linked clusters' anchors.
        self._publisher = asyncio.create_task(keep_published(
            self.kube, self.settings.control_ns, lambda: self.identity.issuer().bundle))

    async def stop(self) -> None:
        for task in (self._maintain, self._trimmer, self._publisher, self._injector_renewal):
            if task is not None:
                task.cancel()
        if self.injector is not None:
            await self.injector.stop()
        self.destinations.stop()
        self.policies.stop()
        await self.workloads.stop()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def address(self) -> tuple[str, int]:
        """The first address it listens on."""
        assert self.addresses, "not started"
        return self.addresses[0]

    @property
    def url(self) -> str:
        return f"https://{_hostport(self.address)}"

    @property
    def urls(self) -> list[str]:
        return [f"https://{_hostport(a)}" for a in self.addresses]


def _check_identity_dir(path: Path, trust_domain: str) -> None:
    if not path.is_dir():
        raise ConfigError(f"identity directory {path} does not exist; create it with "
                          f"`meshgate identity init --trust-domain {trust_domain} --out {path}`")
    found = _trust_domain(IssuerDir(path))
    if found != trust_domain:
        raise ConfigError(f"identity directory {path} holds the anchor of trust domain "
                          f"{found}, not {trust_domain}; pass --trust-domain {found} or the "
                          "directory of that trust domain")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {_hostport((host, port))}: {e.strerror or e}; "
                          "choose another address with --listen") from e
    return sock


def _hostport(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run(settings: ControlSettings) -> None:
    """Run the control plane until SIGINT or SIGTERM."""
    plane = ControlPlane(settings)  # kubeconfig and identity directory checked here

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await plane.start()
            cluster = f" of cluster {settings.cluster_name}" if settings.cluster_name else ""
            print(f"control plane{cluster} for {settings.trust_domain} serving at "
                  f"{' '.join(plane.urls)} as {plane.identity.identity}", flush=True)
            if plane.injector is not None and plane.injector.address is not None:
                host, port = plane.injector.address
                print(f"injector serving at https://{_hostport((host, port))}{INJECT_PATH}",
                      flush=True)
            await stop.wait()
        finally:
            await plane.stop()

    asyncio.run(main())

