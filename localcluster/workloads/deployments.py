"""The Deployment controller: one ReplicaSet per pod template (named and labelled
with the template's hash), rolled from old to new within ``maxSurge`` and
``maxUnavailable`` (or all at once for ``Recreate``), revisions kept in the
``deployment.kubernetes.io/revision`` annotation so that ``kubectl rollout
undo`` finds them, and the status and conditions kubectl reads. The steps follow
kube's deployment controller (sync.go, rolling.go, progress.go)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from localcluster.events import EventRecorder
from localcluster.workloads.common import (
    DEPLOYMENTS,
    REPLICASETS,
    Condition,
    Writer,
    adopt,
    owned,
    parse_time,
    scaled_value,
    set_condition,
    template_hash,
    terminating,
    without_empty,
)

HASH_LABEL = "pod-template-hash"
REVISION = "deployment.kubernetes.io/revision"
DESIRED = "deployment.kubernetes.io/desired-replicas"
MAX_REPLICAS = "deployment.kubernetes.io/max-replicas"
NOT_COPIED = {"kubectl.kubernetes.io/last-applied-configuration", REVISION, DESIRED,
              MAX_REPLICAS, "deployment.kubernetes.io/revision-history",
              "deprecated.deployment.rollback.to"}

RS = dict[str, Any]


def _replicas(obj: Mapping[str, Any]) -> int:
    return int((obj.get("spec") or {}).get("replicas", 1))


def _status(obj: Mapping[str, Any], field: str) -> int:
    return int((obj.get("status") or {}).get(field) or 0)


def revision(rs: Mapping[str, Any]) -> int:
    value = (rs["metadata"].get("annotations") or {}).get(REVISION, "0")
    return int(value) if str(value).isdigit() else 0


def _bare_template(template: Mapping[str, Any]) -> dict[str, Any]:
    """A template without the hash label, for comparing a ReplicaSet's with a Deployment's."""
    out = copy.deepcopy(dict(template))
    meta = out.setdefault("metadata", {})
    labels = {k: v for k, v in (meta.get("labels") or {}).items() if k != HASH_LABEL}
    meta.pop("creationTimestamp", None)
    if labels:
        meta["labels"] = labels
    else:
        meta.pop("labels", None)
    return out


def surge_and_unavailable(d: Mapping[str, Any]) -> tuple[int, int]:
    """deploymentutil.ResolveFenceposts."""
    strategy = (d.get("spec") or {}).get("strategy") or {}
    if strategy.get("type") != "RollingUpdate":
        return 0, 0
    rolling = strategy.get("rollingUpdate") or {}
    want = _replicas(d)
    surge = scaled_value(rolling.get("maxSurge", "25%"), want, round_up=True)
    unavailable = scaled_value(rolling.get("maxUnavailable", "25%"), want, round_up=False)
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return surge, min(unavailable, want)


def new_rs_replicas(d: Mapping[str, Any], all_rs: Sequence[Mapping[str, Any]],
                    new: Mapping[str, Any] | None) -> int:
    """deploymentutil.NewRSNewReplicas for a rolling update."""
    want = _replicas(d)
    current_new = _replicas(new) if new is not None else 0
    surge, _ = surge_and_unavailable(d)
    current = sum(_replicas(rs) for rs in all_rs)
    if current >= want + surge:
        return current_new
    return current_new + min(want + surge - current, max(0, want - current_new))


def old_scale_downs(d: Mapping[str, Any], new: Mapping[str, Any] | None,
                    olds: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How far the old ReplicaSets may shrink now (name -> new size), keeping
    ``replicas - maxUnavailable`` available: first their unavailable pods, then
    the oldest sets' available ones."""
    if sum(_replicas(rs) for rs in olds) == 0:
        return {}
    _, max_unavailable = surge_and_unavailable(d)
    min_available = _replicas(d) - max_unavailable
    all_rs = [*olds, *([new] if new is not None else [])]
    new_unavailable = (_replicas(new) - _status(new, "availableReplicas")) if new else 0
    room = sum(_replicas(rs) for rs in all_rs) - min_available - new_unavailable
    if room <= 0:
        return {}
    sizes = {rs["metadata"]["name"]: _replicas(rs) for rs in olds}
    by_age = sorted(olds, key=lambda rs: (rs["metadata"].get("creationTimestamp", ""),
                                          rs["metadata"]["name"]))
    for rs in by_age:  # unhealthy replicas first
        name = rs["metadata"]["name"]
        unhealthy = sizes[name] - _status(rs, "availableReplicas")
        if room <= 0 or unhealthy <= 0:
            continue
        cut = min(room, unhealthy)
        sizes[name] -= cut
        room -= cut
    available = sum(_status(rs, "availableReplicas") for rs in all_rs)
    budget = available - min_available
    for rs in by_age:
        name = rs["metadata"]["name"]
        if budget <= 0:
            break
        cut = min(sizes[name], budget, _status(rs, "availableReplicas"))
        sizes[name] -= cut
        budget -= cut
    return {n: s for n, s in sizes.items()
            if s != _replicas(next(rs for rs in olds if rs["metadata"]["name"] == n))}


class DeploymentController:
    def __init__(self, writer: Writer) -> None:
        self.w = writer
        self.events = EventRecorder(writer.registry, component="deployment-controller")

    async def reconcile(self, key: tuple[str, str]) -> float | None:
        """Returns seconds after which the progress deadline needs checking, or None."""
        ns, name = key
        d = self.w.store.get(DEPLOYMENTS.key, ns, name)
        if d is None or terminating(d):
            return None
        spec = d.get("spec") or {}
        template = spec.get("template") or {}
        await adopt(self.w, REPLICASETS, d, owner_rt=DEPLOYMENTS)
        all_rs = owned(self.w.registry, REPLICASETS, d)
        new = next((rs for rs in all_rs
                    if _bare_template((rs.get("spec") or {}).get("template") or {})
                    == _bare_template(template)), None)
        olds = [rs for rs in all_rs if rs is not new]
        created = False
        if spec.get("paused"):
            # a paused rollout does not roll, but the deployment still scales
            active = [rs for rs in all_rs if _replicas(rs)] or ([new] if new else [])
            if len(active) == 1 and _replicas(active[0]) != _replicas(d):
                await self._scale(active[0], _replicas(d), d)
        else:
            if new is None:
                new = await self._create_rs(d, olds)
                created = True
            else:
                await self._sync_revision(d, new, olds)
            if await self._roll(d, new, olds):
                return await self._write_status(d, created)
            await self._prune(d, olds)
        return await self._write_status(d, created)

    # -- replica sets -------------------------------------------------------------------

    async def _create_rs(self, d: Mapping[str, Any], olds: Sequence[RS]) -> RS:
        spec = d["spec"]
        h = template_hash(_bare_template(spec["template"]))
        template = copy.deepcopy(spec["template"])
        template.setdefault("metadata", {}).setdefault("labels", {})[HASH_LABEL] = h
        selector = copy.deepcopy(spec["selector"])
        selector.setdefault("matchLabels", {})[HASH_LABEL] = h
        rolling = spec.get("strategy", {}).get("type") == "RollingUpdate"
        replicas = new_rs_replicas(d, olds, None) if rolling else 0
        body = {
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {
                "name": f"{d['metadata']['name']}-{h}",
                "labels": dict(template["metadata"]["labels"]),
                "annotations": self._annotations(d, max((revision(r) for r in olds),
                                                        default=0) + 1),
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": d["metadata"]["name"],
                                     "uid": d["metadata"]["uid"], "controller": True,
                                     "blockOwnerDeletion": True}]},
            "spec": {"replicas": replicas, "minReadySeconds": spec.get("minReadySeconds", 0),
                     "selector": selector, "template": template},
        }
        created = await self.w.create(REPLICASETS, d["metadata"]["namespace"], body)
        if replicas:
            await self.events.normal(d, "ScalingReplicaSet", f"Scaled up replica set "
                                     f"{created['metadata']['name']} from 0 to {replicas}")
        return created

    def _annotations(self, d: Mapping[str, Any], rev: int) -> dict[str, str]:
        surge, _ = surge_and_unavailable(d)
        copied = {k: v for k, v in (d["metadata"].get("annotations") or {}).items()
                  if k not in NOT_COPIED}
        return {**copied, REVISION: str(rev), DESIRED: str(_replicas(d)),
                MAX_REPLICAS: str(_replicas(d) + surge)}

    async def _sync_revision(self, d: Mapping[str, Any], new: RS, olds: Sequence[RS]) -> None:
        """A template rolled back to becomes the newest revision again."""
        top = max((revision(r) for r in olds), default=0)
        rev = revision(new) if revision(new) > top else top + 1
        wanted = self._annotations(d, rev)

        def annotate(body: dict[str, Any]) -> None:
            body["metadata"].setdefault("annotations", {}).update(wanted)
            body["spec"]["minReadySeconds"] = (d.get("spec") or {}).get("minReadySeconds", 0)

        await self.w.update(REPLICASETS, new, annotate)

    async def _scale(self, rs: RS, replicas: int, d: Mapping[str, Any]) -> None:
        annotations = self._annotations(d, revision(rs))

        def resize(body: dict[str, Any]) -> None:
            body["spec"]["replicas"] = replicas
            body["metadata"].setdefault("annotations", {}).update(
                {k: annotations[k] for k in (DESIRED, MAX_REPLICAS)})

        fresh = self.w.store.get(REPLICASETS.key, rs["metadata"]["namespace"],
                                 rs["metadata"]["name"]) or rs
        before = _replicas(fresh)
        await self.w.update(REPLICASETS, fresh, resize)
        if before != replicas:
            await self.events.normal(d, "ScalingReplicaSet", f"Scaled "
                                     f"{'up' if replicas > before else 'down'} replica set "
                                     f"{rs['metadata']['name']} from {before} to {replicas}")

    async def _roll(self, d: Mapping[str, Any], new: RS, olds: Sequence[RS]) -> bool:
        """One step of the rollout; True if something was scaled."""
        want = _replicas(d)
        if d["spec"].get("strategy", {}).get("type") == "Recreate":
            active_old = [rs for rs in olds if _replicas(rs) or _status(rs, "replicas")]
            for rs in active_old:
                if _replicas(rs):
                    await self._scale(rs, 0, d)
            if active_old:
                return True
            if _replicas(new) != want:
                await self._scale(new, want, d)
                return True
            return False
        if _replicas(new) > want:
            await self._scale(new, want, d)
            return True
        if _replicas(new) < want:
            size = new_rs_replicas(d, [*olds, new], new)
            if size != _replicas(new):
                await self._scale(new, size, d)
                return True
        downs = old_scale_downs(d, new, olds)
        for rs in olds:
            if rs["metadata"]["name"] in downs:
                await self._scale(rs, downs[rs["metadata"]["name"]], d)
        return bool(downs)

    async def _prune(self, d: Mapping[str, Any], olds: Sequence[RS]) -> None:
        """Keep at most revisionHistoryLimit old ReplicaSets that have no pods."""
        limit = int(d["spec"].get("revisionHistoryLimit", 10))
        idle = sorted((rs for rs in olds if not _replicas(rs) and not _status(rs, "replicas")
                       and not terminating(rs)), key=revision)
        for rs in idle[:max(0, len(idle) - limit)]:
            await self.w.delete(REPLICASETS, rs["metadata"]["namespace"], rs["metadata"]["name"])

    # -- status -------------------------------------------------------------------------

    async def _write_status(self, d: Mapping[str, Any], created: bool) -> float | None:
        ns, name = d["metadata"]["namespace"], d["metadata"]["name"]
        fresh = self.w.store.get(DEPLOYMENTS.key, ns, name)
        if fresh is None:
            return None
        spec = fresh["spec"]
        all_rs = owned(self.w.registry, REPLICASETS, fresh)
        bare = _bare_template(spec.get("template") or {})
        new = next((rs for rs in all_rs
                    if _bare_template(rs["spec"].get("template") or {}) == bare), None)
        want = _replicas(fresh)
        available = sum(_status(rs, "availableReplicas") for rs in all_rs)
        old_status = fresh.get("status") or {}
        counts = {
            "observedGeneration": fresh["metadata"].get("generation", 1),
            "replicas": sum(_status(rs, "replicas") for rs in all_rs),
            "updatedReplicas": _status(new, "replicas") if new else 0,
            "readyReplicas": sum(_status(rs, "readyReplicas") for rs in all_rs),
            "availableReplicas": available,
            "unavailableReplicas": max(0, sum(_replicas(rs) for rs in all_rs) - available),
        }
        if old_status.get("collisionCount"):
            counts["collisionCount"] = old_status["collisionCount"]
        now = self.w.stamp()
        conditions = list(old_status.get("conditions") or [])
        _, max_unavailable = surge_and_unavailable(fresh)
        if available >= want - max_unavailable:
            conditions = set_condition(conditions, Condition(
                "Available", "True", "MinimumReplicasAvailable",
                "Deployment has minimum availability."), now=now, update_time=True)
        else:
            conditions = set_condition(conditions, Condition(
                "Available", "False", "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability."), now=now, update_time=True)
        conditions, wait = self._progressing(fresh, new, counts=counts, conditions=conditions,
                                             created=created, now=now)
        order = {"Available": 0, "Progressing": 1}
        conditions.sort(key=lambda c: order.get(c.get("type", ""), 2))
        status = {**without_empty(counts), "conditions": conditions}

        def change(body: dict[str, Any]) -> None:
            body["status"] = status
            if new is not None:
                body["metadata"].setdefault("annotations", {})[REVISION] = str(revision(new))

        if new is not None and (fresh["metadata"].get("annotations") or {}).get(
                REVISION) != str(revision(new)):
            await self.w.update(DEPLOYMENTS, fresh, change)
            fresh = self.w.store.get(DEPLOYMENTS.key, ns, name) or fresh
        await self.w.update(DEPLOYMENTS, fresh, change, status=True)
        return wait

    def _progressing(self, d: Mapping[str, Any], new: RS | None, *, counts: Mapping[str, int],
                     conditions: list[dict[str, Any]], created: bool, now: str
                     ) -> tuple[list[dict[str, Any]], float | None]:
        """progress.go's syncRolloutStatus: the Progressing condition, and when to look
        again for the deadline."""
        deadline = d["spec"].get("progressDeadlineSeconds")
        current = next((c for c in conditions if c.get("type") == "Progressing"), None)
        if deadline is None:
            return [c for c in conditions if c.get("type") != "Progressing"], None
        rs_name = new["metadata"]["name"] if new is not None else ""
        if d["spec"].get("paused"):
            return set_condition(conditions, Condition(
                "Progressing", "Unknown", "DeploymentPaused", "Deployment is paused"),
                now=now, update_time=True), None
        if current is not None and current.get("reason") == "DeploymentPaused":
            conditions = set_condition(conditions, Condition(
                "Progressing", "Unknown", "DeploymentResumed", "Deployment is resumed"),
                now=now, update_time=True)
            current = next(c for c in conditions if c.get("type") == "Progressing")
        want = _replicas(d)
        old = d.get("status") or {}
        complete = (counts["updatedReplicas"] == want and counts["replicas"] == want
                    and counts["availableReplicas"] == want)
        if created:
            return set_condition(conditions, Condition(
                "Progressing", "True", "NewReplicaSetCreated",
                f'Created new replica set "{rs_name}"'), now=now, update_time=True), \
                float(deadline)
        if current is not None and current.get("reason") == "NewReplicaSetAvailable" \
                and counts["replicas"] == counts["updatedReplicas"] and complete:
            return conditions, None
        if complete:
            return set_condition(conditions, Condition(
                "Progressing", "True", "NewReplicaSetAvailable",
                f'ReplicaSet "{rs_name}" has successfully progressed.'), now=now,
                update_time=True), None
        old_olds = int(old.get("replicas") or 0) - int(old.get("updatedReplicas") or 0)
        progressed = (current is None
                      or counts["updatedReplicas"] > int(old.get("updatedReplicas") or 0)
                      or counts["replicas"] - counts["updatedReplicas"] < old_olds
                      or counts["readyReplicas"] > int(old.get("readyReplicas") or 0)
                      or counts["availableReplicas"] > int(old.get("availableReplicas") or 0))
        if progressed:
            cond = {"type": "Progressing", "status": "True", "lastUpdateTime": now,
                    "lastTransitionTime": current["lastTransitionTime"] if current is not None
                    and current.get("status") == "True" else now,
                    "reason": "ReplicaSetUpdated", "message": f'ReplicaSet "{rs_name}" is '
                    "progressing."}
            rest = [c for c in conditions if c.get("type") != "Progressing"]
            return [*rest, cond], float(deadline)
        assert current is not None
        if current.get("reason") == "ProgressDeadlineExceeded":
            return conditions, None
        since = parse_time(current.get("lastUpdateTime")) or self.w.now()
        left = since + float(deadline) - self.w.now()
        if left > 0:
            return conditions, left
        return set_condition(conditions, Condition(
            "Progressing", "False", "ProgressDeadlineExceeded",
            f'ReplicaSet "{rs_name}" has timed out progressing.'), now=now,
            update_time=True), None
