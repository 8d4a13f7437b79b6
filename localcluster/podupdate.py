"""What an update may change in a Pod's spec, as kube-apiserver's
ValidatePodUpdate decides it: container images, ``activeDeadlineSeconds``,
added tolerations, and ``terminationGracePeriodSeconds`` from a negative value
to 1. Anything else is refused with kube's message, followed by a diff of
what differs.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from localcluster.errors import Cause

UPDATABLE_POD_SPEC_FIELDS = ",".join((
    "`spec.containers[*].image`",
    "`spec.initContainers[*].image`",
    "`spec.activeDeadlineSeconds`",
    "`spec.tolerations` (only additions to existing tolerations)",
    "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously "
    "negative)",
))


def _go_name(key: str) -> str:
    return key[:1].upper() + key[1:]


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """A field-by-field diff in the shape of the one kube appends (``cmp.Diff``)."""
    lines = ["  core.PodSpec{"]
    same = 0
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            same += 1
            continue
        if key in old:
            lines.append(f"- \t{_go_name(key)}: {json.dumps(old[key], sort_keys=True)},")
        if key in new:
            lines.append(f"+ \t{_go_name(key)}: {json.dumps(new[key], sort_keys=True)},")
    if same:
        lines.insert(1, f"  \t... // {same} identical fields")
    lines.append("  }")
    return "\n".join(lines)


def _tolerations(old: list[Any], new: list[Any]) -> list[Cause]:
    def without_seconds(t: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in t.items() if k != "tolerationSeconds"}

    kept = [without_seconds(t) for t in new]
    if all(without_seconds(t) in kept for t in old):
        return []
    return [Cause("spec.tolerations", "Forbidden: existing toleration can not be modified "
                  "except its tolerationSeconds", "FieldValueForbidden")]


def pod_spec_update(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Cause]:
    for key in ("containers", "initContainers"):
        if len(old.get(key) or []) != len(new.get(key) or []):
            return [Cause(f"spec.{key}", "Forbidden: pod updates may not add or remove "
                          "containers", "FieldValueForbidden")]
    causes = _tolerations(old.get("tolerations") or [], new.get("tolerations") or [])
    munged = copy.deepcopy(dict(new))
    for key in ("containers", "initContainers"):
        for ours, theirs in zip(munged.get(key) or [], old.get(key) or [], strict=True):
            if "image" in theirs:
                ours["image"] = theirs["image"]
            else:
                ours.pop("image", None)
    for key in ("activeDeadlineSeconds", "tolerations", "schedulingGates"):
        if key in old:
            munged[key] = copy.deepcopy(old[key])
        else:
            munged.pop(key, None)
    grace = old.get("terminationGracePeriodSeconds")
    if isinstance(grace, int) and grace < 0 and munged.get("terminationGracePeriodSeconds") == 1:
        munged["terminationGracePeriodSeconds"] = grace
    if munged != dict(old):
        causes.append(Cause("spec", "Forbidden: pod updates may not change fields other than "
                            f"{UPDATABLE_POD_SPEC_FIELDS}\n{_diff(old, munged)}",
                            "FieldValueForbidden"))
    return causes
