"""Graceful deletion of Pods, as kube-apiserver's pod strategy decides it.

A Pod bound to a node is not removed by DELETE: it is marked with
``deletionTimestamp`` (now + the grace period) and ``deletionGracePeriodSeconds``,
and the node's kubelet stops its containers and finishes the delete with a
grace period of 0. A Pod that is not bound, or has already finished
(Succeeded/Failed), is removed at once, as is any delete asking for 0 seconds.
A second DELETE may shorten the grace period, never lengthen it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from localcluster.errors import ApiError

PODS_KEY = ("", "pods")


def grace_period(obj: Mapping[str, Any], options: Mapping[str, Any]) -> int:
    """The grace period a DELETE of Pod `obj` gets: 0 means remove it now."""
    asked = options.get("gracePeriodSeconds")
    if asked is not None and not isinstance(asked, int):
        raise ApiError.bad_request("gracePeriodSeconds must be an integer")
    spec = obj.get("spec") or {}
    period = asked if asked is not None else int(spec.get("terminationGracePeriodSeconds", 30)
                                                 or 0)
    if not spec.get("nodeName"):
        period = 0
    if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        period = 0
    if period < 0:
        period = 1
    return period


def mark(obj: dict[str, Any], period: int, now: float) -> bool:
    """Mark `obj` for deletion in `period` seconds; False if an earlier mark already
    ends sooner (kube keeps the shorter one)."""
    meta = obj["metadata"]
    current = meta.get("deletionGracePeriodSeconds")
    if meta.get("deletionTimestamp") and current is not None and period >= current:
        return False
    at = dt.datetime.fromtimestamp(int(now) + period, dt.UTC)
    meta["deletionTimestamp"] = at.strftime("%Y-%m-%dT%H:%M:%SZ")
    meta["deletionGracePeriodSeconds"] = period
    return True
