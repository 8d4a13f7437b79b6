"""A Link's status: its conditions and the Services it mirrors, computed from
what the controller knows. Pure logic; the controller writes the result to the
Link's ``/status`` when it differs from what is there.

Conditions: CredentialsValid (the Secret and the remote API's verdict on its
credential), RemoteReachable (the remote API answers), GatewayAlive (the
gateway's probe, with hysteresis) and Ready (all three hold and the spec is
valid), each with a CamelCase reason and a message a person can act on.
Beside them, ``gatewayLatency``: percentiles of the latest successful gateway
probes, which `meshgate multicluster gateways` prints.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from mirror.mirrors import Obj, remote_key


class ConditionType(StrEnum):
    READY = "Ready"
    CREDENTIALS_VALID = "CredentialsValid"
    REMOTE_REACHABLE = "RemoteReachable"
    GATEWAY_ALIVE = "GatewayAlive"


_ORDER = (ConditionType.READY, ConditionType.CREDENTIALS_VALID,
          ConditionType.REMOTE_REACHABLE, ConditionType.GATEWAY_ALIVE)
_PARTS = _ORDER[1:]


@dataclass(frozen=True)
class Condition:
    type: ConditionType
    status: bool | None
    """None: unknown (not checked yet)."""
    reason: str
    message: str

    @property
    def status_text(self) -> str:
        return "Unknown" if self.status is None else str(self.status)


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ready(conditions: Mapping[ConditionType, Condition], *, spec_error: str | None = None
          ) -> Condition:
    """Ready holds when every other condition does; otherwise it says why not."""
    if spec_error is not None:
        return Condition(ConditionType.READY, False, "InvalidSpec", spec_error)
    for kind in _PARTS:
        c = conditions.get(kind)
        if c is None or c.status is None:
            return Condition(ConditionType.READY, False, "Pending",
                             f"{kind.value} has not been checked yet")
        if c.status is False:
            return Condition(ConditionType.READY, False, c.reason, c.message)
    return Condition(ConditionType.READY, True, "Mirroring",
                     "the remote cluster is reachable and its gateway alive")


def mirrored_list(mirrors: Iterable[Obj]) -> list[dict[str, str]]:
    """The status entries of local mirrors, sorted by namespace and name."""
    out = []
    for obj in mirrors:
        meta = obj.get("metadata") or {}
        key = remote_key(obj)
        entry = {"name": str(meta.get("name")), "namespace": str(meta.get("namespace"))}
        if key is not None:
            entry.update(remoteName=key.name, remoteNamespace=key.namespace)
        out.append(entry)
    return sorted(out, key=lambda e: (e["namespace"], e["name"]))


def latency_summary(samples: Sequence[float]) -> dict[str, Any] | None:
    """``{"p50", "p95", "p99"}`` in milliseconds (nearest rank, rounded to 0.1 ms) and
    the number of samples; None without samples."""
    if not samples:
        return None
    ordered = sorted(samples)

    def rank(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 1)

    return {"p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99), "samples": len(ordered)}


def link_status(conditions: Mapping[ConditionType, Condition], mirrors: Iterable[Obj], *,
                previous: Mapping[str, Any] | None, generation: int | None,
                spec_error: str | None = None, latency: Mapping[str, Any] | None = None,
                now: str | None = None) -> dict[str, Any]:
    """The Link's whole status. A condition keeps its lastTransitionTime while its
    status stays what `previous` says."""
    all_conditions = {**conditions, ConditionType.READY: ready(conditions,
                                                                spec_error=spec_error)}
    before = {c.get("type"): c for c in (previous or {}).get("conditions") or []}
    stamp = now or now_rfc3339()
    written = []
    for kind in _ORDER:
        c = all_conditions.get(kind)
        if c is None:
            continue
        old = before.get(kind.value) or {}
        since = old.get("lastTransitionTime") if old.get("status") == c.status_text else None
        written.append({"type": kind.value, "status": c.status_text, "reason": c.reason,
                        "message": c.message, "lastTransitionTime": since or stamp})
    listed = mirrored_list(mirrors)
    status: dict[str, Any] = {"conditions": written, "mirroredServiceCount": len(listed),
                              "mirroredServices": listed}
    if latency is not None:
        status["gatewayLatency"] = dict(latency)
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def same_status(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    return dict(a or {}) == dict(b or {})
