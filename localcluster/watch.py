"""Watch streams: newline-delimited JSON events from a resourceVersion onwards.

A watch first replays what the client missed (the current objects as ADDED
when it gives no resourceVersion, or the history after the one it gives),
then follows live commits. A watch-list (``sendInitialEvents=true``) sends the
current objects as ADDED and, when bookmarks are allowed, a BOOKMARK annotated
``k8s.io/initial-events-end`` before following live commits. Subscribing and
replaying happen with no await in between, so no event falls in the gap. A
resourceVersion older than the history gets kube's ``410 Gone`` ERROR event; a
watcher too slow to keep up is closed so that it re-watches rather than making
the server hold its backlog.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from localcluster.errors import ApiError
from localcluster.resources import ResourceType
from localcluster.selectors import FieldSelector, LabelSelector
from localcluster.store import Event, EventType, Store

log = logging.getLogger(__name__)

MAX_BACKLOG = 50_000
Transform = Callable[[dict[str, Any]], dict[str, Any]]
"""Turns an event's object into what this watcher asked for (e.g. a Table)."""


@dataclass(frozen=True)
class WatchRequest:
    rt: ResourceType
    namespace: str | None
    resource_version: str
    labels: LabelSelector | None
    fields: FieldSelector | None
    bookmarks: bool
    timeout: float
    initial_events_end: bool = False
    """Mark the end of the initial ADDED events with kube's annotated bookmark."""


class Watcher:
    def __init__(self, req: WatchRequest, store: Store, rewrite_version: bool,
                 transform: Transform | None) -> None:
        self.req = req
        self.store = store
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.overflowed = False
        self._rewrite = rewrite_version
        self._transform = transform

    def matches(self, obj: Mapping[str, Any] | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        if self.req.namespace is not None and meta.get("namespace", "") != self.req.namespace:
            return False
        if self.req.labels and not self.req.labels.matches(meta.get("labels")):
            return False
        return not (self.req.fields and not self.req.fields.matches(obj))

    def offer(self, ev: Event) -> None:
        if ev.key != self.req.rt.key or self.overflowed:
            return
        if self.queue.qsize() >= MAX_BACKLOG:
            self.overflowed = True
            self.queue.put_nowait(None)
            return
        self.queue.put_nowait(ev)

    def encode(self, ev: Event) -> bytes | None:
        """The line to send for ``ev``, translated for selectors, or None to skip it."""
        if ev.key != self.req.rt.key:
            return None
        now = self.matches(ev.obj)
        typ = ev.type
        if typ is EventType.MODIFIED and ev.prev is not None:
            before = self.matches(ev.prev)
            if before and not now:
                typ, now = EventType.DELETED, True
            elif now and not before:
                typ = EventType.ADDED
        if not now:
            return None
        if typ is ev.type and not self._rewrite and self._transform is None:
            return ev.wire()
        obj = dict(ev.obj)
        obj["apiVersion"], obj["kind"] = self.req.rt.api_version, self.req.rt.kind
        return self.line(typ.value, obj)

    def line(self, typ: str, obj: dict[str, Any]) -> bytes:
        if self._transform is not None:
            obj = self._transform(obj)
        return json.dumps({"type": typ, "object": obj}, separators=(",", ":")).encode() + b"\n"


INITIAL_EVENTS_END = "k8s.io/initial-events-end"


def _bookmark(rt: ResourceType, rv: int, *, initial_end: bool = False) -> bytes:
    meta: dict[str, Any] = {"resourceVersion": str(rv)}
    if initial_end:
        meta["annotations"] = {INITIAL_EVENTS_END: "true"}
    mark = {"type": "BOOKMARK",
            "object": {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta}}
    return json.dumps(mark, separators=(",", ":")).encode() + b"\n"


def _error_line(err: ApiError) -> bytes:
    return json.dumps({"type": "ERROR", "object": err.status()}).encode() + b"\n"


async def serve_watch(request: web.Request, req: WatchRequest, store: Store,
                      *, bookmark_interval: float, initial: list[dict[str, Any]] | None,
                      rewrite_version: bool, transform: Transform | None = None
                      ) -> web.StreamResponse:
    """Stream events until the client leaves, the timeout passes or the server stops."""
    watcher = Watcher(req, store, rewrite_version, transform)
    backlog: list[Event] | None = []
    if initial is None:
        try:
            since = int(req.resource_version)
        except ValueError as e:
            raise ApiError.bad_request(f"invalid resourceVersion {req.resource_version!r}") from e
        backlog = store.events_since(since)
    listed_rv = store.rv
    unsubscribe = store.subscribe(watcher.offer)
    resp = web.StreamResponse(headers={"Content-Type": "application/json",
                                       "Cache-Control": "no-cache, private"})
    resp.enable_chunked_encoding()
    try:
        await resp.prepare(request)
        if backlog is None:
            await resp.write(_error_line(ApiError.gone(
                f"too old resource version: {req.resource_version} ({store.trimmed_upto + 1})")))
            return resp
        lines = [watcher.line("ADDED", o) for o in initial or () if watcher.matches(o)]
        lines += [line for ev in backlog if (line := watcher.encode(ev))]
        if req.initial_events_end and req.bookmarks:
            lines.append(_bookmark(req.rt, listed_rv, initial_end=True))
        if lines:
            await resp.write(b"".join(lines))
        await _follow(resp, watcher, bookmark_interval)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        unsubscribe()
    return resp


async def _follow(resp: web.StreamResponse, watcher: Watcher, bookmark_interval: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + watcher.req.timeout
    next_bookmark = loop.time() + bookmark_interval
    last_rv = watcher.store.rv
    while True:
        now = loop.time()
        if now >= deadline:
            return
        wait = deadline - now
        if watcher.req.bookmarks:
            wait = min(wait, max(0.0, next_bookmark - now))
        try:
            first = await asyncio.wait_for(watcher.queue.get(), timeout=wait)
        except TimeoutError:
            if watcher.req.bookmarks and loop.time() >= next_bookmark:
                await resp.write(_bookmark(watcher.req.rt, max(last_rv, watcher.store.rv)))
                next_bookmark = loop.time() + bookmark_interval
            continue
        batch = [first]
        while not watcher.queue.empty():
            batch.append(watcher.queue.get_nowait())
        lines: list[bytes] = []
        for ev in batch:
            if ev is None:
                log.info("watch closed: backlog over %d events resource=%s", MAX_BACKLOG,
                         watcher.req.rt.qualified_plural)
                if lines:
                    await resp.write(b"".join(lines))
                return
            last_rv = ev.rv
            line = watcher.encode(ev)
            if line:
                lines.append(line)
        if lines:
            await resp.write(b"".join(lines))
