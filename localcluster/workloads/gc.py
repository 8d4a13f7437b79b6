"""Garbage collection by ownerReferences, as kube's garbage collector does it:

- an object whose owners are all gone is deleted (background propagation);
  one that still has a live owner only loses the reference to the dead one;
- an owner deleted with ``propagationPolicy=Orphan`` carries the ``orphan``
  finalizer: its dependents lose their reference to it, then it goes;
- an owner deleted with ``propagationPolicy=Foreground`` carries the
  ``foregroundDeletion`` finalizer: its dependents are deleted (in the
  foreground too), and it goes once none is left.

Like kube's dependency graph, an index of where each uid lives and which
objects name it as an owner is built once from the store and then kept from
its events; the work key is an owner's uid, and the reconcile reads the
objects themselves from the store.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from localcluster.catalog import Catalog
from localcluster.resources import ResourceType
from localcluster.store import Event, EventType
from localcluster.workloads.common import Writer
from localcluster.workloads.propagation import FOREGROUND, ORPHAN

Location = tuple[tuple[str, str], str, str]
"""(storage key, namespace, name) of a stored object."""


def owner_uids(obj: Mapping[str, Any] | None) -> list[str]:
    if obj is None:
        return []
    return [str(r.get("uid")) for r in obj["metadata"].get("ownerReferences") or []
            if r.get("uid")]


def _waiting(obj: Mapping[str, Any]) -> bool:
    """Being deleted with a propagation finalizer the collector has to clear."""
    meta = obj["metadata"]
    return bool(meta.get("deletionTimestamp")) and bool(
        {ORPHAN, FOREGROUND} & set(meta.get("finalizers") or []))


class GarbageCollector:
    def __init__(self, writer: Writer, catalog: Catalog) -> None:
        self.w = writer
        self.catalog = catalog
        self._where: dict[str, Location] = {}
        self._dependents: dict[str, set[Location]] = {}
        self._owners: dict[Location, list[str]] = {}

    # -- the index ---------------------------------------------------------------------

    def _storage_types(self) -> Iterator[ResourceType]:
        seen: set[tuple[str, str]] = set()
        for rt in self.catalog.all():
            if rt.persisted and rt.key not in seen:
                seen.add(rt.key)
                yield self.catalog.storage_type(rt.key) or rt

    def _index(self, loc: Location, obj: Mapping[str, Any] | None) -> None:
        for uid in self._owners.pop(loc, []):
            self._dependents.get(uid, set()).discard(loc)
            if not self._dependents.get(uid, True):
                del self._dependents[uid]
        if obj is None:
            return
        self._where[str(obj["metadata"].get("uid"))] = loc
        owners = owner_uids(obj)
        if owners:
            self._owners[loc] = owners
            for uid in owners:
                self._dependents.setdefault(uid, set()).add(loc)

    def start(self) -> list[str]:
        """Index the store; returns the owners to collect now (gone, or waiting)."""
        waiting: list[str] = []
        for rt in self._storage_types():
            for obj in self.w.store.items(rt.key):
                meta = obj["metadata"]
                self._index((rt.key, meta.get("namespace", ""), meta["name"]), obj)
                if _waiting(obj):
                    waiting.append(str(meta["uid"]))
        gone = sorted(uid for uid in self._dependents if uid not in self._where)
        return gone + waiting

    def observe(self, ev: Event) -> list[str]:
        """Keep the index; returns the owners whose dependents this event concerns."""
        loc = (ev.key, ev.namespace, ev.name)
        uid = str(ev.obj["metadata"].get("uid"))
        if ev.type is EventType.DELETED:
            self._index(loc, None)
            if self._where.get(uid) == loc:
                del self._where[uid]
            keys = [u for u in owner_uids(ev.obj) if u in self._dependents or
                    u in self._where]
            return keys + ([uid] if uid in self._dependents else [])
        self._index(loc, ev.obj)
        # An owner that is nowhere (never was, or went before this reference was
        # written): its dependents are collected, as kube does for a dangling reference.
        dangling = [u for u in owner_uids(ev.obj) if u not in self._where]
        return dangling + ([uid] if _waiting(ev.obj) else [])

    def _get(self, loc: Location) -> tuple[ResourceType, dict[str, Any]] | None:
        rt = self.catalog.storage_type(loc[0])
        obj = self.w.store.get(*loc)
        return (rt, obj) if rt is not None and obj is not None else None

    # -- reconcile -----------------------------------------------------------------------

    async def reconcile(self, uid: str) -> None:
        dependents = [found for loc in sorted(self._dependents.get(uid, ()))
                      if (found := self._get(loc)) is not None]
        where = self._where.get(uid)
        owner = self._get(where) if where is not None else None
        if owner is not None and owner[1]["metadata"].get("uid") != uid:
            owner = None
        if owner is None:
            for rt, obj in dependents:
                if any(u in self._where for u in owner_uids(obj) if u != uid):
                    await self._drop_reference(rt, obj, uid)
                elif not obj["metadata"].get("deletionTimestamp"):
                    await self._delete(rt, obj, "Background")
            return
        rt, obj = owner
        finalizers = obj["metadata"].get("finalizers") or []
        if not obj["metadata"].get("deletionTimestamp"):
            return
        if ORPHAN in finalizers:
            for drt, dep in dependents:
                await self._drop_reference(drt, dep, uid)
            await self._remove_finalizer(rt, obj, ORPHAN)
        elif FOREGROUND in finalizers:
            for drt, dep in dependents:
                if not dep["metadata"].get("deletionTimestamp"):
                    await self._delete(drt, dep, "Foreground")
            if not dependents:
                await self._remove_finalizer(rt, obj, FOREGROUND)

    async def _delete(self, rt: ResourceType, obj: Mapping[str, Any], policy: str) -> None:
        meta = obj["metadata"]
        await self.w.delete(rt, meta.get("namespace", ""), meta["name"],
                            {"propagationPolicy": policy,
                             "preconditions": {"uid": meta["uid"]}})

    async def _drop_reference(self, rt: ResourceType, obj: Mapping[str, Any], uid: str) -> None:
        def drop(body: dict[str, Any]) -> None:
            refs = [r for r in body["metadata"].get("ownerReferences") or []
                    if r.get("uid") != uid]
            if refs:
                body["metadata"]["ownerReferences"] = refs
            else:
                body["metadata"].pop("ownerReferences", None)

        await self.w.update(rt, obj, drop)

    async def _remove_finalizer(self, rt: ResourceType, obj: Mapping[str, Any],
                                finalizer: str) -> None:
        def drop(body: dict[str, Any]) -> None:
            body["metadata"]["finalizers"] = [
                f for f in body["metadata"].get("finalizers") or [] if f != finalizer]

        await self.w.update(rt, obj, drop)
