"""The READY, STATUS and RESTARTS columns of ``kubectl get pods``, computed as
kube's printer (pkg/printers/internalversion printPod) computes them: the
waiting or terminated reason of the container that explains the Pod
(``CrashLoopBackOff``, ``Init:0/2``, ``Completed``, ``Terminating``), native
sidecars counted among the containers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PodRow:
    ready: str
    status: str
    restarts: int
    last_restart: str = ""
    """RFC 3339: when a container last stopped before a restart (``lastState``)."""

    def restarts_text(self, ago: Callable[[str], str]) -> str:
        """kube's RESTARTS cell: ``3 (12s ago)``; `ago` turns a time into its age."""
        if self.restarts and self.last_restart:
            return f"{self.restarts} ({ago(self.last_restart)} ago)"
        return str(self.restarts)


def _terminated_reason(term: Mapping[str, Any], prefix: str = "") -> str:
    if term.get("reason"):
        return prefix + str(term["reason"])
    if term.get("signal"):
        return f"{prefix}Signal:{term['signal']}"
    return f"{prefix}ExitCode:{term.get('exitCode', 0)}"


def pod_row(pod: Mapping[str, Any]) -> PodRow:
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    inits = {c["name"]: c for c in spec.get("initContainers") or []}
    sidecars = [n for n, c in inits.items() if c.get("restartPolicy") == "Always"]
    total = len(spec.get("containers") or []) + len(sidecars)
    ready = restarts = sidecar_restarts = 0
    finished = [str(((cs.get("lastState") or {}).get("terminated") or {}).get("finishedAt") or "")
                for key in ("initContainerStatuses", "containerStatuses")
                for cs in status.get(key) or []]
    last_restart = max(finished, default="")
    reason = str(status.get("reason") or status.get("phase") or "")
    initializing = False
    init_statuses = status.get("initContainerStatuses") or []
    for i, cs in enumerate(init_statuses):
        restarts += int(cs.get("restartCount", 0))
        state = cs.get("state") or {}
        if cs.get("name") in sidecars:
            sidecar_restarts += int(cs.get("restartCount", 0))
            if cs.get("started"):
                ready += bool(cs.get("ready"))
                continue
        term, waiting = state.get("terminated"), state.get("waiting")
        if term is not None and term.get("exitCode") == 0:
            continue
        if term is not None:
            reason = _terminated_reason(term, "Init:")
        elif waiting and waiting.get("reason") and waiting["reason"] != "PodInitializing":
            reason = "Init:" + waiting["reason"]
        else:
            reason = f"Init:{i}/{len(inits)}"
        initializing = True
        break
    initialized = any(c.get("type") == "Initialized" and c.get("status") == "True"
                      for c in status.get("conditions") or [])
    if not initializing or initialized:
        restarts = sidecar_restarts
        running = False
        for cs in reversed(status.get("containerStatuses") or []):
            restarts += int(cs.get("restartCount", 0))
            state = cs.get("state") or {}
            waiting, term = state.get("waiting"), state.get("terminated")
            if waiting and waiting.get("reason"):
                reason = waiting["reason"]
            elif term is not None:
                reason = _terminated_reason(term)
            elif cs.get("ready") and "running" in state:
                running = True
                ready += 1
        if reason == "Completed" and running:
            ready_cond = any(c.get("type") == "Ready" for c in status.get("conditions") or [])
            reason = "Running" if ready_cond else "NotReady"
    if (pod.get("metadata") or {}).get("deletionTimestamp") and status.get("phase") not in (
            "Succeeded", "Failed"):
        reason = "Terminating"
    return PodRow(f"{ready}/{total}", reason, restarts, last_restart)
