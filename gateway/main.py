"""``meshgate gateway run``: one gateway process and its admin server.

The gateway loads its workload identity as a proxy does (files or the identity
service), reads its cluster through informers on Services, EndpointSlices,
Pods, ExternalWorkloads and the policy resources (the same feeds as the control
plane's destination and policy APIs), listens for linked clusters' proxies (4143) and
serves ``/ready``, ``/live`` and ``/metrics`` (4191). ``/ready`` answers 200
once the identity is loaded and every informer has listed the cluster: a
mirror's probe then knows the gateway can route.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from gateway.exports import Exports
from gateway.listener import GatewayListener
from mesh.config import GatewayConfig
from mesh.control.watches import watch_destinations, watch_policy_resources, watch_workloads
from mesh.identity.names import Identity
from mesh.informer import Informer, all_synced, stop_all
from mesh.kube import api_client
from mesh.memory import return_freed_memory
from mesh.metrics import GatewayMetrics, exposition
from mesh.proxy.admin import TEXT, AdminServer, Answer, text
from mesh.proxy.assertion import AssertionVerifier
from mesh.proxy.dial import Dialer
from mesh.proxy.listeners import listen
from mesh.proxy.main import Workload, load_workload, serve_admin

log = logging.getLogger("gateway")


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.kube = api_client(config.kubeconfig)  # a kubeconfig that cannot be used: here
        self.exports = Exports(Identity.parse(config.identity.name),
                               cluster_domain=config.cluster_domain,
                               exported_label=config.exported_label,
                               trusted_gateways=config.trusted_gateways,
                               default_policy=config.default_policy)
        self.workload: Workload | None = None
        self.informers: list[Informer] = []
        self.servers: list[asyncio.AbstractServer] = []
        self.admin: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def ready(self) -> bool:
        return self.workload is not None and all_synced(self.informers)

    async def start(self) -> None:
        self.workload, renewal = await load_workload(self.config.identity,
                                                     self.metrics.registry)
        if renewal is not None:
            self._tasks.append(renewal)
        workload = self.workload
        loop = asyncio.get_running_loop()
        exports = self.exports
        self.informers = watch_destinations(self.kube, loop, pods=exports.pod_event,
                                            slices=exports.slice_event,
                                            services=exports.service_event)
        self.informers += watch_policy_resources(self.kube, loop, exports.policy_event)
        # The cluster's VMs, which may reach every Service (not only exported ones).
        workloads = watch_workloads(self.kube, exports.workload_event)
        workloads.start(loop)
        self.informers.append(workloads)
        cfg = self.config
        listener = GatewayListener(
            exports, self.metrics, server_context=workload.server_context,
            # The caller's identity travels in the header: never in plain TCP.
            dialer=Dialer(workload.client_context,
                          timeout=cfg.connect_timeout.total_seconds(), plain=False),
            handshake_timeout=cfg.handshake_timeout.total_seconds(),
            header_timeout=cfg.header_timeout.total_seconds(),
            assertions=AssertionVerifier(lambda: workload.bundle))
        self.servers.append(await listen(listener.protocol, cfg.listen, "gateway"))
        self.admin = await serve_admin(AdminServer({
            "/metrics": self._metrics, "/ready": self._ready,
            "/live": lambda: text("live\n")}), cfg.admin)
        self._tasks.append(asyncio.create_task(return_freed_memory()))
        log.info("gateway started identity=%s listen=%s admin=%s exported=%s "
                 "trusted_gateways=%s", workload.identity, cfg.listen, cfg.admin,
                 cfg.exported_label, ",".join(cfg.trusted_gateways) or "-")

    def _ready(self) -> Answer:
        if self.ready:
            return text("ready\n")
        waiting = [inf.kind for inf in self.informers if not inf.synced]
        why = ("the identity is not loaded" if self.workload is None else
               f"the cluster has not been read yet ({', '.join(waiting)}; are the policy "
               "CRDs installed?)")
        return text(f"not ready: {why}\n", 503)

    def _metrics(self) -> Answer:
        return 200, TEXT, exposition(self.metrics.registry)

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for task in self._tasks:
            task.cancel()
        stop_all(self.informers)
        if self.admin is not None:
            self.admin.close()


def run(config: GatewayConfig, *, loop: str = "uvloop") -> None:
    """Run the gateway until SIGINT or SIGTERM."""
    if loop == "uvloop":
        import uvloop

        uvloop.install()
    gateway = Gateway(config)  # the kubeconfig is checked here

    async def main() -> None:
        stop = asyncio.Event()
        ev = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            ev.add_signal_handler(sig, stop.set)
        try:
            await gateway.start()
            print(f"gateway {gateway.exports.identity} listening on {config.listen} "
                  f"(pid {os.getpid()})", flush=True)
            await stop.wait()
        finally:
            await gateway.stop()

    asyncio.run(main())
