"""The StatefulSet controller: Pods with stable names ``<set>-0`` .. ``<set>-N-1``,
created in order and removed from the highest ordinal (each step waiting for
the others to be Running and Ready, unless ``podManagementPolicy: Parallel``),
replaced from the highest ordinal down to the partition when the template
changes, and the status ``kubectl rollout status`` reads. No volume claims."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from localcluster.events import EventRecorder
from localcluster.workloads.common import (
    PODS,
    STATEFULSETS,
    Writer,
    available_in,
    owned,
    pod_active,
    pod_phase,
    pod_ready,
    terminating,
)
from localcluster.workloads.revisions import REVISION_LABEL, current_revision

POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"


def _healthy(pod: Mapping[str, Any]) -> bool:
    return pod_phase(pod) == "Running" and pod_ready(pod)


def _ordinal(set_name: str, pod: Mapping[str, Any]) -> int | None:
    suffix = pod["metadata"]["name"].removeprefix(f"{set_name}-")
    return int(suffix) if suffix.isdigit() else None


class StatefulSetController:
    def __init__(self, writer: Writer) -> None:
        self.w = writer
        self.events = EventRecorder(writer.registry, component="statefulset-controller")

    def _pods(self, sts: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
        out = {}
        for pod in owned(self.w.registry, PODS, sts):
            ordinal = _ordinal(sts["metadata"]["name"], pod)
            if ordinal is not None and pod_active(pod):
                out[ordinal] = pod
        return out

    async def reconcile(self, key: tuple[str, str]) -> float | None:
        ns, name = key
        sts = self.w.store.get(STATEFULSETS.key, ns, name)
        if sts is None or terminating(sts):
            return None
        spec = sts.get("spec") or {}
        want = int(spec.get("replicas", 1))
        revision, _ = await current_revision(self.w, STATEFULSETS, sts)
        ordered = spec.get("podManagementPolicy", "OrderedReady") != "Parallel"
        pods = self._pods(sts)
        if await self._create(sts, pods, want=want, revision=revision, ordered=ordered):
            return await self._status(sts, revision)
        condemned = sorted((o for o in pods if o >= want), reverse=True)
        for o in condemned:
            if ordered and not all(_healthy(p) for i, p in pods.items() if i < want):
                break
            await self._delete(sts, pods[o])
            if ordered:
                break
        if not condemned:
            await self._update(sts, pods, want=want, revision=revision)
        return await self._status(sts, revision)

    async def _create(self, sts: Mapping[str, Any], pods: Mapping[int, Mapping[str, Any]], *,
                      want: int, revision: str, ordered: bool) -> bool:
        created = False
        for i in range(want):
            if i in pods:
                if ordered and not _healthy(pods[i]):
                    return created
                continue
            pod = await self.w.create(PODS, sts["metadata"]["namespace"],
                                      self._pod(sts, i, revision))
            await self.events.normal(sts, "SuccessfulCreate", f"create Pod "
                                     f"{pod['metadata']['name']} in StatefulSet "
                                     f"{sts['metadata']['name']} successful")
            created = True
            if ordered:
                return True
        return created

    def _pod(self, sts: Mapping[str, Any], ordinal: int, revision: str) -> dict[str, Any]:
        name = f"{sts['metadata']['name']}-{ordinal}"
        body = self.w.pod_body(STATEFULSETS, sts, sts["spec"].get("template") or {}, labels={
            REVISION_LABEL: revision, POD_NAME_LABEL: name, POD_INDEX_LABEL: str(ordinal)})
        del body["metadata"]["generateName"]
        body["metadata"]["name"] = name
        body["spec"]["hostname"] = name
        if sts["spec"].get("serviceName"):
            body["spec"]["subdomain"] = sts["spec"]["serviceName"]
        return body

    async def _update(self, sts: Mapping[str, Any], pods: Mapping[int, Mapping[str, Any]], *,
                      want: int, revision: str) -> None:
        strategy = sts["spec"].get("updateStrategy") or {}
        if strategy.get("type", "RollingUpdate") != "RollingUpdate":
            return  # OnDelete
        if not all(i in pods and _healthy(pods[i]) for i in range(want)):
            return
        partition = int((strategy.get("rollingUpdate") or {}).get("partition") or 0)
        for i in range(want - 1, partition - 1, -1):
            if (pods[i]["metadata"].get("labels") or {}).get(REVISION_LABEL) != revision:
                await self._delete(sts, pods[i])
                return

    async def _delete(self, sts: Mapping[str, Any], pod: Mapping[str, Any]) -> None:
        await self.w.delete(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])
        await self.events.normal(sts, "SuccessfulDelete", f"delete Pod "
                                 f"{pod['metadata']['name']} in StatefulSet "
                                 f"{sts['metadata']['name']} successful")

    async def _status(self, sts: Mapping[str, Any], revision: str) -> float | None:
        fresh = self.w.store.get(STATEFULSETS.key, sts["metadata"]["namespace"],
                                 sts["metadata"]["name"])
        if fresh is None:
            return None
        pods = list(self._pods(fresh).values())
        min_ready = int(fresh["spec"].get("minReadySeconds") or 0)
        waits = [available_in(p, min_ready, self.w.now()) for p in pods]
        updated = [p for p in pods
                   if (p["metadata"].get("labels") or {}).get(REVISION_LABEL) == revision]
        old = fresh.get("status") or {}
        current_revision = old.get("currentRevision") or revision
        if len(updated) == len(pods) == int(fresh["spec"].get("replicas", 1)):
            current_revision = revision
        current = [p for p in pods if (p["metadata"].get("labels") or {}).get(
            REVISION_LABEL) == current_revision]
        status = {"observedGeneration": fresh["metadata"].get("generation", 1),
                  "replicas": len(pods), "readyReplicas": sum(1 for p in pods if pod_ready(p)),
                  "currentReplicas": len(current), "updatedReplicas": len(updated),
                  "currentRevision": current_revision, "updateRevision": revision,
                  "collisionCount": 0, "availableReplicas": sum(1 for w in waits if w == 0)}
        status = {k: v for k, v in status.items() if v or k in ("replicas",
                                                                "availableReplicas")}
        await self.w.update(STATEFULSETS, fresh, lambda b: b.__setitem__("status", status),
                            status=True)
        pending = [w for w in waits if w]
        return min(pending) if pending else None
