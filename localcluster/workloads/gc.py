"""Garbage collection by ownerReferences, as kube's garbage collector does it:

- an object whose owners are all gone is deleted (background propagation);
  one that still has a live owner only loses the reference to the dead one;
- an owner deleted with ``propagationPolicy=Orphan`` carries the ``orphan``
  finalizer: its dependents lose their reference to it, then it goes;
- an owner deleted with ``propagationPolicy=Foreground`` carries the
  ``foregroundDeletion`` finalizer: its dependents are deleted (in the
  foreground too), and it goes once none is left.

The work key is an owner's uid; the reconcile reads the store, so it converges
whatever events it missed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from localcluster.catalog import Catalog
from localcluster.resources import ResourceType
from localcluster.store import Event, EventType
from localcluster.workloads.common import Writer
from localcluster.workloads.propagation import FOREGROUND, ORPHAN


def owner_uids(obj: Mapping[str, Any] | None) -> list[str]:
    if obj is None:
        return []
    return [str(r.get("uid")) for r in obj["metadata"].get("ownerReferences") or []
            if r.get("uid")]


class GarbageCollector:
    def __init__(self, writer: Writer, catalog: Catalog) -> None:
        self.w = writer
        self.catalog = catalog

    def _types(self) -> Iterator[ResourceType]:
        seen: set[tuple[str, str]] = set()
        for rt in self.catalog.all():
            if rt.persisted and rt.key not in seen:
                seen.add(rt.key)
                yield self.catalog.storage_type(rt.key) or rt

    def _objects(self) -> Iterator[tuple[ResourceType, dict[str, Any]]]:
        for rt in self._types():
            for obj in self.w.store.items(rt.key):
                yield rt, obj

    def keys_for(self, ev: Event) -> list[str]:
        """Owners whose dependents may need work after this event."""
        keys = owner_uids(ev.obj) if ev.type is EventType.DELETED else []
        meta = ev.obj["metadata"]
        if ev.type is EventType.DELETED or (
                meta.get("deletionTimestamp")
                and {ORPHAN, FOREGROUND} & set(meta.get("finalizers") or [])):
            keys.append(str(meta.get("uid")))
        return keys

    def startup_keys(self) -> list[str]:
        """Owners that are gone or waiting on dependents: collected at start."""
        live: set[str] = set()
        referenced: set[str] = set()
        waiting: list[str] = []
        for _, obj in self._objects():
            meta = obj["metadata"]
            live.add(str(meta.get("uid")))
            referenced.update(owner_uids(obj))
            if meta.get("deletionTimestamp") and {ORPHAN, FOREGROUND} & set(
                    meta.get("finalizers") or []):
                waiting.append(str(meta["uid"]))
        return sorted(referenced - live) + waiting

    async def reconcile(self, uid: str) -> None:
        owner: tuple[ResourceType, dict[str, Any]] | None = None
        dependents: list[tuple[ResourceType, dict[str, Any]]] = []
        live: set[str] = set()
        for rt, obj in self._objects():
            live.add(str(obj["metadata"].get("uid")))
            if obj["metadata"].get("uid") == uid:
                owner = (rt, obj)
            if uid in owner_uids(obj):
                dependents.append((rt, obj))
        if owner is None:
            for rt, obj in dependents:
                if any(u in live for u in owner_uids(obj) if u != uid):
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

