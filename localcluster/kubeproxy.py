"""The node's service proxy, run in the API server process beside the kubelet: it
follows Services and EndpointSlices in the store and keeps the node namespace's
``ip meshgate-services`` table equal to `serviceproxy.ruleset()` (one ``nft -f``
transaction per change, inside the node namespace only), and it writes each
LoadBalancer Service's ingress, the node's address, as a cloud's load-balancer
controller would.

Store events only enqueue: the rules under one key (every change renders the whole
table from what is, so a burst of events is one load), each LoadBalancer under its
own.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable
from ipaddress import IPv4Network

from localcluster import namespaces, serviceproxy
from localcluster.errors import ApiError
from localcluster.registry import Registry, WriteOptions
from localcluster.resources import BUILTIN
from localcluster.store import Event
from mesh.errors import ConfigError
from mesh.workqueue import TemporaryError, WorkQueue

log = logging.getLogger(__name__)

SERVICES = next(rt for rt in BUILTIN if (rt.group, rt.plural) == ("", "services"))
SLICES_KEY = ("discovery.k8s.io", "endpointslices")
RULES = ("", "")
"""The queue key of the ruleset; any other key is a LoadBalancer Service's."""
MANAGER = WriteOptions(field_manager="service-controller")


class KubeProxy:
    def __init__(self, registry: Registry, *, node_netns: str, pod_cidr: IPv4Network,
                 bridge: str, load_balancer_address: str) -> None:
        self.registry = registry
        self.node_netns = node_netns
        self.pod_cidr = pod_cidr
        self.bridge = bridge
        self.load_balancer_address = load_balancer_address
        self.loaded: str | None = None
        """The ruleset in the node now, as last loaded."""
        self.queue: WorkQueue[tuple[str, str]] = WorkQueue("service-proxy", self._reconcile)
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._argv = [_tool("nsenter"), f"--net={namespaces.namespace_path(node_netns)}",
                      "--", _tool("nft"), "-f", "-"]

    def start(self) -> None:
        self._unsubscribe = self.registry.store.subscribe(self._on_event)
        self.queue.add(RULES)
        for svc in self.registry.store.items(SERVICES.key):
            self.queue.add((svc["metadata"]["namespace"], svc["metadata"]["name"]))
        self._task = asyncio.create_task(self.queue.run())
        log.info("service proxy started netns=%s load_balancer=%s", self.node_netns,
                 self.load_balancer_address)

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _on_event(self, ev: Event) -> None:
        if ev.key == SERVICES.key:
            self.queue.add(RULES)
            self.queue.add((ev.namespace, ev.name))
        elif ev.key == SLICES_KEY:
            self.queue.add(RULES)

    async def _reconcile(self, key: tuple[str, str]) -> None:
        if key == RULES:
            await self._load_rules()
        else:
            await self._write_ingress(*key)

    async def _load_rules(self) -> None:
        store = self.registry.store
        ports = serviceproxy.service_ports(store.items(SERVICES.key), store.items(SLICES_KEY))
        text = serviceproxy.ruleset(ports, pod_cidr=self.pod_cidr, bridge=self.bridge)
        if text == self.loaded:
            return
        proc = await asyncio.create_subprocess_exec(
            *self._argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate(text.encode())
        if proc.returncode != 0:
            # The node namespace may be going (cluster down), or a rule is refused: try
            # again; the log says which.
            raise TemporaryError(f"nft refused the service rules in {self.node_netns!r}: "
                                 f"{err.decode(errors='replace').strip()}", delay=1.0)
        self.loaded = text
        log.info("service rules loaded netns=%s ports=%d with_endpoints=%d", self.node_netns,
                 len(ports), sum(1 for p in ports if p.backends))

    async def _write_ingress(self, namespace: str, name: str) -> None:
        svc = self.registry.store.get(SERVICES.key, namespace, name)
        if svc is None:
            return
        status = serviceproxy.load_balancer_status(svc, self.load_balancer_address)
        if status is None:
            return
        meta = {k: v for k, v in svc["metadata"].items() if k != "resourceVersion"}
        body = {**svc, "metadata": meta, "status": {**(svc.get("status") or {}), **status}}
        try:
            await self.registry.update(SERVICES, namespace, name, body, MANAGER,
                                       subresource="status")
        except ApiError as e:
            if e.code == 404:
                return
            raise TemporaryError(f"service {namespace}/{name}: ingress not written: {e}") from e
        log.info("load balancer ingress written service=%s/%s ip=%s", namespace, name,
                 self.load_balancer_address)


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"the node's service proxy needs `{name}` on PATH (nftables, "
                          "util-linux)")
    return found
