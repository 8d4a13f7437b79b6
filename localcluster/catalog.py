"""Which resource types the server serves right now: the built-ins plus every
established CustomResourceDefinition, indexed the ways requests look them up."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from localcluster import crd
from localcluster.resources import BUILTIN, ResourceType


class Catalog:
    def __init__(self) -> None:
        self._by_path: dict[tuple[str, str, str], ResourceType] = {}
        self._crd_types: dict[str, list[ResourceType]] = {}
        for rt in BUILTIN:
            self._by_path[(rt.group, rt.version, rt.plural)] = rt

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._by_path.get((group, version, plural))

    def all(self) -> list[ResourceType]:
        return list(self._by_path.values())

    def group_versions(self) -> dict[str, list[ResourceType]]:
        """group/version -> types, in a stable order (core first, then by group name)."""
        out: dict[str, list[ResourceType]] = {}
        for rt in sorted(self._by_path.values(), key=lambda r: (r.group != "", r.group)):
            out.setdefault(rt.group_version, []).append(rt)
        return out

    def groups(self) -> dict[str, list[str]]:
        """Non-core group -> its served versions, preferred (storage or first) first."""
        out: dict[str, list[str]] = {}
        for rt in self._by_path.values():
            if rt.group and rt.version not in out.setdefault(rt.group, []):
                out[rt.group].append(rt.version)
        return out

    def storage_type(self, key: tuple[str, str]) -> ResourceType | None:
        """The type whose version objects of ``key`` are stored in."""
        candidates = [rt for rt in self._by_path.values() if rt.key == key]
        for rt in candidates:
            if rt.extra.get("storage"):
                return rt
        return candidates[0] if candidates else None

    def conflicts(self, crd_obj: Mapping[str, Any]) -> str:
        """Why this CRD's names cannot be served, or '' when they can."""
        name = crd_obj["metadata"]["name"]
        for rt in crd.resource_types(crd_obj):
            existing = self._by_path.get((rt.group, rt.version, rt.plural))
            if existing is not None and existing.crd_name != name:
                return f'"{rt.plural}" is already in use'
        return ""

    def set_crd(self, crd_obj: Mapping[str, Any]) -> list[ResourceType]:
        name = crd_obj["metadata"]["name"]
        self.remove_crd(name)
        storage = crd.storage_version(crd_obj)
        types = []
        for rt in crd.resource_types(crd_obj):
            rt.extra["storage"] = rt.version == storage
            self._by_path[(rt.group, rt.version, rt.plural)] = rt
            types.append(rt)
        self._crd_types[name] = types
        return types

    def remove_crd(self, name: str) -> list[ResourceType]:
        types = self._crd_types.pop(name, [])
        for rt in types:
            self._by_path.pop((rt.group, rt.version, rt.plural), None)
        return types

    def load(self, crds: Iterable[Mapping[str, Any]]) -> None:
        for c in crds:
            if not c["metadata"].get("deletionTimestamp"):
                self.set_crd(c)
