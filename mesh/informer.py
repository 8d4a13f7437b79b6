"""Informers: a local, always-current copy of one kind of object, kept by list
then watch through the official kubernetes client, as client-go's informers do.

An `Informer` lists once, then watches from the list's resourceVersion, resuming
from the last version it saw whenever a watch ends, and relisting when the
server answers 410 Gone (its history no longer reaches back that far). A relist
is compared with the cache so handlers still see one ADDED, MODIFIED or DELETED
per change. The server being away is retried with capped backoff; the cache
keeps its last contents meanwhile, so whatever serves from it carries on.

The client is synchronous, so each informer reads in its own thread. Handlers
run on the asyncio loop given to `start()`, one at a time and in order. Objects
are plain dicts, as the API sent them: decoding into the client's models costs
more than everything else an informer does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Handler = Callable[[str, Obj], None]
"""Called with ("ADDED" | "MODIFIED" | "DELETED", object)."""

ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"
_GONE = 410


def key_of(obj: Obj) -> str:
    """``namespace/name``, or ``name`` for cluster-scoped objects."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


class Informer:
    """List-then-watch of one kind; `cache` maps `key_of(obj)` to the object.

    `list_func` is a client list method for the kind across all namespaces (or a
    partial of one, e.g. ``CustomObjectsApi.list_cluster_custom_object`` with its
    group, version and plural); it is called with ``watch``,
    ``resource_version``, ``allow_watch_bookmarks`` and ``_preload_content``.
    """

    def __init__(self, list_func: Callable[..., Any], *, kind: str, handler: Handler | None = None,
                 watch_timeout: int = 240, max_backoff: float = 5.0,
                 label_selector: str | None = None) -> None:
        self.kind = kind
        self.cache: dict[str, Obj] = {}
        self.resource_version: str | None = None
        self.relists = 0
        """How many times the informer listed again after a 410 or an error."""
        self.errors = 0
        self._list = list_func
        self._handler = handler
        self._watch_timeout = watch_timeout
        self._max_backoff = max_backoff
        self._selector = label_selector
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._synced = threading.Event()
        self._thread: threading.Thread | None = None
        self._resp: Any = None
        self._lock = threading.Lock()
        self._failing = False

    # -- life cycle -------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start reading in a daemon thread; handlers run on `loop` if given,
        else on the informer's thread."""
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.kind}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        with self._lock:
            resp = self._resp
        if resp is not None:
            # Best effort: the watch's read timeout ends the thread anyway.
            with contextlib.suppress(Exception):
                resp.shutdown()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def synced(self) -> bool:
        """True once the first list has landed in the cache."""
        return self._synced.is_set()

    async def wait_synced(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._synced.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def objects(self) -> list[Obj]:
        return list(self.cache.values())

    # -- the loop ---------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.1
        need_list = True
        while not self._stopping.is_set():
            try:
                if need_list:
                    self._relist()
                    need_list = False
                self._watch_once()
                backoff = 0.1
            except _Gone:
                log.info("informer %s: resourceVersion %s is too old (410 Gone); listing again",
                         self.kind, self.resource_version)
                need_list = True
            except Exception as e:  # a thread that dies stops all updates
                if self._stopping.is_set():
                    break
                self.errors += 1
                # The first failure is worth a warning; its repeats are not (one line
                # per retry for as long as a server is away), its end is.
                log.log(logging.DEBUG if self._failing else logging.WARNING,
                        "informer %s: %s; retrying in %.1fs", self.kind, _describe(e), backoff)
                self._failing = True
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                # After an error, resume the watch if we can; relist if we never listed.
                need_list = need_list or self.resource_version is None

    def _relist(self) -> None:
        kwargs: dict[str, Any] = {"_preload_content": False}
        if self._selector:
            kwargs["label_selector"] = self._selector
        resp = self._list(**kwargs)
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        self._reached()
        fresh = {key_of(obj): obj for obj in body.get("items") or []}
        self.resource_version = (body.get("metadata") or {}).get("resourceVersion")
        if self._synced.is_set():
            self.relists += 1
        old = self.cache
        events: list[tuple[str, Obj]] = []
        for key, obj in fresh.items():
            before = old.get(key)
            if before is None:
                events.append((ADDED, obj))
            elif _version(before) != _version(obj):
                events.append((MODIFIED, obj))
        events += [(DELETED, obj) for key, obj in old.items() if key not in fresh]
        self._deliver(events, replace=fresh)
        self._synced.set()

    def _watch_once(self) -> None:
        kwargs: dict[str, Any] = {
            "watch": True, "resource_version": self.resource_version,
            "allow_watch_bookmarks": True, "timeout_seconds": self._watch_timeout,
            "_preload_content": False,
            # A read timeout longer than the watch's own: a dead connection ends.
            "_request_timeout": (5, self._watch_timeout + 30),
        }
        if self._selector:
            kwargs["label_selector"] = self._selector
        resp = self._list(**kwargs)
        if 200 <= resp.status <= 299:
            self._reached()
        with self._lock:
            self._resp = resp
        try:
            for event in _events(resp):
                if self._stopping.is_set():
                    return
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == _GONE:
                        raise _Gone()
                    raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message')}")
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if rv:
                    self.resource_version = rv
                if kind in (ADDED, MODIFIED, DELETED):
                    self._deliver([(kind, obj)])
        finally:
            with self._lock:
                self._resp = None
            resp.release_conn()

    def _reached(self) -> None:
        if self._failing:
            self._failing = False
            log.info("informer %s: the API server answers again", self.kind)

    def _deliver(self, events: list[tuple[str, Obj]],
                 replace: dict[str, Obj] | None = None) -> None:
        def apply() -> None:
            if replace is not None:
                self.cache = replace
            for kind, obj in events:
                if replace is None:
                    if kind == DELETED:
                        self.cache.pop(key_of(obj), None)
                    else:
                        self.cache[key_of(obj)] = obj
                if self._handler is not None:
                    try:
                        self._handler(kind, obj)
                    except Exception:  # one bad object must not stop the rest
                        log.exception("informer %s: handler failed on %s %s", self.kind, kind,
                                      key_of(obj))

        if self._loop is None:
            apply()
        else:
            done = threading.Event()

            def run() -> None:
                try:
                    apply()
                finally:
                    done.set()

            try:
                self._loop.call_soon_threadsafe(run)
            except RuntimeError:  # the loop has closed: we are shutting down
                self._stopping.set()
                return
            # Wait, so the cache and resourceVersion never run ahead of the handlers.
            while not done.wait(0.5):
                if self._stopping.is_set() or self._loop.is_closed():
                    return


def all_synced(informers: list[Informer]) -> bool:
    """Whether there are informers and every one has listed once."""
    return bool(informers) and all(inf.synced for inf in informers)


def stop_all(informers: list[Informer], timeout: float = 1.0) -> None:
    """Stop every informer and forget them."""
    for informer in informers:
        informer.stop(timeout)
    informers.clear()


class _Gone(Exception):
    pass


def _events(resp: Any) -> Iterator[Obj]:
    if not 200 <= resp.status <= 299:
        raise ApiException(http_resp=resp)
    for line in iter_resp_lines(resp):
        if line:
            yield json.loads(line)


def _version(obj: Obj) -> str | None:
    return (obj.get("metadata") or {}).get("resourceVersion")


def _describe(e: Exception) -> str:
    if isinstance(e, ApiException):
        if e.status == 404:
            return "the API has no such resource (404); is its CRD installed?"
        if e.status == 403:
            said = _status_message(e)
            return (f"the credential may not list or watch it ({e.status} {e.reason}"
                    f"{': ' + said if said else ''}); its role must allow list and watch "
                    "(meshgate's roles: deploy/rbac-*.yaml)")
        if e.status == 401:
            return f"the credential is not accepted ({e.status} {e.reason})"
        return f"API error {e.status} {e.reason}"
    return f"{type(e).__name__}: {e}"


def _status_message(e: ApiException) -> str:
    """The API server's Status message, which names the user and the verb refused."""
    try:
        return str(json.loads(e.body or "{}").get("message") or "")
    except (ValueError, AttributeError):
        return ""
