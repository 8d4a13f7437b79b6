"""How a delete's ``propagationPolicy`` marks the owner for the garbage collector:
``Orphan`` and ``Foreground`` put kube's finalizer on it, ``Background`` (the
default) deletes it at once and leaves its dependents to the collector."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from localcluster.errors import ApiError, Cause

ORPHAN = "orphan"
FOREGROUND = "foregroundDeletion"
POLICIES = ("Foreground", "Background", "Orphan")


def propagation_policy(options: Mapping[str, Any] | None) -> str:
    """The policy DeleteOptions ask for ('' for the default); 422 as kube for others."""
    opts = options or {}
    policy = opts.get("propagationPolicy")
    if policy is None:
        return "Orphan" if opts.get("orphanDependents") is True else ""
    if policy not in POLICIES:
        listed = ", ".join(json.dumps(p) for p in (*POLICIES, "nil"))
        raise ApiError.invalid("DeleteOptions", "", [Cause(
            "propagationPolicy", f"Unsupported value: {json.dumps(policy)}: supported values: "
            f"{listed}", "FieldValueNotSupported")], group="meta.k8s.io")
    return str(policy)


def with_propagation(obj: Mapping[str, Any], policy: str) -> dict[str, Any] | None:
    """A copy of `obj` carrying the finalizer its delete's policy asks for, or None when
    the policy needs none (Background, or the finalizer is already there)."""
    finalizer = {"Orphan": ORPHAN, "Foreground": FOREGROUND}.get(policy)
    present = obj["metadata"].get("finalizers") or []
    if finalizer is None or finalizer in present or obj["metadata"].get("deletionTimestamp"):
        return None
    return {**obj, "metadata": {**obj["metadata"], "finalizers": [*present, finalizer]}}
