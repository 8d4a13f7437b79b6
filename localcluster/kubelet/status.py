"""A Pod's status as kube's kubelet writes it, computed from what its containers
are doing: phase, conditions, and each container's status. Pure."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class Role(enum.Enum):
    INIT = "init"
    SIDECAR = "sidecar"
    MAIN = "main"


@dataclass
class ContainerView:
    """What the kubelet knows of one container, as its status shows it."""

    name: str
    image: str
    role: Role
    restart_count: int = 0
    state: dict[str, Any] = field(default_factory=lambda: {
        "waiting": {"reason": "PodInitializing"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    container_id: str = ""
    ready: bool = False
    started: bool = False
    started_at_s: float = 0.0

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "image": self.image, "imageID": "", "ready": self.ready,
            "restartCount": self.restart_count, "started": self.started,
            "state": self.state, "lastState": self.last_state}
        if self.container_id:
            out["containerID"] = self.container_id
        return out

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def terminated(self) -> dict[str, Any] | None:
        t = self.state.get("terminated")
        return t if isinstance(t, dict) else None


def phase(restart_policy: str, inits_done: bool, init_failed: bool,
          mains: Sequence[ContainerView]) -> str:
    """kube's getPhase for a Pod of these containers."""
    if init_failed and restart_policy == "Never":
        return "Failed"
    if not inits_done:
        return "Pending"
    waiting = running = stopped = succeeded = 0
    for c in mains:
        if c.running:
            running += 1
        elif c.terminated is not None:
            stopped += 1
            succeeded += c.terminated.get("exitCode") == 0
        elif c.last_state.get("terminated"):
            stopped += 1
        else:
            waiting += 1
    if waiting:
        return "Pending"
    if running:
        return "Running"
    if restart_policy == "Always":
        return "Running"
    if stopped == succeeded:
        return "Succeeded"
    return "Running" if restart_policy == "OnFailure" else "Failed"


def _condition(kind: str, ok: bool, now: str, previous: Mapping[str, Mapping[str, Any]],
               reason: str = "", message: str = "") -> dict[str, Any]:
    status = "True" if ok else "False"
    old = previous.get(kind)
    since = old.get("lastTransitionTime") if old and old.get("status") == status else now
    out: dict[str, Any] = {"type": kind, "status": status, "lastProbeTime": None,
                           "lastTransitionTime": since}
    if not ok and reason:
        out["reason"] = reason
    if not ok and message:
        out["message"] = message
    return out


def conditions(*, sandbox: bool, inits_done: bool, init_names: Sequence[str],
               containers: Sequence[ContainerView], terminal: str,
               previous: Sequence[Mapping[str, Any]], now: str) -> list[dict[str, Any]]:
    """PodReadyToStartContainers, Initialized, Ready, ContainersReady, PodScheduled."""
    before = {c.get("type", ""): c for c in previous}
    unready = [c.name for c in containers if c.role is not Role.INIT and not c.ready]
    ready = not unready and inits_done
    if terminal == "Succeeded":
        reason = "PodCompleted"
        ready = False
    else:
        reason = "ContainersNotReady"
    message = f"containers with unready status: [{' '.join(unready)}]" if unready else ""
    pending_inits = [n for n in init_names if not inits_done]
    out = [
        _condition("PodReadyToStartContainers", sandbox, now, before),
        _condition("Initialized", inits_done, now, before,
                   "PodCompleted" if terminal == "Succeeded" else "ContainersNotInitialized",
                   f"containers with incomplete status: [{' '.join(pending_inits)}]"),
        _condition("Ready", ready, now, before, reason, message),
        _condition("ContainersReady", ready, now, before, reason, message),
    ]
    scheduled = before.get("PodScheduled")
    out.append(dict(scheduled) if scheduled else _condition("PodScheduled", True, now, before))
    return out
