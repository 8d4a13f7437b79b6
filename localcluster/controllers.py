"""The in-process controllers that kube-controller-manager would run:

- endpoints: ready Pods selected by a Service become its EndpointSlices
  (labelled ``kubernetes.io/service-name``) and its Endpoints; a sync that
  fails is a Warning Event on the Service;
- namespaces: every namespace gets a ``default`` ServiceAccount and the
  ``kube-root-ca.crt`` ConfigMap; a deleted namespace is emptied, then removed;
- bootstrap: the system namespaces, the default RBAC roles and the
  ``kubernetes`` Service that points at the API server;
- workloads (`localcluster.workloads`): deployments, replica sets, daemon
  sets, jobs and garbage collection.

Each reconcile reads what is and computes what should be, so it converges
whatever events it missed; store events only enqueue keys.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import yaml

from localcluster import servicecidrs
from localcluster.admission import MANAGED_BY, MANAGED_BY_LABEL, SERVICE_NAME_LABEL
from localcluster.auth import bootstrap_rbac, reconciled
from localcluster.errors import ApiError
from localcluster.events import EventRecorder
from localcluster.registry import NAMESPACE_KEY, TERMINATING_CAUSE, Registry
from localcluster.resources import BUILTIN, ResourceType
from localcluster.selectors import LabelSelector
from localcluster.store import Event, EventType, Write
from localcluster.workloads.controller import Workloads
from mesh.workqueue import TemporaryError, WorkQueue

log = logging.getLogger(__name__)

_T = {(rt.group, rt.plural): rt for rt in BUILTIN}
SERVICES, PODS = _T[("", "services")], _T[("", "pods")]
ENDPOINTS, SLICES = _T[("", "endpoints")], _T[("discovery.k8s.io", "endpointslices")]
NAMESPACES, SERVICE_ACCOUNTS = _T[("", "namespaces")], _T[("", "serviceaccounts")]
CONFIGMAPS = _T[("", "configmaps")]
CLUSTER_INFO = "cluster-info"
ROOT_CA = "kube-root-ca.crt"
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


def _ready(pod: Mapping[str, Any]) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


def _resolve_port(pod: Mapping[str, Any], target: Any) -> int | None:
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == target:
                return int(port["containerPort"])
    return None


class Controllers:
    def __init__(self, registry: Registry, *, ca_pem: bytes) -> None:
        self.registry = registry
        self.store = registry.store
        self.ca_pem = ca_pem
        self.slice_events = EventRecorder(registry, component="endpoint-slice-controller",
                                          clock=registry.clock)
        self.endpoints: WorkQueue[tuple[str, str]] = WorkQueue("endpoints", self._endpoints)
        self.namespaces: WorkQueue[str] = WorkQueue("namespaces", self._namespace)
        self.workloads = Workloads(registry)
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubscribe = self.store.subscribe(self._on_event)

    # -- lifecycle -----------------------------------------------------------------

    async def bootstrap(self, api_ip: str, api_host: str, api_port: int) -> None:
        """Create what every cluster starts with; idempotent, so it runs on every start."""
        for name in SYSTEM_NAMESPACES:
            await self._ensure(NAMESPACES, "", {"metadata": {"name": name}})
        rbac_types = {rt.kind: rt for rt in BUILTIN if rt.group == "rbac.authorization.k8s.io"}
        for obj in bootstrap_rbac():
            rt = rbac_types[obj["kind"]]
            current = self.store.get(rt.key, "", obj["metadata"]["name"])
            if current is None:
                await self._ensure(rt, "", obj)
            elif (updated := reconciled(current, obj)) is not None:
                await self.registry.update(rt, "", obj["metadata"]["name"], updated)
        await self._ensure(SERVICES, "default", {
            "metadata": {"name": "kubernetes", "labels": {"component": "apiserver",
                                                          "provider": "kubernetes"}},
            "spec": {"clusterIP": api_ip, "ports": [
                {"name": "https", "port": 443, "protocol": "TCP", "targetPort": api_port}]}})
        await self._ensure(servicecidrs.SERVICE_CIDRS, "", servicecidrs.default_object(
            self.registry.admission.service_cidr))
        want = {"metadata": {"name": "kubernetes", "namespace": "default"},
                "subsets": [{"addresses": [{"ip": api_host}],
                             "ports": [{"name": "https", "port": api_port,
                                        "protocol": "TCP"}]}]}
        current = self.store.get(ENDPOINTS.key, "default", "kubernetes")
        if current is None or current.get("subsets") != want["subsets"]:
            await self.registry.update(ENDPOINTS, "default", "kubernetes", want)
        # kube-apiserver writes the same endpoint as a slice too (no managed-by label:
        # the endpoints controller leaves it alone), which service proxies read.
        want_slice: dict[str, Any] = {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {SERVICE_NAME_LABEL: "kubernetes"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [api_host], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": api_port, "protocol": "TCP"}]}
        current = self.store.get(SLICES.key, "default", "kubernetes")
        if current is None:
            await self.registry.create(SLICES, "default", want_slice)
        elif any(current.get(k) != want_slice[k] for k in ("endpoints", "ports")):
            want_slice["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            await self.registry.update(SLICES, "default", "kubernetes", want_slice)
        for ns in self.store.items(NAMESPACE_KEY):
            self.namespaces.add(ns["metadata"]["name"])
        for svc in self.store.items(SERVICES.key):
            self.endpoints.add((svc["metadata"]["namespace"], svc["metadata"]["name"]))

    async def publish_cluster_info(self, server: str) -> None:
        """kube-public/cluster-info, as kubeadm publishes it: a kubeconfig naming the API
        server's address for other machines (the advertised one, not the host's loopback)
        and its CA, no credentials. `multicluster link` reads it when the kubeconfig it is
        given names a loopback address another cluster could not reach."""
        want = {"kubeconfig": yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "", "cluster": {
                "certificate-authority-data": base64.b64encode(self.ca_pem).decode(),
                "server": server}}],
            "contexts": None, "current-context": "", "users": None})}
        current = self.store.get(CONFIGMAPS.key, "kube-public", CLUSTER_INFO)
        if current is None:
            await self._ensure(CONFIGMAPS, "kube-public", {
                "metadata": {"name": CLUSTER_INFO}, "data": want})
        elif current.get("data") != want:
            await self.registry.update(CONFIGMAPS, "kube-public", CLUSTER_INFO,
                                       {**current, "data": want})

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self.endpoints.run()),
                       asyncio.create_task(self.namespaces.run())]
        self.workloads.start()

    async def stop(self) -> None:
        self._unsubscribe()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.workloads.stop()

    def idle(self) -> bool:
        return self.endpoints.idle() and self.namespaces.idle()

    async def _ensure(self, rt: ResourceType, namespace: str, obj: dict[str, Any]) -> None:
        body = {"apiVersion": rt.api_version, "kind": rt.kind, **obj}
        if self.store.get(rt.key, namespace if rt.namespaced else "",
                          obj["metadata"]["name"]) is not None:
            return
        try:
            await self.registry.create(rt, namespace, body)
        except ApiError as e:
            if e.code != 409:
                raise

    # -- events ----------------------------------------------------------------------

    def _on_event(self, ev: Event) -> None:
        self.workloads.on_event(ev)
        if ev.key == SERVICES.key:
            self.endpoints.add((ev.namespace, ev.name))
        elif ev.key == PODS.key:
            for svc in self.store.items(SERVICES.key, ev.namespace):
                sel = (svc.get("spec") or {}).get("selector")
                if not sel:
                    continue
                match = LabelSelector.from_match_labels(sel)
                if any(o is not None and match.matches(o["metadata"].get("labels"))
                       for o in (ev.obj, ev.prev)) or ev.prev is None:
                    self.endpoints.add((ev.namespace, svc["metadata"]["name"]))
        elif ev.key in (SLICES.key, ENDPOINTS.key):
            labels = ev.obj["metadata"].get("labels") or {}
            svc_name = labels.get(SERVICE_NAME_LABEL) if ev.key == SLICES.key else ev.name
            if svc_name and (ev.key == ENDPOINTS.key or labels.get(MANAGED_BY_LABEL) == MANAGED_BY):
                self.endpoints.add((ev.namespace, svc_name))
        if ev.key == NAMESPACE_KEY:
            self.namespaces.add(ev.name)
        elif ev.namespace and ev.type is EventType.DELETED:
            self.namespaces.add(ev.namespace)

    # -- endpoints -------------------------------------------------------------------

    async def _endpoints(self, key: tuple[str, str]) -> None:
        try:
            await self._sync_endpoints(key)
        except ApiError as e:
            # As kube's EndpointSlice controller: a failed sync is a Warning on the
            # Service, but for churn (a conflict or a vanished object, retried as
            # TemporaryError) and a namespace being emptied.
            svc = self.store.get(SERVICES.key, *key)
            if svc is not None and not any(c.reason == TERMINATING_CAUSE for c in e.causes):
                await self.slice_events.warning(
                    self.registry.present(SERVICES, svc), "FailedToUpdateEndpointSlices",
                    f"Error updating Endpoint Slices for Service {key[0]}/{key[1]}: {e}")
            raise

    async def _sync_endpoints(self, key: tuple[str, str]) -> None:
        ns, name = key
        svc = self.store.get(SERVICES.key, ns, name)
        selector = ((svc or {}).get("spec") or {}).get("selector")
        ours = {
            s["metadata"]["name"]: s for s in self.store.items(SLICES.key, ns)
            if (s["metadata"].get("labels") or {}).get(SERVICE_NAME_LABEL) == name
            and (s["metadata"].get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY
        }
        if svc is None or not selector or svc["spec"].get("type") == "ExternalName":
            for slice_name in ours:
                await self._delete(SLICES, ns, slice_name)
            return
        groups = self._group_pods(svc, ns, LabelSelector.from_match_labels(selector))
        desired_slices = self._slices(svc, groups)
        for slice_name, obj in desired_slices.items():
            await self._apply(SLICES, ns, slice_name, obj, ours.get(slice_name))
        for slice_name in set(ours) - set(desired_slices):
            await self._delete(SLICES, ns, slice_name)
        await self._apply(ENDPOINTS, ns, name, self._endpoints_object(svc, groups),
                          self.store.get(ENDPOINTS.key, ns, name))

    def _group_pods(self, svc: Mapping[str, Any], ns: str, selector: LabelSelector
                    ) -> dict[tuple[tuple[str, int, str, str], ...], list[Mapping[str, Any]]]:
        """Selected pods with an IP, grouped by the ports they resolve the Service's to."""
        groups: dict[tuple[tuple[str, int, str, str], ...], list[Mapping[str, Any]]] = {}
        for pod in self.store.items(PODS.key, ns):
            meta = pod["metadata"]
            if not selector.matches(meta.get("labels")) or meta.get("deletionTimestamp"):
                continue
            if not (pod.get("status") or {}).get("podIP"):
                continue
            ports = []
            for sp in svc["spec"].get("ports") or []:
                resolved = _resolve_port(pod, sp.get("targetPort", sp.get("port")))
                if resolved is not None:
                    ports.append((sp.get("name", ""), resolved, sp.get("protocol", "TCP"),
                                  sp.get("appProtocol", "")))
            groups.setdefault(tuple(ports), []).append(pod)
        return groups

    @staticmethod
    def _port_list(ports: tuple[tuple[str, int, str, str], ...]) -> list[dict[str, Any]]:
        out = []
        for name, port, proto, app in ports:
            entry: dict[str, Any] = {"name": name, "port": port, "protocol": proto}
            if app:
                entry["appProtocol"] = app
            out.append(entry)
        return out

    def _slices(self, svc: Mapping[str, Any], groups: Mapping[
            tuple[tuple[str, int, str, str], ...], list[Mapping[str, Any]]]
                ) -> dict[str, dict[str, Any]]:
        meta = svc["metadata"]
        labels = {**(meta.get("labels") or {}), SERVICE_NAME_LABEL: meta["name"],
                  MANAGED_BY_LABEL: MANAGED_BY}
        owner = {"apiVersion": "v1", "kind": "Service", "name": meta["name"],
                 "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}
        out: dict[str, dict[str, Any]] = {}
        for ports, pods in (groups or {(): []}).items():
            digest = hashlib.sha256(repr(ports).encode()).hexdigest()[:5]
            name = f"{meta['name'][:57]}-{digest}"
            endpoints = []
            for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
                ready = _ready(pod)
                ep: dict[str, Any] = {
                    "addresses": [pod["status"]["podIP"]],
                    "conditions": {"ready": ready, "serving": ready, "terminating": False},
                    "targetRef": {"kind": "Pod", "namespace": pod["metadata"]["namespace"],
                                  "name": pod["metadata"]["name"],
                                  "uid": pod["metadata"]["uid"]},
                }
                node = (pod.get("spec") or {}).get("nodeName")
                if node:
                    ep["nodeName"] = node
                endpoints.append(ep)
            out[name] = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                         "metadata": {"name": name, "namespace": meta["namespace"],
                                      "labels": labels, "ownerReferences": [owner]},
                         "addressType": "IPv4", "endpoints": endpoints,
                         "ports": self._port_list(ports)}
        return out

    def _endpoints_object(self, svc: Mapping[str, Any], groups: Mapping[
            tuple[tuple[str, int, str, str], ...], list[Mapping[str, Any]]]) -> dict[str, Any]:
        meta = svc["metadata"]
        subsets = []
        for ports, pods in groups.items():
            ready: list[dict[str, Any]] = []
            not_ready: list[dict[str, Any]] = []
            for pod in sorted(pods, key=lambda p: p["status"]["podIP"]):
                addr = {"ip": pod["status"]["podIP"], "targetRef": {
                    "kind": "Pod", "namespace": pod["metadata"]["namespace"],
                    "name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]}}
                (ready if _ready(pod) else not_ready).append(addr)
            subset: dict[str, Any] = {"ports": self._port_list(ports)}
            if ready:
                subset["addresses"] = ready
            if not_ready:
                subset["notReadyAddresses"] = not_ready
            if ports:
                subsets.append(subset)
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "Endpoints", "metadata": {
            "name": meta["name"], "namespace": meta["namespace"],
            "labels": dict(meta.get("labels") or {})}}
        if subsets:
            body["subsets"] = subsets
        return body

    async def _apply(self, rt: ResourceType, ns: str, name: str, desired: dict[str, Any],
                     current: Mapping[str, Any] | None) -> None:
        try:
            if current is None:
                await self.registry.create(rt, ns, desired)
                return
            same = all(current.get(k) == v for k, v in desired.items() if k != "metadata")
            same = same and all(k in desired for k in current if k not in (
                "metadata", "apiVersion", "kind"))
            cur_meta = current["metadata"]
            if same and (cur_meta.get("labels") or {}) == desired["metadata"].get("labels", {}):
                return
            desired["metadata"]["resourceVersion"] = cur_meta["resourceVersion"]
            desired["metadata"]["ownerReferences"] = desired["metadata"].get(
                "ownerReferences", cur_meta.get("ownerReferences"))
            await self.registry.update(rt, ns, name, desired)
        except ApiError as e:
            if e.code in (404, 409):
                raise TemporaryError(f"{rt.plural} {ns}/{name} changed underneath: {e}") from e
            raise

    async def _delete(self, rt: ResourceType, ns: str, name: str) -> None:
        try:
            await self.registry.delete(rt, ns, name)
        except ApiError as e:
            if e.code != 404:
                raise

    # -- namespaces ------------------------------------------------------------------

    async def _namespace(self, name: str) -> None:
        ns = self.store.get(NAMESPACE_KEY, "", name)
        if ns is None:
            return
        if not ns["metadata"].get("deletionTimestamp"):
            await self._ensure(SERVICE_ACCOUNTS, name, {"metadata": {"name": "default"}})
            await self._ensure(CONFIGMAPS, name, {
                "metadata": {"name": ROOT_CA}, "data": {"ca.crt": self.ca_pem.decode()}})
            return
        remaining = 0
        seen: set[tuple[str, str]] = set()
        for rt in self.registry.catalog.all():
            if not rt.namespaced or not rt.persisted or rt.key in seen:
                continue
            seen.add(rt.key)
            for obj in list(self.store.items(rt.key, name)):
                remaining += 1
                if not obj["metadata"].get("deletionTimestamp"):
                    await self._delete(rt, name, obj["metadata"]["name"])
        if any(True for rt_key in seen for _ in self.store.items(rt_key, name)):
            raise TemporaryError(f"namespace {name} still has {remaining} objects", delay=1.0)
        async with self.store.lock:
            current = self.store.get(NAMESPACE_KEY, "", name)
            if current is not None and current["metadata"].get("deletionTimestamp"):
                await self.store.commit([Write(NAMESPACE_KEY, "", name, None, EventType.DELETED)])
