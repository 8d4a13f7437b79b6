"""``events.k8s.io/v1`` Events: a view of the core/v1 Events in storage, as
kube-apiserver serves them, with its field names (``regarding``, ``note``,
``reportingController``, the ``deprecated*`` fields), its field selectors and
its create validation.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from localcluster.errors import Cause
from localcluster.resources import ResourceType

RENAMED = (  # core/v1 name, events.k8s.io/v1 name
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
)
EVENT_TYPES = ("Normal", "Warning")


def from_core(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The events.k8s.io/v1 form; one already in that form comes back as it is."""
    out = {k: v for k, v in obj.items() if k not in {c for c, _ in RENAMED}}
    for core, new in RENAMED:
        if core in obj:
            out[new] = obj[core]
    out["apiVersion"], out["kind"] = "events.k8s.io/v1", "Event"
    return out


def to_core(obj: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in obj.items() if k not in {n for _, n in RENAMED}}
    for core, new in RENAMED:
        if new in obj:
            out[core] = obj[new]
    out["apiVersion"], out["kind"] = "v1", "Event"
    return out


def validate_create(obj: Mapping[str, Any]) -> list[Cause]:
    """kube's ValidateEventCreate for events.k8s.io/v1 requests."""
    causes = [Cause(f, "Required value", "FieldValueRequired")
              for f in ("eventTime", "reportingController", "reportingInstance", "action",
                        "reason") if not obj.get(f)]
    kind = obj.get("type")
    if kind not in EVENT_TYPES:
        listed = ", ".join(json.dumps(t) for t in EVENT_TYPES)
        causes.append(Cause("type", f"Unsupported value: {json.dumps(kind or '')}: supported "
                            f"values: {listed}", "FieldValueNotSupported"))
    for _, new in RENAMED[3:]:
        if obj.get(new) not in (None, "", {}, 0):
            causes.append(Cause(new, 'Invalid value: "": needs to be unset'))
    if len(str(obj.get("note", ""))) > 1024:
        causes.append(Cause("note", "Too long: may not be more than 1024 bytes",
                            "FieldValueTooLong"))
    return causes


@dataclass(frozen=True)
class Conversion:
    """How a served version that is a view of another kind's storage reads and writes it."""

    to_storage: Callable[[Mapping[str, Any]], dict[str, Any]]
    from_storage: Callable[[Mapping[str, Any]], dict[str, Any]]
    validate_create: Callable[[Mapping[str, Any]], list[Cause]]


CONVERSIONS = {("events.k8s.io", "v1", "events"): Conversion(to_core, from_core,
                                                              validate_create)}


def conversion_for(rt: ResourceType) -> Conversion | None:
    return CONVERSIONS.get((rt.group, rt.version, rt.plural))
