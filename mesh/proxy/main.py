"""One proxy process: its identity, discovery, listeners and admin server.

Listeners: inbound (4143, mTLS from other proxies), outbound (4140) plus one
redirected listener per service address in discovery (mesh.proxy.redirects), and
admin (4191: ``/metrics``, ``/ready``, ``/live``, ``/endpoints``, ``/redirects``).
Listening sockets set SO_REUSEPORT so that ``--workers N`` processes share them.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import signal
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from mesh.config import IdentityConfig, ProxyConfig
from mesh.errors import ConfigError
from mesh.identity.bundle import TrustBundle
from mesh.identity.errors import TrustSetupError
from mesh.identity.names import Identity, service_identity
from mesh.identity.static import StaticIdentity
from mesh.memory import return_freed_memory
from mesh.metrics import ProxyMetrics, exposition, share_between_processes
from mesh.proxy import native
from mesh.proxy.admin import JSON, TEXT, AdminServer, Answer, text
from mesh.proxy.assertion import AssertionVerifier, ClientCredentials, ReplayCache
from mesh.proxy.dial import Dialer
from mesh.proxy.discovery import Discovery, ServiceSpec, StaticDiscovery
from mesh.proxy.failover import failover_policy
from mesh.proxy.http import HttpOutbound
from mesh.proxy.inbound import Inbound, InboundPolicy
from mesh.proxy.listeners import listen
from mesh.proxy.outbound import Outbound
from mesh.proxy.pool import Pool
from mesh.proxy.redirects import Redirects
from mesh.proxy.through_gateway import ThroughGateway

if TYPE_CHECKING:
    from mesh.discovery.stream import ControlStream
    from mesh.identity.certstore import CertStore
    from mesh.proxy.policy import PolicyWatch

log = logging.getLogger("mesh.proxy")


class Workload(Protocol):
    """What a proxy or gateway needs of its identity, whatever provides it."""

    @property
    def identity(self) -> Identity: ...
    @property
    def bundle(self) -> TrustBundle: ...
    @property
    def certificates(self) -> tuple[x509.Certificate, ...]: ...
    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey: ...
    def server_context(self) -> ssl.SSLContext: ...
    def client_context(self) -> ssl.SSLContext: ...


async def load_workload(cfg: IdentityConfig, registry: CollectorRegistry
                        ) -> tuple[Workload, asyncio.Task[None] | None]:
    """The identity `cfg` describes: certificate files; a certificate from the
    identity service; or held files renewed through it and written back. Returns
    it with the task that renews it (cancel it to stop), None for files alone."""
    if cfg.server is None:
        assert cfg.cert_file is not None and cfg.key_file is not None
        workload: Workload = StaticIdentity.load(cfg.cert_file, cfg.key_file, cfg.trust_bundle)
        renewal = None
    else:
        store = _cert_store(cfg, registry)
        if cfg.renewed_files:
            _adopt_files(store, cfg)
        else:
            await store.start()
        workload, renewal = store, asyncio.create_task(store.run())
    if str(workload.identity) != cfg.name:
        if renewal is not None:
            renewal.cancel()
        raise ConfigError(f"identity.name is {cfg.name} but the certificate names "
                          f"{workload.identity}")
    return workload, renewal


def _cert_store(cfg: IdentityConfig, registry: CollectorRegistry) -> CertStore:
    from mesh.identity.certstore import CertStore
    from mesh.identity.client import HttpRequester

    assert cfg.server is not None
    token_file = cfg.token_file
    bundle_pem = cfg.trust_bundle.read_bytes()
    identity = Identity.parse(cfg.name)
    return CertStore(identity, HttpRequester(
        cfg.server, bundle_pem=bundle_pem, trust_domain=identity.trust_domain,
        control_ns=identity.control_ns, certificate_first=cfg.renewed_files,
        token=lambda: _read_token(token_file) if token_file is not None else None),
        bundle=TrustBundle.from_pem(bundle_pem), registry=registry)


def _adopt_files(store: CertStore, cfg: IdentityConfig) -> None:
    """Serve with the held certificate files and write every renewal back to them."""
    from mesh.identity.certstore import write_back
    from mesh.identity.errors import CertificateExpired

    assert cfg.cert_file is not None and cfg.key_file is not None
    try:
        chain, key = cfg.cert_file.read_bytes(), cfg.key_file.read_bytes()
    except OSError as e:
        raise TrustSetupError(f"cannot read {e.filename}: {e.strerror}; run `meshgate vm "
                              "join` to obtain the machine's certificate") from e
    try:
        store.adopt(chain, key)
    except CertificateExpired as e:
        if not _lapsed(chain):
            raise  # not yet valid: the message names the clock
        raise CertificateExpired(
            f"{e}. The identity service renews only a valid certificate, so this machine "
            f"must join again: run `meshgate vm leave`, then `meshgate vm join` with a new "
            f"token from `meshgate vm token`") from e
    store.on_change.append(write_back(cfg.cert_file, cfg.key_file))


def _lapsed(chain_pem: bytes) -> bool:
    """Whether the leaf of ``chain_pem`` is past its notAfter (an expired issuer's
    leaves are clamped to its own expiry, so the leaf tells for the chain)."""
    leaf = x509.load_pem_x509_certificate(chain_pem)
    return leaf.not_valid_after_utc.timestamp() <= time.time()


async def serve_admin(admin: AdminServer, address: str) -> asyncio.AbstractServer:
    """Serve the admin endpoints (``/metrics``, ``/ready``, ``/live``) on HOST:PORT."""
    return await listen(admin.protocol, address, "admin")


class Proxy:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.metrics = ProxyMetrics()
        self.flows = self.metrics.flows()
        self.servers: list[asyncio.AbstractServer] = []
        self.admin: asyncio.AbstractServer | None = None
        self.workload: Workload | None = None
        self._renewal: asyncio.Task[None] | None = None
        self._trimmer: asyncio.Task[None] | None = None
        self.ready = False
        self.discovery: Discovery | None = None
        """What the outbound routes by: `_source`, through the gateway when configured."""
        self._source: Discovery | None = None
        self.outbound: Outbound | None = None
        self.redirects: Redirects | None = None
        self._streams: list[ControlStream] = []

    def _discovery(self, workload: Workload) -> Discovery:
        source = self._source = self._discovery_source(workload)
        gateway = self.config.outbound.gateway
        if gateway is None:
            return source
        log.info("outbound through gateway address=%s identity=%s", gateway.address,
                 gateway.identity)
        return ThroughGateway(source, address=gateway.address, identity=gateway.identity)

    def _discovery_source(self, workload: Workload) -> Discovery:
        dest = self.config.destination
        if dest is not None:
            from mesh.discovery.client import WatchDiscovery

            watch = WatchDiscovery(dest.server, context=workload.client_context,
                                   server_identity=self._control_identity(workload))
            watch.start()
            self._streams.append(watch)
            return watch
        if self.config.discovery is None:
            return StaticDiscovery.empty()
        return StaticDiscovery.load(self.config.discovery)

    def _control_identity(self, workload: Workload) -> Identity:
        dest = self.config.destination
        assert dest is not None
        if dest.server_identity:
            return Identity.parse(dest.server_identity)
        me = workload.identity
        return service_identity(me.trust_domain, me.control_ns)

    def _policy(self, workload: Workload) -> PolicyWatch | None:
        dest, served = self.config.destination, self.config.workload
        if dest is None or served is None:
            return None
        from mesh.proxy.policy import PolicyWatch

        watch = PolicyWatch(dest.server, namespace=served.namespace, pod=served.pod,
                            external_workload=served.external_workload,
                            context=workload.client_context,
                            server_identity=self._control_identity(workload))
        watch.start()
        self._streams.append(watch)
        return watch

    async def _listen(self, factory: Callable[[], asyncio.BaseProtocol], address: str,
                      what: str) -> None:
        self.servers.append(await listen(factory, address, what))

    async def start(self) -> None:
        self.workload, self._renewal = await load_workload(self.config.identity,
                                                           self.metrics.registry)
        workload = self.workload
        discovery = self._discovery(workload)
        policy = self._policy(workload)
        inbound = Inbound(InboundPolicy(app_host=self.config.inbound.app_host,
                                        authorized=frozenset(self.config.inbound.authorized),
                                        header_timeout=self.config.detect_timeout.total_seconds(),
                                        ports=policy.for_port if policy else None,
                                        trusted_gateways=tuple(
                                            self.config.inbound.trusted_gateways)),
                          workload.server_context, self.metrics, self.flows,
                          assertions=AssertionVerifier(lambda: workload.bundle,
                                                       replay=ReplayCache()))
        if policy is not None:
            policy.subscribe(inbound.policy_changed)
        out_cfg = self.config.outbound
        # Dials peers with the workload's context and signs caller assertions for gateways.
        dialer = Dialer(ClientCredentials(workload),
                        timeout=out_cfg.connect_timeout.total_seconds())
        http = HttpOutbound(Pool(dialer), self.metrics,
                            request_timeout=out_cfg.request_timeout.total_seconds(),
                            own_identity=lambda: workload.identity,
                            head_timeout=self.config.detect_timeout.total_seconds())
        outbound = Outbound(discovery, dialer, self.metrics, self.flows,
                            own_identity=lambda: workload.identity, http=http,
                            detect_timeout=self.config.detect_timeout.total_seconds(),
                            opaque_ports=frozenset(out_cfg.opaque_ports),
                            failover=failover_policy(out_cfg.failback_hold_down.total_seconds()))
        await self._listen(inbound.protocol, self.config.inbound.listen, "inbound")
        await self._listen(outbound.protocol, self.config.outbound.listen, "outbound")
        self.discovery, self.outbound = discovery, outbound
        self.redirects = Redirects(outbound.protocol)
        if self.config.outbound.redirect:
            # Subscribe first: a stream may announce services while listeners open.
            discovery.subscribe(self._service_changed)
            for stream in self._streams:
                await stream.wait_ready(5.0)
            for service in discovery.services():
                await self.redirects.open(service)
        await self._start_admin()
        self._trimmer = asyncio.create_task(return_freed_memory())
        self.ready = True
        log.info("proxy ready identity=%s inbound=%s outbound=%s services=%d compiled=%d/%d",
                 workload.identity, self.config.inbound.listen, self.config.outbound.listen,
                 len(discovery.services()), len(native.compiled()), len(native.MODULES))
        if stale := native.stale():
            log.warning("compiled modules older than their sources modules=%s: the proxy runs "
                        "the old code; run `make native`", ",".join(stale))

    def _service_changed(self, service: ServiceSpec) -> None:
        redirects = self.redirects
        if redirects is not None and service.address not in redirects and service.endpoints:
            task = asyncio.get_running_loop().create_task(redirects.open(service))
            task.add_done_callback(_log_failure)

    def reload(self) -> None:
        """Re-read the discovery file (SIGHUP); the last good data stays on failure."""
        if isinstance(self._source, StaticDiscovery) and self._source.path is not None:
            self._source.reload()

    async def _start_admin(self) -> None:
        self.admin = await serve_admin(AdminServer({
            "/metrics": self._metrics, "/ready": self._ready, "/live": lambda: text("live\n"),
            "/endpoints": self._endpoints, "/redirects": self._redirects}),
            self.config.admin.listen)

    def _metrics(self) -> Answer:
        return 200, TEXT, exposition(self.metrics.registry)

    def _ready(self) -> Answer:
        return text("ready\n") if self.ready else text("not ready\n", 503)

    def _endpoints(self) -> Answer:
        """Every service the proxy knows and the endpoints behind it, as discovery says."""
        services = self.discovery.services() if self.discovery is not None else []
        return 200, JSON, msgspec.json.encode(services)

    def _redirects(self) -> Answer:
        """Each redirected listener: its address, service, state (bound or failed) and
        the cause of its failure, naming the process that holds the address."""
        report = self.redirects.report() if self.redirects is not None else []
        return 200, JSON, json.dumps(report).encode()

    async def stop(self) -> None:
        self.ready = False
        if self.redirects is not None:
            self.redirects.close()
        for server in self.servers:
            server.close()
        if self.outbound is not None and self.outbound.http is not None:
            self.outbound.http.pool.close_idle()
        for task in (self._renewal, self._trimmer):
            if task is not None:
                task.cancel()
        for stream in self._streams:
            await stream.stop()
        if self.admin is not None:
            self.admin.close()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("redirected listener not opened cause=%s", task.exception())


def _read_token(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError as e:
        log.warning("token file unreadable path=%s cause=%s", path, e.strerror)
        return None


def settle_heap() -> None:
    """Move everything start-up made (modules, config, contexts) out of the
    collector's way: a full collection would otherwise walk it all again and
    again while requests allocate, which showed as a few percent of a busy proxy."""
    gc.collect()
    gc.freeze()


def run(config: ProxyConfig, *, workers: int = 1, loop: str = "uvloop") -> None:
    """Run the proxy until SIGINT/SIGTERM, in ``workers`` processes."""
    children: list[int] = []
    shared: str | None = None
    if workers > 1:
        # Every worker answers /metrics with the sum of all workers.
        shared = tempfile.mkdtemp(prefix="meshgate-metrics-")
        share_between_processes(Path(shared))
    for _ in range(workers - 1):
        pid = os.fork()
        if pid == 0:
            children, shared = [], None
            break
        children.append(pid)
    if loop == "uvloop":
        import uvloop

        uvloop.install()

    async def main() -> None:
        proxy = Proxy(config)
        stop = asyncio.Event()
        ev = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            ev.add_signal_handler(sig, stop.set)
        ev.add_signal_handler(signal.SIGHUP, proxy.reload)
        try:
            await proxy.start()
            settle_heap()
            print(f"proxy {proxy.workload.identity if proxy.workload else ''} ready "
                  f"(pid {os.getpid()})", flush=True)
            await stop.wait()
        finally:
            await proxy.stop()

    try:
        asyncio.run(main())
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ChildProcessError, ProcessLookupError):
                pass
        if shared is not None:
            shutil.rmtree(shared, ignore_errors=True)
