"""Wiring of the workload controllers: store events only enqueue keys (the object,
its controller, the owners a deletion concerns); one queue per kind runs that
kind's reconcile, which may ask to look again later (minReadySeconds, progress
deadlines)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

from localcluster.registry import Registry
from localcluster.store import Event
from localcluster.workloads.common import (
    DAEMONSETS,
    DEPLOYMENTS,
    JOBS,
    NODES,
    PODS,
    REPLICASETS,
    STATEFULSETS,
    Writer,
)
from localcluster.workloads.daemonsets import DaemonSetController
from localcluster.workloads.deployments import DeploymentController
from localcluster.workloads.disruption import PDBS, DisruptionController
from localcluster.workloads.gc import GarbageCollector
from localcluster.workloads.jobs import JobController
from localcluster.workloads.nodes import register_node
from localcluster.workloads.replicasets import ReplicaSetController
from localcluster.workloads.statefulsets import StatefulSetController
from mesh.workqueue import WorkQueue

K = TypeVar("K", bound=Hashable)
NsName = tuple[str, str]


def _queue(name: str, reconcile: Callable[[K], Awaitable[float | None]]) -> WorkQueue[K]:
    queue: WorkQueue[K]

    async def run(key: K) -> None:
        again = await reconcile(key)
        if again is not None:
            queue.add_after(key, again + 0.05)

    queue = WorkQueue(name, run)
    return queue


def _controller_ref(obj: dict[str, Any] | None) -> tuple[str, str] | None:
    if obj is None:
        return None
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("kind")), str(ref.get("name"))
    return None


class Workloads:
    def __init__(self, registry: Registry) -> None:
        self.writer = Writer(registry)
        self.store = registry.store
        self.gc = GarbageCollector(self.writer, registry.catalog)
        self.deployments: WorkQueue[NsName] = _queue(
            "deployments", DeploymentController(self.writer).reconcile)
        self.replicasets: WorkQueue[NsName] = _queue(
            "replicasets", ReplicaSetController(self.writer).reconcile)
        self.daemonsets: WorkQueue[NsName] = _queue(
            "daemonsets", DaemonSetController(self.writer).reconcile)
        self.statefulsets: WorkQueue[NsName] = _queue(
            "statefulsets", StatefulSetController(self.writer).reconcile)
        self.jobs: WorkQueue[NsName] = _queue("jobs", JobController(self.writer).reconcile)
        self.disruption = DisruptionController(self.writer)
        self.budgets: WorkQueue[NsName] = _queue("disruption", self.disruption.reconcile)
        self.collector: WorkQueue[str] = WorkQueue("garbage-collector", self.gc.reconcile)
        self._by_kind: dict[str, WorkQueue[NsName]] = {
            "Deployment": self.deployments, "ReplicaSet": self.replicasets,
            "DaemonSet": self.daemonsets, "StatefulSet": self.statefulsets, "Job": self.jobs}
        self._tasks: list[asyncio.Task[None]] = []

    async def register_node(self, name: str, *, address: str, state_dir: Path) -> None:
        await register_node(self.writer, name, address=address, state_dir=state_dir)

    def start(self) -> None:
        """Queue every object once (what changed while stopped), then follow events."""
        for rt, queue in ((DEPLOYMENTS, self.deployments), (REPLICASETS, self.replicasets),
                          (DAEMONSETS, self.daemonsets), (STATEFULSETS, self.statefulsets),
                          (JOBS, self.jobs), (PDBS, self.budgets)):
            for obj in self.store.items(rt.key):
                queue.add((obj["metadata"]["namespace"], obj["metadata"]["name"]))
        for uid in self.gc.start():
            self.collector.add(uid)
        self._tasks = [asyncio.create_task(q.run()) for q in (
            self.deployments, self.replicasets, self.daemonsets, self.statefulsets, self.jobs,
            self.budgets, self.collector)]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def on_event(self, ev: Event) -> None:
        for uid in self.gc.observe(ev):
            self.collector.add(uid)
        if ev.key == NODES.key:
            for ds in self.store.items(DAEMONSETS.key):
                self.daemonsets.add((ds["metadata"]["namespace"], ds["metadata"]["name"]))
            return
        kinds = {DEPLOYMENTS.key: self.deployments, REPLICASETS.key: self.replicasets,
                 DAEMONSETS.key: self.daemonsets, STATEFULSETS.key: self.statefulsets,
                 JOBS.key: self.jobs, PDBS.key: self.budgets}
        if ev.key in kinds:
            kinds[ev.key].add((ev.namespace, ev.name))
        if ev.key in (PODS.key, REPLICASETS.key, STATEFULSETS.key):
            for budget in self.disruption.budgets_for(ev.namespace):
                self.budgets.add(budget)
        if ev.key in (PODS.key, REPLICASETS.key):
            for obj in (ev.obj, ev.prev):
                ref = _controller_ref(obj)
                if ref is not None and ref[0] in self._by_kind:
                    self._by_kind[ref[0]].add((ev.namespace, ref[1]))
