"""Timestamps as kube-apiserver writes them back: a ``metav1.Time`` in RFC 3339
UTC to the second (``2026-01-01T00:00:00Z``), a ``metav1.MicroTime`` with six
fractional digits (``2026-01-01T00:00:00.000000Z``), whatever offset or
precision the request used. Clients parse MicroTime fields with the exact
layout, so an Event's ``eventTime`` sent as ``+00:00`` would otherwise make
``kubectl describe`` drop every Event.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

MICRO_TIME_FIELDS = frozenset({"eventTime", "lastObservedTime", "acquireTime", "renewTime"})
"""The fields the built-in kinds declare as ``metav1.MicroTime``."""


def _format(value: str, *, micro: bool) -> str:
    text = value.strip().upper().replace("Z", "+00:00")
    if "." in text:  # fromisoformat reads at most six fractional digits
        head, _, rest = text.partition(".")
        digits = rest[:len(rest) - len(rest.lstrip("0123456789"))]
        text = f"{head}.{digits[:6]:0<6}{rest[len(digits):]}"
    try:
        at = dt.datetime.fromisoformat(text)
    except ValueError:
        return value  # schema validation reports it
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.UTC)
    at = at.astimezone(dt.UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def normalize_times(obj: Any, schema: Mapping[str, Any], name: str = "") -> Any:
    """``obj`` with each ``date-time`` value of ``schema`` in kube's form."""
    if isinstance(obj, str) and schema.get("format") == "date-time":
        return _format(obj, micro=name in MICRO_TIME_FIELDS)
    if isinstance(obj, dict):
        props = schema.get("properties") or {}
        return {k: normalize_times(v, props[k], k) if k in props else v
                for k, v in obj.items()}
    if isinstance(obj, list) and isinstance(schema.get("items"), Mapping):
        return [normalize_times(v, schema["items"], name) for v in obj]
    return obj
