"""Events written the way client-go's core/v1 event recorder writes them, for
the in-process controllers (and the kubelet) to record what happened to an
object so that ``kubectl get events`` and ``kubectl describe`` show it.

As kube's EventCorrelator: an event identical to one already written (same
source, object, type, reason and message) bumps that Event's ``count`` and
``lastTimestamp`` instead of adding another; more than ten similar events
(same but for the message) within ten minutes become one
"(combined from similar events)" Event; and a per-object token bucket (burst
25, one more every five minutes) drops the rest of a flood.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from localcluster.errors import ApiError
from localcluster.registry import Registry, now_rfc3339
from localcluster.resources import BUILTIN

log = logging.getLogger(__name__)

EVENTS = next(rt for rt in BUILTIN if (rt.group, rt.plural) == ("", "events"))
MAX_CACHED = 4096
SIMILAR_LIMIT = 10
SIMILAR_WINDOW = 600.0
SPAM_BURST = 25
SPAM_REFILL_SECONDS = 300.0
COMBINED_PREFIX = "(combined from similar events): "


class EventKind(enum.StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"


def object_reference(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    ref = {"kind": obj.get("kind", ""), "namespace": meta.get("namespace", ""),
           "name": meta.get("name", ""), "uid": meta.get("uid", ""),
           "apiVersion": obj.get("apiVersion", ""),
           "resourceVersion": meta.get("resourceVersion", "")}
    return {k: v for k, v in ref.items() if v}


@dataclass
class _Written:
    namespace: str
    name: str
    count: int


@dataclass
class _Similar:
    last: float
    messages: set[str] = field(default_factory=set)


@dataclass
class _Bucket:
    tokens: float
    at: float


class EventRecorder:
    """Records Events from one component (``source.component``), on one host."""

    def __init__(self, registry: Registry, *, component: str, host: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.component = component
        self.host = host
        self.clock = clock
        self._written: OrderedDict[tuple[str, ...], _Written] = OrderedDict()
        self._similar: OrderedDict[tuple[str, ...], _Similar] = OrderedDict()
        self._buckets: OrderedDict[tuple[str, ...], _Bucket] = OrderedDict()
        self._lock = asyncio.Lock()

    async def normal(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        await self.record(obj, EventKind.NORMAL, reason, message)

    async def warning(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        await self.record(obj, EventKind.WARNING, reason, message)

    async def record(self, obj: Mapping[str, Any], kind: EventKind, reason: str,
                     message: str) -> None:
        """Write (or count) one Event about ``obj``; a failure is logged, never raised,
        since an Event is a report and must not fail the work it reports on."""
        ref = object_reference(obj)
        async with self._lock:
            try:
                await self._record(ref, kind, reason, message)
            except ApiError as e:
                log.warning("event not recorded object=%s/%s/%s reason=%s cause=%s",
                            ref.get("kind"), ref.get("namespace", ""), ref.get("name"),
                            reason, e)

    async def _record(self, ref: Mapping[str, Any], kind: EventKind, reason: str,
                      message: str) -> None:
        now = self.clock()
        source = (self.component, self.host)
        obj_key = (*source, *(str(ref.get(k, "")) for k in (
            "kind", "namespace", "name", "uid", "apiVersion")))
        if not self._allow(obj_key, now):
            return
        similar_key = (*obj_key, kind.value, reason)
        key = (*similar_key, message)
        similar = self._similar.get(similar_key)
        if similar is None or now - similar.last > SIMILAR_WINDOW:
            similar = _Similar(now)
        similar.last = now
        similar.messages.add(message)
        _remember(self._similar, similar_key, similar)
        if len(similar.messages) >= SIMILAR_LIMIT:
            key, message = similar_key, COMBINED_PREFIX + message
        stamp = now_rfc3339(lambda: now)
        seen = self._written.get(key)
        if seen is not None:
            try:
                await self.registry.patch(
                    EVENTS, seen.namespace, seen.name, "application/merge-patch+json",
                    {"count": seen.count + 1, "lastTimestamp": stamp, "message": message})
                seen.count += 1
                _remember(self._written, key, seen)
                return
            except ApiError as e:
                if e.code != 404:
                    raise
        namespace = str(ref.get("namespace") or "default")
        name = f"{ref.get('name', '')}.{int(now * 1e9):x}"
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": dict(ref), "reason": reason, "message": message,
            "source": {k: v for k, v in (("component", self.component), ("host", self.host))
                       if v},
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1, "type": kind.value,
            "reportingComponent": self.component, "reportingInstance": self.host,
        }
        await self.registry.create(EVENTS, namespace, body)
        _remember(self._written, key, _Written(namespace, name, 1))

    def _allow(self, key: tuple[str, ...], now: float) -> bool:
        bucket = self._buckets.get(key) or _Bucket(SPAM_BURST, now)
        bucket.tokens = min(SPAM_BURST, bucket.tokens + (now - bucket.at) / SPAM_REFILL_SECONDS)
        bucket.at = now
        _remember(self._buckets, key, bucket)
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True


def _remember(cache: OrderedDict[tuple[str, ...], Any], key: tuple[str, ...],
              value: Any) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > MAX_CACHED:
        cache.popitem(last=False)
