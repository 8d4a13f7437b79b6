"""One embedded cluster's API server process: state directory, keys, storage,
controllers and HTTPS listener, and the kubeconfig that points at them."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import socket
import sqlite3
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from aiohttp import web

from localcluster.admission import Admission
from localcluster.apiserver import ApiHandler
from localcluster.auth import Authorizer, TokenAuthority
from localcluster.catalog import Catalog
from localcluster.controllers import Controllers
from localcluster.pki import ensure_pki
from localcluster.registry import CRD_KEY, Registry
from localcluster.store import Store
from localcluster.workloads.nodes import node_name

if TYPE_CHECKING:
    from localcluster.kubelet.kubelet import Kubelet
    from localcluster.kubeproxy import KubeProxy
from mesh.errors import ConfigError

log = logging.getLogger(__name__)

MAX_BODY = 3 * 1024 * 1024


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    """0 reuses the port of an existing kubeconfig when it is free, else picks a free one."""
    service_cidr: str = "10.96.0.0/16"
    watch_history: int = 10_000
    """How many events a watch can resume across; older resourceVersions get 410 Gone."""
    bookmark_interval: float = 60.0
    synchronous: str = "FULL"
    also_listen: tuple[tuple[str, str, int], ...] = ()
    """(network namespace, host, port): more listeners, each in its own namespace, such
    as a cluster node's, so that workloads there reach the same server."""
    advertise: str | None = None
    """The address other machines reach the API server at, published in
    kube-public/cluster-info as kubeadm does (default: the first also_listen host, else
    host); the port is that listener's. With `kubelet`, also the ingress of LoadBalancer
    Services (if an IPv4 address; else the node's)."""
    kubelet: bool = False
    """Run the node's kubelet (localcluster.kubelet) and service proxy
    (localcluster.kubeproxy): needs the network `cluster up` built in the state
    directory."""


def _ipv4_or(address: str, fallback: str) -> str:
    try:
        return str(ipaddress.IPv4Address(address))
    except ValueError:
        return fallback


def _free_port(host: str, preferred: int) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise ConfigError(f"no free port on {host}")


def _previous_port(kubeconfig: Path) -> int:
    try:
        doc = yaml.safe_load(kubeconfig.read_text())
        server = doc["clusters"][0]["cluster"]["server"]
        return int(server.rsplit(":", 1)[1])
    except (OSError, ValueError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return 0


def write_kubeconfig(path: Path, *, name: str, server: str, ca_pem: bytes, token: str) -> None:
    doc: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": name, "cluster": {
            "server": server,
            "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
        "users": [{"name": f"{name}-admin", "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": f"{name}-admin",
                                                "namespace": "default"}}],
        "current-context": name,
    }
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _listener_in(netns: str, host: str, port: int) -> socket.socket:
    from localcluster.namespaces import socket_in_namespace

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket_in_namespace(netns, family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} in network namespace {netns}: "
                          f"{e.strerror or e}") from e
    return sock


class ClusterServer:
    """Start with `start()`, stop with `stop()`; `kubeconfig` is ready once started."""

    def __init__(self, config: ClusterConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.kubeconfig = config.state_dir / "kubeconfig"
        self.port = 0
        self._runner: web.AppRunner | None = None
        self.store: Store | None = None
        self.controllers: Controllers | None = None
        self.kubelet: Kubelet | None = None
        self.proxy: KubeProxy | None = None

    @property
    def url(self) -> str:
        host = self.config.host
        shown = f"[{host}]" if ":" in host else host
        return f"https://{shown}:{self.port}"

    async def start(self) -> None:
        cfg = self.config
        try:
            ipaddress.ip_network(cfg.service_cidr)
        except ValueError as e:
            raise ConfigError(f"--service-cidr {cfg.service_cidr!r} is not a network: {e}") from e
        try:
            cfg.state_dir.mkdir(parents=True, exist_ok=True)
            probe = cfg.state_dir / ".writable"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"state directory {cfg.state_dir}: {e.strerror or e}; pass a "
                              "writable directory with --state-dir") from e
        self.port = cfg.port or _free_port(cfg.host, _previous_port(self.kubeconfig))
        api_ip = str(ipaddress.ip_network(cfg.service_cidr).network_address + 1)
        hosts = [cfg.host, "127.0.0.1", "localhost", api_ip, "kubernetes", "kubernetes.default",
                 "kubernetes.default.svc", "kubernetes.default.svc.cluster.local",
                 *(host for _, host, _ in cfg.also_listen)]
        pki = ensure_pki(cfg.state_dir, cluster=cfg.name, hosts=hosts)
        db_path = cfg.state_dir / "cluster.db"
        try:
            store = Store(db_path, history=cfg.watch_history, synchronous=cfg.synchronous)
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"{db_path}: {e}; the cluster's store is damaged, move it away to "
                              "start an empty cluster") from e
        self.store = store
        catalog = Catalog()
        catalog.load(store.items(CRD_KEY))
        tokens = TokenAuthority(issuer=f"https://kubernetes.default.svc.{cfg.name}",
                                key=pki.sa_key, admin_token=pki.admin_token,
                                lookup=store.get, clock=self.clock)
        admission = Admission(store, catalog, service_cidr=cfg.service_cidr, tokens=tokens,
                              ca_pem=pki.ca_cert_pem, clock=self.clock)
        registry = Registry(store, catalog, admission, clock=self.clock,
                            graceful_pods=cfg.kubelet)
        authorizer = Authorizer(store.items, store.get)
        handler = ApiHandler(registry, tokens, authorizer,
                             server_address=lambda: f"{cfg.host}:{self.port}",
                             max_body=MAX_BODY, bookmark_interval=cfg.bookmark_interval)
        registry.webhooks.attach_metrics(handler.metrics)
        self.controllers = Controllers(registry, ca_pem=pki.ca_cert_pem)
        # The `kubernetes` Service's endpoint is the listener pods reach: on the node.
        in_cluster = cfg.also_listen[0][1:] if cfg.also_listen else (cfg.host, self.port)
        await self.controllers.bootstrap(api_ip, *in_cluster)
        advertised = cfg.advertise or (cfg.also_listen[0][1] if cfg.also_listen else cfg.host)
        port = next((p for _, h, p in cfg.also_listen if h == advertised), self.port)
        await self.controllers.publish_cluster_info(f"https://{advertised}:{port}")
        workloads = self.controllers.workloads

        async def register_node() -> None:
            await workloads.register_node(
                node_name(cfg.name),
                address=cfg.also_listen[0][1] if cfg.also_listen else cfg.host,
                state_dir=cfg.state_dir)

        await register_node()
        self.controllers.start()
        if cfg.kubelet:
            from localcluster.kubelet.kubelet import Kubelet
            from localcluster.reviews import token_request

            async def mint(namespace: str, account: str, body: dict[str, Any]
                           ) -> dict[str, Any]:
                return token_request(registry, tokens, namespace, account, body)

            from localcluster.kubeproxy import KubeProxy
            from localcluster.netns import BRIDGE

            # Pods reach the API server as on kube: the `kubernetes` Service's ClusterIP
            # and port, which the node's service proxy DNATs to the node's listener.
            self.kubelet = Kubelet(registry, cluster=cfg.name, state_dir=cfg.state_dir,
                                   register=register_node, mint=mint,
                                   api_endpoint=(api_ip, 443), clock=self.clock)
            network = self.kubelet.network
            self.proxy = KubeProxy(registry, node_netns=network.node_netns,
                                   pod_cidr=network.pod_cidr, bridge=BRIDGE,
                                   load_balancer_address=_ipv4_or(advertised,
                                                                  self.kubelet.host_ip))
            self.proxy.start()
            await self.kubelet.start()
            handler.kubelet = self.kubelet
            network = self.kubelet.network
            registry.webhooks.client.reach_pods(network.pod_cidr, network.node_netns)

        app = web.Application(client_max_size=MAX_BODY * 2)
        app.router.add_route("*", "/{tail:.*}", handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(pki.serving_cert, pki.serving_key)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.host, self.port, ssl_context=ctx,
                           reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            raise ConfigError(f"cannot listen on {cfg.host}:{self.port}: {e.strerror or e}; "
                              "choose another address with --listen") from e
        for netns, host, port in cfg.also_listen:
            await web.SockSite(self._runner, _listener_in(netns, host, port),
                               ssl_context=ctx).start()
        write_kubeconfig(self.kubeconfig, name=cfg.name, server=self.url,
                         ca_pem=pki.ca_cert_pem, token=pki.admin_token)
        log.info("cluster serving name=%s url=%s kubeconfig=%s", cfg.name, self.url,
                 self.kubeconfig)

    async def stop(self) -> None:
        if self.kubelet is not None:
            await self.kubelet.stop()
        if self.proxy is not None:
            await self.proxy.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.controllers is not None:
            await self.controllers.stop()
        if self.store is not None:
            self.store.close()


async def serve_forever(config: ClusterConfig, ready: Callable[[ClusterServer], None]) -> None:
    server = ClusterServer(config)
    await server.start()
    ready(server)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()
