"""policy/v1 PodDisruptionBudgets: the disruption controller's status, as kube's
(pkg/controller/disruption) writes it: how many of the Pods its selector picks are
healthy (Ready and not being deleted), how many must stay so, and so how many may be
disrupted now.

``minAvailable`` as a number counts against the Pods found; as a percentage, and
``maxUnavailable`` in both forms, count against the scale of the Pods' controllers
(ReplicaSets, StatefulSets), as kube does, and a Pod without one makes the budget allow
nothing (kube's CalculateExpectedPodCountFailed). Validation is in workloads.spec.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from localcluster.errors import ApiError
from localcluster.selectors import LabelSelector
from localcluster.workloads.common import (
    PODS,
    TYPES,
    Condition,
    Writer,
    pod_ready,
    scaled_value,
    set_condition,
    terminating,
)

PDBS = TYPES[("policy", "poddisruptionbudgets")]
SCALABLE = {"ReplicaSet": TYPES[("apps", "replicasets")],
            "StatefulSet": TYPES[("apps", "statefulsets")]}


class DisruptionController:
    def __init__(self, writer: Writer) -> None:
        self.w = writer

    def budgets_for(self, namespace: str) -> list[tuple[str, str]]:
        """Every budget of a namespace (a Pod's change may concern any of them)."""
        return [(namespace, b["metadata"]["name"])
                for b in self.w.store.items(PDBS.key, namespace)]

    async def reconcile(self, key: tuple[str, str]) -> float | None:
        ns, name = key
        pdb = self.w.store.get(PDBS.key, ns, name)
        if pdb is None:
            return None
        spec = pdb.get("spec") or {}
        pods = self._pods(ns, spec.get("selector"))
        healthy = sum(1 for p in pods if pod_ready(p) and not terminating(p))
        expected, desired = self._expected_and_desired(spec, pods)
        allowed = max(0, healthy - desired) if expected > 0 and desired >= 0 else 0
        status = dict(pdb.get("status") or {})
        sufficient = allowed > 0
        status.update({
            "observedGeneration": pdb["metadata"].get("generation", 1),
            "disruptionsAllowed": allowed, "currentHealthy": healthy,
            "desiredHealthy": max(desired, 0), "expectedPods": expected,
            "conditions": set_condition(list(status.get("conditions") or []), Condition(
                "DisruptionAllowed", "True" if sufficient else "False",
                "SufficientPods" if sufficient else "InsufficientPods", ""),
                now=self.w.stamp())})
        await self.w.update(PDBS, pdb, lambda b: b.__setitem__("status", status), status=True)
        return None

    def _pods(self, ns: str, selector: Mapping[str, Any] | None) -> list[dict[str, Any]]:
        if selector is None:
            return []  # policy/v1: a null selector picks no Pod, an empty one every Pod
        try:
            chosen = LabelSelector.from_label_selector(selector)
        except (ApiError, ValueError):
            return []
        return [p for p in self.w.store.items(PODS.key, ns)
                if chosen.matches(p["metadata"].get("labels"))]

    def _expected_and_desired(self, spec: Mapping[str, Any], pods: list[dict[str, Any]]
                              ) -> tuple[int, int]:
        """(expectedPods, desiredHealthy); desired -1 when the scale cannot be known."""
        min_available = spec.get("minAvailable")
        if isinstance(min_available, int):
            return len(pods), min_available
        scale = self._controllers_scale(pods)
        if scale is None:
            return len(pods), -1
        if "maxUnavailable" in spec:
            down = scaled_value(spec["maxUnavailable"], scale, round_up=True)
            return scale, max(0, scale - down)
        if min_available is not None:
            return scale, scaled_value(min_available, scale, round_up=True)
        return scale, scale  # neither set: kube defaults minAvailable to 100%

    def _controllers_scale(self, pods: list[dict[str, Any]]) -> int | None:
        seen: dict[str, int] = {}
        for pod in pods:
            ref = next((r for r in pod["metadata"].get("ownerReferences") or []
                        if r.get("controller")), None)
            rt = SCALABLE.get(str(ref.get("kind"))) if ref else None
            if ref is None or rt is None:
                return None
            owner = self.w.store.get(rt.key, pod["metadata"]["namespace"], str(ref["name"]))
            if owner is None:
                return None
            seen[str(ref.get("uid"))] = int((owner.get("spec") or {}).get("replicas", 1))
        return sum(seen.values())
