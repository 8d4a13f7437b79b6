"""The kubelet of the embedded cluster's one node, run inside the API server
process: it registers the Node (and keeps its heartbeat), binds unscheduled
Pods to it, and keeps one `PodWorker` per Pod bound to it. Store events only
enqueue Pod keys; each reconcile reads the Pod as it is now.

Pods that carry kube's mirror-pod annotation (`MIRROR_ANNOTATION`), as a
kubelet's static Pods do, run elsewhere: the kubelet leaves them alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from localcluster import netns
from localcluster.errors import ApiError
from localcluster.events import EventRecorder
from localcluster.kubelet.binding import Scheduler, wants_binding
from localcluster.kubelet.reap import processes_in
from localcluster.kubelet.volumes import TokenMinter
from localcluster.kubelet.worker import MANAGER, PODS_KEY, Node, PodWorker, sandbox_key
from localcluster.registry import Registry
from localcluster.store import Event
from localcluster.workloads.nodes import node_name
from mesh.workqueue import WorkQueue

log = logging.getLogger(__name__)

MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
HEARTBEAT_SECONDS = 40.0
SHUTDOWN_GRACE = 2.0
"""Seconds each Pod's containers get to stop when the kubelet itself stops."""


class Kubelet:
    def __init__(self, registry: Registry, *, cluster: str, state_dir: Path,
                 register: Callable[[], Awaitable[None]], mint: TokenMinter,
                 api_endpoint: tuple[str, int],
                 clock: Callable[[], float] = time.time) -> None:
        """`register` creates the Node or refreshes its status (and its Lease): on start
        and every `HEARTBEAT_SECONDS`."""
        self.registry = registry
        self.register = register
        self.network = netns.ClusterNetwork.load(state_dir)
        self.node_name = node_name(cluster)
        self.host_ip = str(self.network.gateway.ip)
        self.node = Node(registry=registry, name=self.node_name, host_ip=self.host_ip,
                         network=self.network, root=state_dir / "kubelet" / "pods",
                         events=EventRecorder(registry, component="kubelet",
                                              host=self.node_name, clock=clock),
                         clock=clock, mint=mint, service_env={
                             "KUBERNETES_SERVICE_HOST": api_endpoint[0],
                             "KUBERNETES_SERVICE_PORT": str(api_endpoint[1]),
                             "KUBERNETES_SERVICE_PORT_HTTPS": str(api_endpoint[1])})
        self.scheduler = Scheduler(registry, self.node_name)
        self.workers: dict[tuple[str, str], PodWorker] = {}
        self.queue: WorkQueue[tuple[str, str]] = WorkQueue("kubelet", self._reconcile)
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubscribe: Callable[[], None] | None = None

    async def start(self) -> None:
        _quiet_forks()
        await self.register()
        await self._forget_previous()
        self._unsubscribe = self.registry.store.subscribe(self._on_event)
        for pod in self.registry.store.items(PODS_KEY):
            self.queue.add((pod["metadata"]["namespace"], pod["metadata"]["name"]))
        self._tasks = [asyncio.create_task(self.queue.run()),
                       asyncio.create_task(self._heartbeat())]
        log.info("kubelet started node=%s address=%s", self.node_name, self.host_ip)

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(w.shutdown(SHUTDOWN_GRACE) for w in self.workers.values()),
                             return_exceptions=True)
        self.workers.clear()

    @property
    def logs_root(self) -> Path:
        return self.node.root

    def worker(self, namespace: str, name: str) -> PodWorker | None:
        return self.workers.get((namespace, name))

    async def _forget_previous(self) -> None:
        """Sandboxes a previous kubelet left (it was killed): their processes are killed
        and their namespaces removed; the Pods start again."""
        ours = {p.name: p for p in netns.list_pods(self.network)}
        mine = {w.key for w in self.workers.values()}
        for pod in self.registry.store.items(PODS_KEY):
            meta = pod["metadata"]
            key = sandbox_key(meta["namespace"], meta["name"], meta["uid"])
            if key in ours and key not in mine:
                for pid in processes_in(ours[key].netns):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                await asyncio.to_thread(netns.remove_pod, self.network, key)

    def _on_event(self, ev: Event) -> None:
        if ev.key == PODS_KEY:
            self.queue.add((ev.namespace, ev.name))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                await self.register()
            except ApiError as e:
                log.warning("node heartbeat not written node=%s cause=%s", self.node_name, e)

    async def _reconcile(self, key: tuple[str, str]) -> None:
        namespace, name = key
        pod = self.registry.store.get(PODS_KEY, namespace, name)
        worker = self.workers.get(key)
        if worker is not None and (pod is None or pod["metadata"]["uid"] != worker.uid
                                   or worker.task.done()):
            worker.removed()
            await self._forget(key, worker)
            worker = None
        if pod is None:
            return
        if wants_binding(pod) and not _mirror(pod):
            await self.scheduler.schedule(namespace, name)
            return
        if pod["spec"].get("nodeName") != self.node_name or _mirror(pod):
            return
        if worker is not None:
            worker.update(pod)
            return
        if pod["metadata"].get("deletionTimestamp"):
            await self._finish_delete(pod)
            return
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return
        worker = PodWorker(self.node, pod)
        self.workers[key] = worker
        worker.task.add_done_callback(lambda _: self.queue.add(key))
        worker.update(pod)

    async def _forget(self, key: tuple[str, str], worker: PodWorker) -> None:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await worker.task
        if self.workers.get(key) is worker:
            del self.workers[key]

    async def _finish_delete(self, pod: dict[str, Any]) -> None:
        """A Pod being deleted that runs nothing here (as after a restart): remove it."""
        rt = self.registry.catalog.lookup("", "v1", "pods")
        assert rt is not None
        meta = pod["metadata"]
        try:
            await self.registry.delete(rt, meta["namespace"], meta["name"], {
                "gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}, MANAGER)
        except ApiError as e:
            if e.code not in (404, 409):
                raise


_forks_quiet = False


def _quiet_forks() -> None:
    """Children forked from this process (the namespace helpers pyroute2 forks, to add
    and remove a Pod's network) must not share its event loop's signal wakeup fd: a
    helper stopped with SIGTERM would otherwise write SIGTERM there, and the server
    would take it as its own stop."""
    global _forks_quiet
    if _forks_quiet:
        return

    def in_child() -> None:
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):
                signal.signal(sig, signal.SIG_DFL)

    os.register_at_fork(after_in_child=in_child)
    _forks_quiet = True


def _mirror(pod: dict[str, Any]) -> bool:
    return MIRROR_ANNOTATION in (pod["metadata"].get("annotations") or {})
