"""The Job controller: Pods from the template until ``completions`` of them have
Succeeded (``parallelism`` at a time), failure once more than ``backoffLimit``
have Failed or ``activeDeadlineSeconds`` has passed, and the status and
conditions kube 1.32 writes (SuccessCriteriaMet/FailureTarget, then
Complete/Failed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from localcluster.events import EventRecorder
from localcluster.workloads.common import (
    JOBS,
    PODS,
    Condition,
    Writer,
    owned,
    parse_time,
    pod_active,
    pod_phase,
    pod_ready,
    set_condition,
    terminating,
)

COMPLETED = ("CompletionsReached", "Reached expected number of succeeded pods")
BACKOFF = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
DEADLINE = ("DeadlineExceeded", "Job was active longer than specified deadline")


def finished(job: Mapping[str, Any]) -> bool:
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


class JobController:
    def __init__(self, writer: Writer) -> None:
        self.w = writer
        self.events = EventRecorder(writer.registry, component="job-controller")

    async def reconcile(self, key: tuple[str, str]) -> float | None:
        ns, name = key
        job = self.w.store.get(JOBS.key, ns, name)
        if job is None or terminating(job):
            return None
        if finished(job):
            return await self._expire(job)
        spec = job.get("spec") or {}
        status = dict(job.get("status") or {})
        pods = owned(self.w.registry, PODS, job)
        active = [p for p in pods if pod_active(p)]
        succeeded = sum(1 for p in pods if pod_phase(p) == "Succeeded")
        failed = sum(1 for p in pods if pod_phase(p) == "Failed")
        now = self.w.now()
        stamp = self.w.stamp()
        if not status.get("startTime") and not spec.get("suspend"):
            status["startTime"] = stamp
        started = parse_time(status.get("startTime"))
        completions = spec.get("completions")
        outcome: tuple[str, str] | None = None
        failure: tuple[str, str] | None = None
        if failed > int(spec.get("backoffLimit", 6)):
            failure = BACKOFF
        elif spec.get("activeDeadlineSeconds") is not None and started is not None and \
                now >= started + int(spec["activeDeadlineSeconds"]):
            failure = DEADLINE
        elif (completions is not None and succeeded >= int(completions)) or (
                completions is None and succeeded > 0 and not active):
            outcome = COMPLETED
        wait: float | None = None
        if failure or outcome:
            for pod in active:
                await self._delete(job, pod)
            active = []
        else:
            want = 0 if spec.get("suspend") else int(spec.get("parallelism", 1))
            if completions is not None:
                want = min(want, int(completions) - succeeded)
            for _ in range(max(0, want - len(active))):
                pod = await self.w.create(PODS, ns, self.w.pod_body(JOBS, job, spec["template"]))
                await self.events.normal(job, "SuccessfulCreate",
                                         f"Created pod: {pod['metadata']['name']}")
            for pod in sorted(active, key=lambda p: p["metadata"]["name"])[max(0, want):]:
                await self._delete(job, pod)
            active = [p for p in owned(self.w.registry, PODS, job) if pod_active(p)]
            if spec.get("activeDeadlineSeconds") is not None and started is not None:
                wait = max(0.0, started + int(spec["activeDeadlineSeconds"]) - now)
        status.update({"active": len(active), "succeeded": succeeded, "failed": failed,
                       "ready": sum(1 for p in active if pod_ready(p)), "terminating": 0,
                       "uncountedTerminatedPods": {}})
        for field in ("active", "succeeded", "failed"):
            if not status[field]:
                del status[field]
        conditions = list(status.get("conditions") or [])
        suspended = next((c for c in conditions if c.get("type") == "Suspended"), None)
        if spec.get("suspend") and not (failure or outcome):
            conditions = set_condition(conditions, Condition(
                "Suspended", "True", "JobSuspended", "Job suspended"), now=stamp)
        elif suspended is not None and suspended.get("status") == "True":
            conditions = set_condition(conditions, Condition(
                "Suspended", "False", "JobResumed", "Job resumed"), now=stamp)
        if outcome:
            for ctype in ("SuccessCriteriaMet", "Complete"):
                conditions = set_condition(conditions, Condition(ctype, "True", *outcome),
                                           now=stamp)
            status["completionTime"] = stamp
        elif failure:
            for ctype in ("FailureTarget", "Failed"):
                conditions = set_condition(conditions, Condition(ctype, "True", *failure),
                                           now=stamp)
        await self._report(job, conditions)
        if conditions:
            status["conditions"] = [{"lastProbeTime": c.get("lastProbeTime", stamp), **c}
                                    for c in conditions]
        fresh = self.w.store.get(JOBS.key, ns, name)
        if fresh is not None:
            await self.w.update(JOBS, fresh, lambda b: b.__setitem__("status", status),
                                status=True)
        return wait

    async def _delete(self, job: Mapping[str, Any], pod: Mapping[str, Any]) -> None:
        await self.w.delete(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])
        await self.events.normal(job, "SuccessfulDelete",
                                 f"Deleted pod: {pod['metadata']['name']}")

    async def _report(self, job: Mapping[str, Any], conditions: list[dict[str, Any]]) -> None:
        """Events for the conditions this pass sets (before they are written)."""
        before = {c.get("type"): (c.get("status"), c.get("reason")) for c in
                  (job.get("status") or {}).get("conditions") or []}
        for cond in conditions:
            if before.get(cond.get("type")) == (cond.get("status"), cond.get("reason")):
                continue
            if cond.get("type") == "Suspended":
                await self.events.normal(job, "Suspended" if cond["status"] == "True"
                                         else "Resumed", str(cond.get("message")))
            elif cond.get("type") == "Complete":
                await self.events.normal(job, "Completed", "Job completed")
            elif cond.get("type") == "Failed":
                await self.events.warning(job, str(cond.get("reason")),
                                          str(cond.get("message")))

    async def _expire(self, job: Mapping[str, Any]) -> float | None:
        """ttlSecondsAfterFinished, as kube's TTL-after-finished controller: the finished
        Job and (by garbage collection) its Pods are deleted once the time is up."""
        ttl = (job.get("spec") or {}).get("ttlSecondsAfterFinished")
        if ttl is None:
            return None
        status = job.get("status") or {}
        done = [parse_time(c.get("lastTransitionTime")) for c in status.get("conditions") or []
                if c.get("type") in ("Complete", "Failed")]
        finished_at = parse_time(status.get("completionTime")) or max(
            (t for t in done if t is not None), default=self.w.now())
        left = finished_at + int(ttl) - self.w.now()
        if left > 0:
            return left
        meta = job["metadata"]
        await self.w.delete(JOBS, meta["namespace"], meta["name"],
                            {"propagationPolicy": "Background",
                             "preconditions": {"uid": meta["uid"]}})
        return None
