"""The DaemonSet controller: one Pod per Node the DaemonSet's nodeSelector picks,
replaced (at most ``maxUnavailable`` at a time) when the template changes, and
the scheduling counts kubectl reads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from localcluster.events import EventRecorder
from localcluster.workloads.common import (
    DAEMONSETS,
    NODES,
    PODS,
    Writer,
    available_in,
    owned,
    pod_active,
    pod_ready,
    scaled_value,
    terminating,
)
from localcluster.workloads.revisions import REVISION_LABEL, current_revision

GENERATION_LABEL = "pod-template-generation"


def _wanted_nodes(ds: Mapping[str, Any], nodes: list[Mapping[str, Any]]) -> list[str]:
    selector = ((ds.get("spec") or {}).get("template") or {}).get("spec", {}).get(
        "nodeSelector") or {}
    return sorted(n["metadata"]["name"] for n in nodes if not terminating(n) and all(
        (n["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items()))


class DaemonSetController:
    def __init__(self, writer: Writer) -> None:
        self.w = writer
        self.events = EventRecorder(writer.registry, component="daemonset-controller")

    async def reconcile(self, key: tuple[str, str]) -> float | None:
        ns, name = key
        ds = self.w.store.get(DAEMONSETS.key, ns, name)
        if ds is None or terminating(ds):
            return None
        spec = ds.get("spec") or {}
        template = spec.get("template") or {}
        _, revision = await current_revision(self.w, DAEMONSETS, ds)
        wanted = _wanted_nodes(ds, list(self.w.store.items(NODES.key)))
        pods = [p for p in owned(self.w.registry, PODS, ds) if pod_active(p)]
        by_node: dict[str, list[dict[str, Any]]] = {}
        for pod in pods:
            by_node.setdefault(str((pod.get("spec") or {}).get("nodeName") or ""), []).append(pod)
        for node, extra in by_node.items():
            doomed = extra if node not in wanted else extra[1:]
            for pod in doomed:
                await self._delete(ds, pod)
        labels = {REVISION_LABEL: revision,
                  GENERATION_LABEL: str(ds["metadata"].get("generation", 1))}
        for node in wanted:
            if node not in by_node:
                pod = await self.w.create(PODS, ns, self.w.pod_body(
                    DAEMONSETS, ds, template, labels=labels, node=node))
                await self.events.normal(ds, "SuccessfulCreate",
                                         f"Created pod: {pod['metadata']['name']}")
        await self._replace_outdated(ds, revision, wanted=wanted, by_node=by_node)
        return await self._status(ds, revision, wanted)

    async def _replace_outdated(self, ds: Mapping[str, Any], revision: str, *,
                                wanted: list[str],
                                by_node: Mapping[str, list[dict[str, Any]]]) -> None:
        strategy = (ds.get("spec") or {}).get("updateStrategy") or {}
        if strategy.get("type") != "RollingUpdate":
            return  # OnDelete: a pod is replaced once someone deletes it
        budget = scaled_value((strategy.get("rollingUpdate") or {}).get("maxUnavailable", 1),
                              len(wanted), round_up=True) or 1
        current = [by_node[n][0] for n in wanted if n in by_node]
        budget -= len(wanted) - sum(1 for p in current if pod_ready(p))
        for pod in current:
            if budget <= 0:
                break
            if (pod["metadata"].get("labels") or {}).get(REVISION_LABEL) != revision:
                await self._delete(ds, pod)
                if pod_ready(pod):
                    budget -= 1

    async def _delete(self, ds: Mapping[str, Any], pod: Mapping[str, Any]) -> None:
        await self.w.delete(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])
        await self.events.normal(ds, "SuccessfulDelete",
                                 f"Deleted pod: {pod['metadata']['name']}")

    async def _status(self, ds: Mapping[str, Any], revision: str, wanted: list[str]
                      ) -> float | None:
        min_ready = int((ds.get("spec") or {}).get("minReadySeconds") or 0)
        now = self.w.now()
        pods = [p for p in owned(self.w.registry, PODS, ds) if pod_active(p)]
        on = {str(p["spec"].get("nodeName")): p for p in pods}
        scheduled = [on[n] for n in wanted if n in on]
        waits = [available_in(p, min_ready, now) for p in scheduled]
        available = sum(1 for w in waits if w == 0)
        updated = sum(1 for p in scheduled
                      if (p["metadata"].get("labels") or {}).get(REVISION_LABEL) == revision)
        status: dict[str, Any] = {
            "currentNumberScheduled": len(scheduled),
            "numberMisscheduled": sum(1 for n in on if n not in wanted),
            "desiredNumberScheduled": len(wanted),
            "numberReady": sum(1 for p in scheduled if pod_ready(p)),
            "observedGeneration": ds["metadata"].get("generation", 1),
        }
        for field, value in (("updatedNumberScheduled", updated), ("numberAvailable", available),
                             ("numberUnavailable", len(wanted) - available)):
            if value:
                status[field] = value
        fresh = self.w.store.get(DAEMONSETS.key, ds["metadata"]["namespace"],
                                 ds["metadata"]["name"])
        if fresh is not None:
            await self.w.update(DAEMONSETS, fresh, lambda b: b.__setitem__("status", status),
                                status=True)
        pending = [w for w in waits if w]
        return min(pending) if pending else None
