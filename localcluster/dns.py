"""Cluster DNS: `<svc>.<ns>.svc.<cluster-domain>` answered from the cluster's
Services and EndpointSlices over UDP and TCP, as kube-dns and CoreDNS do.

The zone and the answers are data (localcluster.dnszone over mesh.dns, no
sockets); `DNSServer` here is mesh.dnsserver's server (listeners, forwarding,
metrics, rate-limited logs) answering from that zone once its informers have
synced. `start` wires it to a cluster with informers.

Not served: pod names (`a-b-c-d.<ns>.pod.<domain>`), per-endpoint hostnames of
headless Services (their SRV records point at the Service name instead), reverse
(PTR) lookups of Service IPs, and zone transfers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Sequence

import dns.message
import yaml
from kubernetes import client
from prometheus_client import CollectorRegistry

from localcluster.dnszone import ClusterZone
from mesh.dns import Address, Forward, Reply, format_address, parse_address, respond
from mesh.dnsserver import DNSServer as Server
from mesh.dnsserver import bind_sockets
from mesh.errors import ConfigError
from mesh.informer import Informer
from mesh.kube import api_client

log = logging.getLogger(__name__)


class DNSServer(Server):
    """Serves a `ClusterZone` on UDP and TCP; answers SERVFAIL in the zone until all
    `informers` have synced, and refuses names outside it when no upstream is given."""

    def __init__(self, zone: ClusterZone, *, informers: Sequence[Informer] = (),
                 upstreams: Sequence[Address] = (), upstream_timeout: float = 2.0,
                 registry: CollectorRegistry | None = None, tcp_idle_timeout: float = 10.0,
                 max_pending: int = 256) -> None:
        super().__init__(self._decide, upstreams=upstreams, upstream_timeout=upstream_timeout,
                         registry=registry, tcp_idle_timeout=tcp_idle_timeout,
                         max_pending=max_pending)
        self.zone = zone
        self._informers = tuple(informers)

    @property
    def ready(self) -> bool:
        return all(i.synced for i in self._informers)

    async def close(self) -> None:
        await super().close()
        await asyncio.gather(*(asyncio.to_thread(i.stop) for i in self._informers))

    def _decide(self, request: dns.message.Message) -> Reply | Forward:
        return respond(self.zone, request, synced=self.ready, forwarding=bool(self.upstreams))


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
