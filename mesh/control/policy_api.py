"""The policy API: each inbound proxy's authorization rules, streamed over mTLS.

``GET /v1/policy?namespace=<ns>&pod=<name>`` (or, for a VM's proxy,
``?namespace=<ns>&externalworkload=<name>``) streams newline-delimited JSON:

- ``{"type": "policy", "heartbeatSeconds": 10, "default": "all-authenticated",
  "ports": [PortPolicy, ...]}`` first, and again whenever the answer for that
  pod changes (a Server, MeshTLSAuthentication or AuthorizationPolicy of its
  namespace, or the pod's labels or ports); ``ports`` lists the ports some
  Server selects (by podSelector for a pod, externalWorkloadSelector for an
  ExternalWorkload, whose named ports are its ``spec.ports``), each in
  `PortPolicy.to_json` form; every other port has the cluster's default policy;
- ``{"type": "heartbeat"}`` after ``heartbeatSeconds`` of silence.

A pod (or ExternalWorkload) that does not exist yet gets the default alone,
then its policies once it appears. Invalid policy resources are logged (one
line each, with the field and the reason) and left out, so they never stop the
control plane.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from kubernetes import client
from prometheus_client import CollectorRegistry, Counter, Gauge

from mesh.control.externalworkloads import workload_ports
from mesh.control.policy import PolicyIndex, Workload, port_names
from mesh.control.watches import watch_policy_resources, watch_workloads
from mesh.discovery.server import (
    CONTENT_TYPE,
    Subscription,
    Watch,
    peer_identity,
    pump,
)
from mesh.identity.bundle import TrustBundle
from mesh.identity.service import Refusal
from mesh.informer import DELETED, Informer, Obj, all_synced, stop_all

log = logging.getLogger(__name__)

PATH = "/v1/policy"
_KEY = ("policy", 0)
WatchKey = tuple[Workload, str, str]
"""(kind, namespace, name) of the workload a stream is about."""


class PolicyService:
    """Serves `PolicyIndex` answers to inbound proxies, one stream per pod or
    ExternalWorkload."""

    def __init__(self, index: PolicyIndex, *, trust: Callable[[], TrustBundle],
                 registry: CollectorRegistry, heartbeat: float = 10.0) -> None:
        self.index = index
        self.heartbeat = heartbeat
        self._trust = trust
        self._objects: dict[WatchKey, Obj] = {}
        """The pods and ExternalWorkloads, by kind, namespace and name."""
        self._subs: dict[WatchKey, set[Subscription]] = {}
        self._last: dict[Subscription, bytes] = {}
        self._informers: list[Informer] = []
        self.subscribers = Gauge("policy_subscribers", "Open policy watches", registry=registry)
        self.updates = Counter("policy_updates", "Policy messages sent to watchers",
                               registry=registry)
        self.invalid = Gauge("policy_invalid_resources", "Policy resources ignored because "
                             "they cannot be used", registry=registry)
        self.invalid.set_function(lambda: len(self.index.invalid))

    # -- feeding ---------------------------------------------------------------------

    def watch_cluster(self, kube: client.ApiClient, loop: asyncio.AbstractEventLoop) -> None:
        self._informers += watch_policy_resources(kube, loop, self._policy)
        pods = Informer(client.CoreV1Api(kube).list_pod_for_all_namespaces, kind="pods",
                        handler=functools.partial(self._workload, Workload.POD))
        workloads = watch_workloads(kube, functools.partial(self._workload, Workload.EXTERNAL))
        for informer in (pods, workloads):
            self._informers.append(informer)
            informer.start(loop)

    @property
    def ready(self) -> bool:
        return all_synced(self._informers)

    def stop(self) -> None:
        stop_all(self._informers)
        for subs in self._subs.values():
            for sub in subs:
                sub.close()

    def _policy(self, kind: str, event: str, obj: Obj) -> None:
        namespaces = self.index.apply(kind, event, obj)  # logs what it must ignore
        for key in self._subs:
            if key[1] in namespaces:
                self._push(key)

    def _workload(self, kind: Workload, event: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        key = (kind, str(meta.get("namespace")), str(meta.get("name")))
        if event == DELETED:
            self._objects.pop(key, None)
        else:
            self._objects[key] = obj
        if key in self._subs:
            self._push(key)

    # -- answers ---------------------------------------------------------------------

    def message(self, namespace: str, name: str, kind: Workload = Workload.POD) -> bytes:
        """The policy message for pod (or ExternalWorkload) `name`."""
        obj = self._objects.get((kind, namespace, name))
        ports: list[Any] = []
        if obj is not None:
            labels = (obj.get("metadata") or {}).get("labels") or {}
            names = port_names(obj) if kind is Workload.POD else workload_ports(obj)
            policies = self.index.pod_policies(namespace, labels, port_names=names, kind=kind)
            ports = [json.loads(p.to_json()) for p in policies]
        return (json.dumps({"type": "policy", "heartbeatSeconds": self.heartbeat,
                            "default": str(self.index.default_policy), "ports": ports},
                           separators=(",", ":")) + "\n").encode()

    def _push(self, key: WatchKey) -> None:
        kind, namespace, name = key
        line = self.message(namespace, name, kind)
        for sub in self._subs.get(key, set()):
            if self._last.get(sub) != line:
                self._last[sub] = line
                sub.offer(_KEY, line)

    # -- HTTP ------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(PATH, self.watch)

    async def watch(self, request: web.Request) -> web.StreamResponse:
        try:
            peer = peer_identity(request, self._trust())
            key = _query(request.query)
            if not self.ready:
                raise Refusal(503, "not-ready", "the control plane is still reading the "
                              "cluster; retry shortly")
        except Refusal as e:
            log.info("policy watch refused peer=%s reason=%s cause=%r", request.remote,
                     e.reason, e.message)
            return web.json_response({"error": e.reason, "message": e.message},
                                     status=e.status)
        kind, namespace, name = key
        sub = Subscription(Watch(), limit=1, peer=f"{peer}@{request.remote}")
        first = self.message(namespace, name, kind)
        self._last[sub] = first
        self._subs.setdefault(key, set()).add(sub)
        self.subscribers.inc()
        log.info("policy watch opened peer=%s %s=%s/%s", sub.peer, kind, namespace, name)
        resp = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE,
                                           "Cache-Control": "no-store"})
        try:
            await resp.prepare(request)
            await resp.write(first)
            await pump(sub, resp, heartbeat=self.heartbeat, sent=self.updates)
        except ConnectionError as e:
            log.info("policy watch ended peer=%s cause=%s", sub.peer, type(e).__name__)
        finally:
            subs = self._subs.get(key, set())
            subs.discard(sub)
            if not subs:
                self._subs.pop(key, None)
            self._last.pop(sub, None)
            self.subscribers.dec()
        return resp


def _query(query: Mapping[str, str]) -> WatchKey:
    unknown = sorted(set(query) - {"namespace", *Workload})
    if unknown:
        raise Refusal(400, "malformed", f"unknown parameter {unknown[0]!r}; give namespace "
                      "and pod (or externalworkload)")
    namespace = query.get("namespace", "")
    named = [(kind, query[kind]) for kind in Workload if kind in query]
    if not namespace or len(named) != 1 or not named[0][1]:
        raise Refusal(400, "malformed", "give namespace=<ns> and either pod=<name> or "
                      "externalworkload=<name>")
    kind, name = named[0]
    return kind, namespace, name
