"""Durable object storage and the event history that watches read.

Objects live in one SQLite file per cluster. Every write takes the next value
of a single monotonic counter as its resourceVersion and appends one event to
a bounded history in the same transaction, so a restart (even after
``kill -9``) finds every acknowledged write with the same resourceVersion, and
a watch can resume from any resourceVersion still in the history. Reads are
served from an in-memory copy that mirrors the committed state.

Writes are serialised by one lock and committed on one writer thread so the
event loop keeps serving reads and watches while SQLite syncs.
"""

from __future__ import annotations

import asyncio
import enum
import json
import sqlite3
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Key = tuple[str, str]
"""(group, plural): which collection an object belongs to."""


class EventType(enum.StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


@dataclass(frozen=True)
class Event:
    rv: int
    type: EventType
    key: Key
    namespace: str
    name: str
    obj: dict[str, Any]
    prev: dict[str, Any] | None = None
    """The object before this event, so selector watches can turn changes into ADDED/DELETED."""
    _wire: list[bytes] = field(default_factory=list, compare=False, repr=False)

    def wire(self) -> bytes:
        """The watch line for this event, encoded once however many watchers send it."""
        if not self._wire:
            self._wire.append(
                json.dumps({"type": self.type.value, "object": self.obj}, separators=(",", ":"))
                .encode() + b"\n"
            )
        return self._wire[0]


@dataclass(frozen=True)
class Write:
    """One change to commit: ``obj`` None means delete."""

    key: Key
    namespace: str
    name: str
    obj: dict[str, Any] | None
    type: EventType


_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    grp TEXT NOT NULL, resource TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    rv INTEGER NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (grp, resource, namespace, name)
);
CREATE TABLE IF NOT EXISTS events (
    rv INTEGER PRIMARY KEY, type TEXT NOT NULL, grp TEXT NOT NULL, resource TEXT NOT NULL,
    namespace TEXT NOT NULL, name TEXT NOT NULL, data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Store:
    """The committed state of one cluster, in SQLite and mirrored in memory."""

    def __init__(self, path: Path, *, history: int = 10_000, synchronous: str = "FULL") -> None:
        self.path = path
        self.history_limit = max(1, history)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(_SCHEMA)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._lock = asyncio.Lock()
        self._objects: dict[Key, dict[tuple[str, str], dict[str, Any]]] = {}
        self._history: deque[Event] = deque()
        self._listeners: list[Callable[[Event], None]] = []
        self.rv = self._meta("rv")
        self.trimmed_upto = self._meta("trimmed_upto")
        self._load()

    # -- reading -------------------------------------------------------------

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _load(self) -> None:
        for grp, res, ns, name, data in self._db.execute(
            "SELECT grp, resource, namespace, name, data FROM objects"
        ):
            self._objects.setdefault((grp, res), {})[(ns, name)] = json.loads(data)
        for rv, typ, grp, res, ns, name, data in self._db.execute(
            "SELECT rv, type, grp, resource, namespace, name, data FROM events ORDER BY rv"
        ):
            self._history.append(
                Event(rv, EventType(typ), (grp, res), ns, name, json.loads(data))
            )

    def get(self, key: Key, namespace: str, name: str) -> dict[str, Any] | None:
        return self._objects.get(key, {}).get((namespace, name))

    def items(self, key: Key, namespace: str | None = None) -> Iterator[dict[str, Any]]:
        """Objects of one collection in (namespace, name) order; all namespaces when None."""
        collection = self._objects.get(key, {})
        for (ns, _name) in sorted(collection):
            if namespace is None or ns == namespace:
                yield collection[(ns, _name)]

    def count(self, key: Key) -> int:
        return len(self._objects.get(key, {}))

    def events_since(self, rv: int) -> list[Event] | None:
        """Events after ``rv``, or None when some of them have left the history."""
        if rv < self.trimmed_upto:
            return None
        if not self._history or rv >= self._history[-1].rv:
            return []
        # History is ordered by rv; scan from the end, since watchers are usually recent.
        out: list[Event] = []
        for ev in reversed(self._history):
            if ev.rv <= rv:
                break
            out.append(ev)
        out.reverse()
        return out

    # -- writing -------------------------------------------------------------

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``listener`` for every committed event, in order; returns an unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    @property
    def lock(self) -> asyncio.Lock:
        """Held by the registry across read-check-write so preconditions stay true."""
        return self._lock

    async def commit(self, writes: list[Write]) -> list[Event]:
        """Commit writes atomically (caller holds ``lock``); stamps resourceVersions.

        Each object's ``metadata.resourceVersion`` is set before it is stored;
        for deletes the event carries the last state with the deletion's rv.
        """
        assert self._lock.locked()
        events: list[Event] = []
        rv = self.rv
        pending: dict[tuple[Key, str, str], dict[str, Any] | None] = {}
        for w in writes:
            rv += 1
            ident = (w.key, w.namespace, w.name)
            last = pending[ident] if ident in pending else self.get(*ident)
            pending[ident] = w.obj
            if w.obj is None:
                body = dict(last or {})
                body["metadata"] = {**body.get("metadata", {}), "resourceVersion": str(rv)}
            else:
                body = w.obj
                body.setdefault("metadata", {})["resourceVersion"] = str(rv)
            events.append(Event(rv, w.type, w.key, w.namespace, w.name, body, last))
        trim_to = max(0, rv - self.history_limit)
        written = asyncio.get_running_loop().run_in_executor(
            self._writer, self._write_sql, writes, events, rv, trim_to
        )
        # A request cancelled now (its client went away) must not leave the write on
        # disk but not in memory: every later write would then reuse its versions.
        cancelled = False
        while not written.done():
            try:
                await asyncio.shield(written)
            except asyncio.CancelledError:
                cancelled = True
        written.result()  # the write's own failure, if any: nothing was stored
        self.rv = rv
        for w, ev in zip(writes, events, strict=True):
            collection = self._objects.setdefault(w.key, {})
            if w.obj is None:
                collection.pop((w.namespace, w.name), None)
            else:
                collection[(w.namespace, w.name)] = ev.obj
            self._history.append(ev)
        if trim_to > self.trimmed_upto:
            self.trimmed_upto = trim_to
            while self._history and self._history[0].rv <= trim_to:
                self._history.popleft()
        for ev in events:
            for listener in list(self._listeners):
                listener(ev)
        if cancelled:
            raise asyncio.CancelledError
        return events

    def _write_sql(self, writes: list[Write], events: list[Event], rv: int, trim_to: int) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for w, ev in zip(writes, events, strict=True):
                data = json.dumps(ev.obj, separators=(",", ":"))
                grp, res = w.key
                if w.obj is None:
                    db.execute(
                        "DELETE FROM objects WHERE grp=? AND resource=? AND namespace=? AND name=?",
                        (grp, res, w.namespace, w.name),
                    )
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO objects VALUES (?,?,?,?,?,?)",
                        (grp, res, w.namespace, w.name, ev.rv, data),
                    )
                db.execute(
                    "INSERT INTO events VALUES (?,?,?,?,?,?,?)",
                    (ev.rv, ev.type.value, grp, res, w.namespace, w.name, data),
                )
            db.execute("INSERT OR REPLACE INTO meta VALUES ('rv', ?)", (rv,))
            if trim_to > self.trimmed_upto:
                db.execute("DELETE FROM events WHERE rv <= ?", (trim_to,))
                db.execute("INSERT OR REPLACE INTO meta VALUES ('trimmed_upto', ?)", (trim_to,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._db.close()
