"""The endpoints controller for ExternalWorkloads, run by ``meshgate control run``.

It watches Services, ExternalWorkloads and its own EndpointSlices (those labelled
``endpointslice.kubernetes.io/managed-by=meshgate-external-workloads-controller``)
through informers, whose callbacks only note heartbeats and enqueue Service
keys. One reconcile per Service reads what is (the informers' caches), computes
what should be (`mesh.control.workloadslices.desired_slices`) and creates,
replaces or deletes slices to match; creates that find the slice there and
deletes that find it gone count as done. Every Service is reconciled at start
and on each resync, together with every Service its slices name, so slices
whose Service is gone or no longer selects a workload are collected.

A Service with a ready workload is reconciled again when that workload's
heartbeat would go stale, so its endpoint turns not-ready on time even when
nothing else happens. Time is the injected `clock` (monotonic seconds).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException
from prometheus_client import CollectorRegistry, Gauge

from mesh.control.externalworkloads import (
    DEFAULT_INTERVAL,
    DEFAULT_MISSED,
    MANAGED_BY,
    Heartbeats,
    Obj,
    ObjKey,
    key_of,
    workload_ready,
)
from mesh.control.watches import watch_workloads
from mesh.control.workloadslices import desired_slices, owner_service, selects, up_to_date
from mesh.discovery.index import MANAGED_BY_LABEL
from mesh.informer import DELETED, Informer, all_synced, stop_all
from mesh.workqueue import PermanentError, TemporaryError, WorkQueue

log = logging.getLogger(__name__)


class WorkloadEndpoints:
    """EndpointSlices for the ExternalWorkloads that Services select."""

    def __init__(self, kube: client.ApiClient, *, registry: CollectorRegistry,
                 interval: float = DEFAULT_INTERVAL, missed: int = DEFAULT_MISSED,
                 resync: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.heartbeats = Heartbeats(interval=interval, missed=missed)
        self.resync = resync
        self.clock = clock
        self._slices_api = SliceWriter(kube)
        self._kube = kube
        self._workloads: dict[ObjKey, Obj] = {}
        self._informers: list[Informer] = []
        self._services: Informer | None = None
        self._slices: Informer | None = None
        self._timers: dict[ObjKey, tuple[float, asyncio.TimerHandle]] = {}
        self._task: asyncio.Task[None] | None = None
        self.queue: WorkQueue[ObjKey] = WorkQueue("external-workload-endpoints",
                                                  self.reconcile)
        ready = Gauge("external_workloads_ready", "ExternalWorkloads whose heartbeat is "
                      "fresh", registry=registry)
        ready.set_function(self._count_ready)

    def _count_ready(self) -> int:
        now = self.clock()
        return sum(workload_ready(wl, self.heartbeats, now) for wl in self._workloads.values())

    # -- life cycle ------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        core, disc = client.CoreV1Api(self._kube), client.DiscoveryV1Api(self._kube)
        self._services = Informer(core.list_service_for_all_namespaces, kind="services",
                                  handler=self._service)
        self._slices = Informer(disc.list_endpoint_slice_for_all_namespaces,
                                kind="endpointslices", handler=self._slice,
                                label_selector=f"{MANAGED_BY_LABEL}={MANAGED_BY}")
        self._informers = [self._services, self._slices,
                           watch_workloads(self._kube, self._workload)]
        for informer in self._informers:
            informer.start(loop)
        self._task = loop.create_task(self._run())

    @property
    def synced(self) -> bool:
        return all_synced(self._informers)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        stop_all(self._informers)

    async def _run(self) -> None:
        for informer in self._informers:
            await informer.wait_synced()
        log.info("external workload endpoints: watching workloads=%d", len(self._workloads))
        worker = asyncio.create_task(self.queue.run())
        try:
            while True:
                self.enqueue_all()
                await asyncio.sleep(self.resync)
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)

    def enqueue_all(self) -> None:
        """Every Service, and every Service a slice of ours names (its orphans)."""
        assert self._services is not None and self._slices is not None
        for svc in self._services.objects():
            self.queue.add(key_of(svc))
        for slice_obj in self._slices.objects():
            owner = owner_service(slice_obj)
            if owner is not None:
                self.queue.add(owner)

    # -- events: they only note heartbeats and enqueue ---------------------------------

    def _service(self, event: str, obj: Obj) -> None:
        self.queue.add(key_of(obj))

    def _slice(self, event: str, obj: Obj) -> None:
        owner = owner_service(obj)
        if owner is not None:
            self.queue.add(owner)

    def _workload(self, event: str, obj: Obj) -> None:
        key = key_of(obj)
        before = self._workloads.get(key)
        if event == DELETED:
            self._workloads.pop(key, None)
            self.heartbeats.forget(key)
        else:
            self._workloads[key] = obj
            self.heartbeats.observe(obj, self.clock())
        assert self._services is not None
        for svc in self._services.objects():
            if any(wl is not None and selects(svc, wl) for wl in (before, obj)):
                self.queue.add(key_of(svc))

    # -- the reconcile -----------------------------------------------------------------

    async def reconcile(self, key: ObjKey) -> None:
        """Make the slices of Service `key` those its workloads call for."""
        assert self._services is not None and self._slices is not None
        ns, name = key
        svc = self._services.cache.get(f"{ns}/{name}")
        now = self.clock()
        in_ns = [wl for (wl_ns, _), wl in self._workloads.items() if wl_ns == ns]
        desired = (desired_slices(svc, in_ns, heartbeats=self.heartbeats, now=now)
                   if svc is not None else {})
        existing = {key_of(s)[1]: s for s in self._slices.objects() if owner_service(s) == key}
        for slice_name, want in desired.items():
            current = existing.get(slice_name)
            if current is None:
                await self._slices_api.create(want)
            elif not up_to_date(current, want):
                await self._slices_api.replace(want, current)
            else:
                continue
            log.info("external workload slice written service=%s/%s slice=%s ready=%d "
                     "endpoints=%d", ns, name, slice_name,
                     sum(bool(ep["conditions"]["ready"]) for ep in want["endpoints"]),
                     len(want["endpoints"]))
        for slice_name in sorted(set(existing) - set(desired)):
            await self._slices_api.delete(ns, slice_name)
            log.info("external workload slice deleted service=%s/%s slice=%s cause=%s", ns,
                     name, slice_name, "service gone" if svc is None else "not wanted")
        if svc is not None:
            self._wake_when_stale(key, svc, in_ns, now)

    def _wake_when_stale(self, key: ObjKey, svc: Obj, workloads: list[Obj], now: float
                         ) -> None:
        """Reconcile `key` again when its first ready workload's heartbeat goes stale."""
        expiries = [left for wl in workloads if selects(svc, wl)
                    and workload_ready(wl, self.heartbeats, now)
                    and (left := self.heartbeats.expires(key_of(wl), now)) is not None]
        if not expiries:
            return
        due = now + min(expiries)
        pending = self._timers.get(key)
        if pending is not None and pending[0] <= due and pending[0] > now:
            return
        if pending is not None:
            pending[1].cancel()
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.pop(key, None)
            self.queue.add(key)

        # A little late rather than early: on time, the workload is still fresh.
        self._timers[key] = (due, loop.call_later(min(expiries) + 0.01, fire))


class SliceWriter:
    """EndpointSlice writes through the (blocking) client, in a thread; API errors are
    translated here: invalid writes are permanent, the rest temporary."""

    def __init__(self, kube: client.ApiClient) -> None:
        self.api = client.DiscoveryV1Api(kube)

    async def create(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        try:
            await self._call(f"create EndpointSlice {meta['namespace']}/{meta['name']}",
                             self.api.create_namespaced_endpoint_slice, meta["namespace"],
                             body)
        except ApiException as e:
            if e.status != 409:  # there already: its event brings it to the reconcile
                raise _translate(e, f"create EndpointSlice {meta['namespace']}/"
                                    f"{meta['name']}") from e

    async def replace(self, body: dict[str, Any], current: Obj) -> None:
        meta = body["metadata"]
        what = f"replace EndpointSlice {meta['namespace']}/{meta['name']}"
        body = {**body, "metadata": {
            **meta, "resourceVersion": (current.get("metadata") or {}).get("resourceVersion")}}
        try:
            await self._call(what, self.api.replace_namespaced_endpoint_slice, meta["name"],
                             meta["namespace"], body)
        except ApiException as e:
            if e.status in (404, 409):
                raise TemporaryError(f"cannot {what}: it changed underneath ({e.status}); "
                                     "reading it again", delay=0.1) from e
            raise _translate(e, what) from e

    async def delete(self, namespace: str, name: str) -> None:
        what = f"delete EndpointSlice {namespace}/{name}"
        try:
            await self._call(what, self.api.delete_namespaced_endpoint_slice, name, namespace)
        except ApiException as e:
            if e.status != 404:  # gone already
                raise _translate(e, what) from e

    @staticmethod
    async def _call(what: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            resp = await asyncio.to_thread(fn, *args, _preload_content=False)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise TemporaryError(f"cannot {what}: the API server cannot be reached: "
                                 f"{type(e).__name__}") from e
        resp.release_conn()


def _translate(e: ApiException, what: str) -> TemporaryError | PermanentError:
    try:
        message = str(json.loads(e.body or "{}").get("message") or e.reason)
    except (ValueError, AttributeError):
        message = str(e.reason)
    text = f"cannot {what}: {e.status} {e.reason}: {message}"
    return PermanentError(text) if e.status in (400, 422) else TemporaryError(text)
