"""The ReplicaSet controller: keeps ``spec.replicas`` active Pods made from the
template, owned by the ReplicaSet, and reports how many are ready and
available."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from localcluster.events import EventRecorder
from localcluster.selectors import LabelSelector
from localcluster.workloads.common import (
    PODS,
    REPLICASETS,
    Writer,
    adopt,
    available_in,
    owned,
    parse_time,
    pod_active,
    pod_phase,
    pod_ready,
    terminating,
    without_empty,
)

BURST = 500
"""Most Pods created or deleted in one pass, as kube's slow-start batches allow."""


def _deletion_rank(pod: Mapping[str, Any]) -> tuple[int, int, int, float]:
    """Which pods go first when scaling down: unscheduled, pending, not ready, newest."""
    spec = pod.get("spec") or {}
    phase = pod_phase(pod)
    return (0 if not spec.get("nodeName") else 1,
            {"Pending": 0, "Unknown": 1}.get(phase, 2),
            1 if pod_ready(pod) else 0,
            -(parse_time(pod["metadata"].get("creationTimestamp")) or 0.0))


class ReplicaSetController:
    def __init__(self, writer: Writer) -> None:
        self.w = writer
        self.events = EventRecorder(writer.registry, component="replicaset-controller")

    async def reconcile(self, key: tuple[str, str]) -> float | None:
        """Returns seconds after which to look again (minReadySeconds), or None."""
        ns, name = key
        rs = self.w.store.get(REPLICASETS.key, ns, name)
        if rs is None or terminating(rs):
            return None
        spec = rs.get("spec") or {}
        await adopt(self.w, PODS, rs, owner_rt=REPLICASETS)
        pods = [p for p in owned(self.w.registry, PODS, rs) if pod_active(p)]
        want = int(spec.get("replicas", 1))
        if len(pods) < want:
            for _ in range(min(want - len(pods), BURST)):
                pod = await self.w.create(PODS, ns, self.w.pod_body(
                    REPLICASETS, rs, spec.get("template") or {}))
                await self.events.normal(rs, "SuccessfulCreate",
                                         f"Created pod: {pod['metadata']['name']}")
        elif len(pods) > want:
            for pod in sorted(pods, key=_deletion_rank)[:len(pods) - want]:
                await self.w.delete(PODS, ns, pod["metadata"]["name"])
                await self.events.normal(rs, "SuccessfulDelete",
                                         f"Deleted pod: {pod['metadata']['name']}")
        return await self._status(rs)

    async def _status(self, rs: Mapping[str, Any]) -> float | None:
        spec = rs.get("spec") or {}
        now = self.w.now()
        min_ready = int(spec.get("minReadySeconds") or 0)
        pods = [p for p in owned(self.w.registry, PODS, rs) if pod_active(p)]
        template_labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels")
        labelled = LabelSelector.from_match_labels(template_labels or {})
        waits = [available_in(p, min_ready, now) for p in pods]
        status = without_empty({
            "replicas": len(pods),
            "fullyLabeledReplicas": sum(1 for p in pods
                                        if labelled.matches(p["metadata"].get("labels"))),
            "readyReplicas": sum(1 for p in pods if pod_ready(p)),
            "availableReplicas": sum(1 for w in waits if w == 0),
            "observedGeneration": rs["metadata"].get("generation", 1),
        }, keep=("replicas",))

        def change(body: dict[str, Any]) -> None:
            conditions = (body.get("status") or {}).get("conditions")
            body["status"] = {**status, **({"conditions": conditions} if conditions else {})}

        fresh = self.w.store.get(REPLICASETS.key, rs["metadata"]["namespace"],
                                 rs["metadata"]["name"])
        if fresh is not None:
            await self.w.update(REPLICASETS, fresh, change, status=True)
        pending = [w for w in waits if w]
        return min(pending) if pending else None
