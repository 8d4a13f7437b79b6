"""Server-side apply and ``metadata.managedFields``, as kube-apiserver's field manager
(k8s.io/apiserver/pkg/endpoints/handlers/fieldmanager) does them.

`Managers` holds an object's managed fields decoded: for each manager (a name,
an operation ``Apply`` or ``Update``, the apiVersion of Update entries and a
subresource) the set of field paths it owns. Two operations change them:

* `apply` — a configuration merged into the live object; fields another
  manager owns with another value are conflicts (409, or taken over with
  ``force``), and fields the applier owned but no longer applies are removed
  from the object unless someone else owns them;
* `update` — any other write: the writer takes the fields it added or changed,
  and every manager loses the fields that were removed.

Pure: objects come in as JSON values, the clock's reading as a string.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from localcluster import fieldpath, schema
from localcluster.errors import ApiError, Cause
from localcluster.fieldpath import Path, fld
from localcluster.resources import ResourceType

APPLY, UPDATE = "Apply", "Update"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
KUBECTL = "kubectl"
BEFORE_FIRST_APPLY = "before-first-apply"
ANCIENT_CHANGES = "ancient-changes"
MAX_UPDATE_MANAGERS = 10
MAX_MANAGER_LENGTH = 128

# Fields never owned by anyone (kube's stripMetaManager).
_STRIPPED: frozenset[Path] = frozenset({
    (fld("apiVersion"),), (fld("kind"),), (fld("metadata"),),
    *((fld("metadata"), fld(name)) for name in (
        "name", "namespace", "creationTimestamp", "selfLink", "uid", "clusterName",
        "generation", "managedFields", "resourceVersion")),
})


@dataclass(frozen=True)
class ManagerKey:
    manager: str
    operation: str
    api_version: str = ""
    """Only part of the identity of Update entries: an applier is one manager at any version."""
    subresource: str = ""

    def describe(self) -> str:
        """As kube prints a manager in a conflict: ``"kubectl-edit" using v1``."""
        text = json.dumps(self.manager)
        if self.subresource:
            text += f" with subresource {json.dumps(self.subresource)}"
        if self.operation == UPDATE:
            text += f" using {self.api_version}"
        return text


@dataclass
class Entry:
    paths: set[Path]
    api_version: str
    time: str = ""


@dataclass
class Managers:
    entries: dict[ManagerKey, Entry] = field(default_factory=dict)

    @classmethod
    def decode(cls, raw: Any) -> Managers:
        """From ``metadata.managedFields``; ValueError for entries kube would not accept."""
        out = cls()
        if raw is None:
            return out
        if not isinstance(raw, list):
            raise ValueError("managedFields must be a list")
        for item in raw:
            if not isinstance(item, Mapping) or item.get("operation") not in (APPLY, UPDATE):
                raise ValueError("a managedFields entry needs an operation Apply or Update")
            if item.get("fieldsType", "FieldsV1") != "FieldsV1":
                raise ValueError(f"unknown fieldsType {item.get('fieldsType')!r}")
            op = item["operation"]
            key = ManagerKey(str(item.get("manager", "")), op,
                             str(item.get("apiVersion", "")) if op == UPDATE else "",
                             str(item.get("subresource", "")))
            out.entries[key] = Entry(fieldpath.decode(item.get("fieldsV1") or {}),
                                     str(item.get("apiVersion", "")), str(item.get("time", "")))
        return out

    def encode(self) -> list[dict[str, Any]]:
        """kube's order: Apply before Update, then by time, manager, apiVersion."""
        items = []
        for key, entry in self.entries.items():
            if not entry.paths:
                continue
            item: dict[str, Any] = {"manager": key.manager, "operation": key.operation,
                                    "apiVersion": entry.api_version}
            if entry.time:
                item["time"] = entry.time
            item["fieldsType"] = "FieldsV1"
            item["fieldsV1"] = fieldpath.encode(entry.paths)
            if key.subresource:
                item["subresource"] = key.subresource
            items.append(item)
        items.sort(key=lambda i: (i["operation"], i.get("time", ""), i["manager"],
                                  i["apiVersion"], i.get("subresource", "")))
        return items

    def copy(self) -> Managers:
        return Managers({k: Entry(set(e.paths), e.api_version, e.time)
                         for k, e in self.entries.items()})


def object_schema(kind_schema: Mapping[str, Any] | None) -> dict[str, Any]:
    """A kind's schema with kube's ObjectMeta as `metadata`, as the field manager sees it
    (a custom resource's schema rarely says more of metadata than `type: object`)."""
    root = dict(kind_schema or {"type": "object", "x-kubernetes-preserve-unknown-fields": True})
    properties = dict(root.get("properties") or {})
    properties["metadata"] = schema.builtin_schema("V1ObjectMeta")
    root["properties"] = properties
    root.setdefault("type", "object")
    return root


@dataclass(frozen=True)
class Scope:
    """What a request may own: the whole object but `status` for the main resource of a
    kind with a status subresource, only `status` for that subresource."""

    schema: Mapping[str, Any] | None
    api_version: str
    subresource: str = ""
    status_subresource: bool = False

    def ignored(self, path: Path) -> bool:
        if path in _STRIPPED:
            return True
        if not self.status_subresource or not path:
            return False
        in_status = path[0] == fld("status")
        return not in_status if self.subresource == "status" else in_status

    def keep(self, paths: set[Path]) -> set[Path]:
        return {p for p in paths if not self.ignored(p)}


def scope_for(rt: ResourceType, subresource: str = "") -> Scope:
    sch = schema.builtin_schema(rt.model) if rt.model else rt.schema
    return Scope(object_schema(sch), rt.api_version, subresource, rt.status_subresource)


# ---------------------------------------------------------------- update


def record(scope: Scope, live: Mapping[str, Any] | None, new: dict[str, Any], sent: Any, *,
           manager: str, now: str, applied: bool = False) -> None:
    """Set ``metadata.managedFields`` of `new`, written over `live` (None: created).

    `sent` is what the request said of managedFields: kube takes them as the request
    gives them when they are valid (how kubectl rewrites them when it moves an object
    to server-side apply), and the live object's otherwise; `applied` says that `sent`
    is what `apply` computed. An object written while nobody tracked its fields stays
    untracked until it is applied to, as in kube.
    """
    meta = new.setdefault("metadata", {})
    current = (live or {}).get("metadata", {}).get("managedFields")
    if not applied and sent == [{}]:
        meta.pop("managedFields", None)  # kube's way to reset them: one empty entry
        return
    if applied:
        managers = Managers.decode(sent)
    else:
        try:
            managers = Managers.decode(sent if sent and not scope.subresource else current)
        except ValueError:
            managers = Managers.decode(current)
        if live is not None and not managers.entries:
            meta.pop("managedFields", None)
            return
        managers = update(scope, live, new, managers, manager, now)
    encoded = cap_updaters(managers).encode()
    if encoded:
        meta["managedFields"] = encoded
    else:
        meta.pop("managedFields", None)


def update(scope: Scope, live: Mapping[str, Any] | None, new: Mapping[str, Any],
           managers: Managers, manager: str, now: str) -> Managers:
    """The managers after a create (`live` None), update or patch written by `manager`."""
    out = managers.copy()
    before = live if live is not None else {"metadata": {}}
    try:
        diff = fieldpath.compare(_plain(before), _plain(new), scope.schema)
    except fieldpath.FieldPathError:
        return out  # an object field paths cannot describe keeps the managers it had
    changed = scope.keep(diff.added | diff.modified)
    removed = diff.removed
    key = ManagerKey(manager, UPDATE, scope.api_version, scope.subresource)
    for other, entry in out.entries.items():
        entry.paths -= removed
        if other != key:
            entry.paths -= changed
    if changed:
        entry = out.entries.get(key) or Entry(set(), scope.api_version)
        entry.paths |= changed
        entry.time = now
        out.entries[key] = entry
    out.entries = {k: e for k, e in out.entries.items() if e.paths}
    return out


def _plain(obj: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(obj)
    meta = dict(out.get("metadata") or {})
    meta.pop("managedFields", None)
    out["metadata"] = meta
    return out


def cap_updaters(managers: Managers, limit: int = MAX_UPDATE_MANAGERS) -> Managers:
    """kube keeps at most `limit` Update entries: the oldest are merged, per apiVersion,
    into one ``ancient-changes`` entry."""
    updaters = [k for k in managers.entries if k.operation == UPDATE]
    count = len(updaters)
    if count <= limit:
        return managers
    updaters.sort(key=lambda k: managers.entries[k].time)
    out = managers.copy()
    first_of_version: dict[str, ManagerKey] = {}
    for key in updaters:
        if count <= limit:
            break
        entry = out.entries[key]
        bucket = ManagerKey(ANCIENT_CHANGES, UPDATE, entry.api_version)
        first = first_of_version.setdefault(entry.api_version, key)
        if first == key:
            continue
        if bucket not in out.entries:
            out.entries[bucket] = out.entries.pop(first)
        merged = out.entries[bucket]
        merged.paths |= entry.paths
        merged.time = entry.time
        del out.entries[key]
        count -= 1
    return out


# ---------------------------------------------------------------- apply


@dataclass(frozen=True)
class Conflict:
    manager: ManagerKey
    path: Path


@dataclass
class Applied:
    obj: dict[str, Any]
    managers: Managers


def apply(scope: Scope, live: Mapping[str, Any] | None, config: Mapping[str, Any],
          managers: Managers, manager: str, *, force: bool, now: str,
          sent: Mapping[str, Any] | None = None) -> Applied:
    """Apply `config` for `manager` to `live` (None: the object does not exist yet).

    `config` is the configuration as decoded (pruned, defaulted); `sent`, when given,
    what the request said: the applier owns only the fields it sent itself.

    Raises the 409 kube answers for conflicts unless `force`; the `kubectl` manager
    may take over fields whose live values are still those of its client-side
    ``last-applied-configuration``, as kube lets it when upgrading to server-side apply.
    """
    if live is not None and not managers.entries:
        # An object written before anything tracked its fields: one manager owns them all.
        managers = update(scope, None, live, managers, BEFORE_FIRST_APPLY, now)
    try:
        return _apply(scope, live, config, managers, manager, force=force, now=now, sent=sent)
    except _Conflicts as e:
        conflicts = e.conflicts
        if manager == KUBECTL and live is not None:
            allowed = _allowed_by_last_applied(scope, live)
            conflicts = [c for c in conflicts if c.path not in allowed]
            if not conflicts:
                return _apply(scope, live, config, managers, manager, force=True, now=now,
                              sent=sent)
        raise conflict_error(conflicts) from None


class _Conflicts(Exception):
    def __init__(self, conflicts: list[Conflict]) -> None:
        super().__init__("conflicts")
        self.conflicts = conflicts


def _apply(scope: Scope, live: Mapping[str, Any] | None, config: Mapping[str, Any],
           managers: Managers, manager: str, *, force: bool, now: str,
           sent: Mapping[str, Any] | None) -> Applied:
    try:
        return _merge_config(scope, live, config, managers, manager, force=force, now=now,
                             sent=sent)
    except fieldpath.FieldPathError as e:
        group_version = scope.api_version if "/" in scope.api_version \
            else f"/{scope.api_version}"
        raise ApiError(500, "InternalError", "Internal error occurred: failed to create typed "
                       f"patch object ({group_version}, Kind={config.get('kind', '')}): {e}") \
            from None


def _merge_config(scope: Scope, live: Mapping[str, Any] | None, config: Mapping[str, Any],
                  managers: Managers, manager: str, *, force: bool, now: str,
                  sent: Mapping[str, Any] | None) -> Applied:
    base = _plain(live) if live is not None else {"metadata": {}}
    applied = _plain(config)
    merged = fieldpath.merge(base, applied, scope.schema)
    paths = scope.keep(fieldpath.field_set(applied, scope.schema))
    if sent is not None:
        paths &= fieldpath.field_set(_plain(sent), scope.schema)
    key = ManagerKey(manager, APPLY, "", scope.subresource)
    previous = managers.entries.get(key)
    out = managers.copy()
    out.entries[key] = Entry(paths, scope.api_version, previous.time if previous else "")
    if previous is not None:
        merged = _prune(scope, merged, previous.paths, out)
    diff = fieldpath.compare(base, merged, scope.schema)
    changed = scope.keep(diff.added | diff.modified)
    conflicts = [Conflict(other, p) for other, entry in out.entries.items() if other != key
                 for p in fieldpath.sorted_paths(entry.paths & changed)]
    if conflicts and not force:
        raise _Conflicts(conflicts)
    for other, entry in out.entries.items():
        if other != key:
            entry.paths -= changed | diff.removed
    out.entries = {k: e for k, e in out.entries.items() if e.paths}
    if (merged != base or previous is None) and key in out.entries:
        out.entries[key].time = now
    if manager == KUBECTL and live is not None and LAST_APPLIED in (
            (live.get("metadata") or {}).get("annotations") or {}):
        merged = _with_last_applied(merged, sent if sent is not None else config)
    return Applied(merged, cap_updaters(out))


def _prune(scope: Scope, merged: dict[str, Any], last: set[Path], managers: Managers
           ) -> dict[str, Any]:
    """Remove what the applier set last time, no longer applies, and nobody else owns."""
    owned: set[Path] = set().union(*(e.paths for e in managers.entries.values()))
    owned |= fieldpath.struct_prefixes(merged, scope.schema, owned)
    last_all = last | fieldpath.struct_prefixes(merged, scope.schema, last)
    gone = {p for p in last_all - owned if not scope.ignored(p)}
    result: dict[str, Any] = fieldpath.remove(merged, gone, scope.schema)
    return result


def _allowed_by_last_applied(scope: Scope, live: Mapping[str, Any]) -> set[Path]:
    """The fields of the last client-side apply whose live values it still set."""
    text = ((live.get("metadata") or {}).get("annotations") or {}).get(LAST_APPLIED)
    try:
        last = json.loads(text) if text else None
        if not isinstance(last, dict):
            return set()
        paths = fieldpath.field_set(last, scope.schema)
        diff = fieldpath.compare(last, _plain(live), scope.schema)
    except (ValueError, fieldpath.FieldPathError):
        return set()
    return paths - diff.modified - diff.added - diff.removed


def _with_last_applied(obj: dict[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """kubectl's annotation follows what kubectl applied server-side, so that a later
    client-side apply computes its patch from it."""
    applied = copy.deepcopy(dict(config))
    annotations = (applied.get("metadata") or {}).get("annotations")
    if isinstance(annotations, dict):
        annotations.pop(LAST_APPLIED, None)
    out = copy.deepcopy(obj)
    meta = out.setdefault("metadata", {})
    meta.setdefault("annotations", {})[LAST_APPLIED] = json.dumps(
        applied, separators=(",", ":"), sort_keys=True)
    return out


def conflict_error(conflicts: list[Conflict]) -> ApiError:
    """kube's 409 for apply conflicts, one cause per conflicting field."""
    causes = [Cause(field=fieldpath.path_text(c.path),
                    message=f"conflict with {c.manager.describe()}",
                    reason="FieldManagerConflict") for c in conflicts]
    if len(conflicts) == 1:
        c = conflicts[0]
        message = (f"Apply failed with 1 conflict: conflict with {c.manager.describe()}: "
                   f"{fieldpath.path_text(c.path)}")
    else:
        by_manager: dict[str, list[str]] = {}
        for c in conflicts:
            by_manager.setdefault(c.manager.describe(), []).append(fieldpath.path_text(c.path))
        lines = []
        for described in sorted(by_manager):
            lines.append(f"conflicts with {described}:")
            lines += [f"- {p}" for p in by_manager[described]]
        message = f"Apply failed with {len(conflicts)} conflicts: " + "\n".join(lines)
    return ApiError(409, "Conflict", message, causes=causes)


def default_manager(user_agent: str) -> str:
    """kube's default fieldManager: the User-Agent up to its first ``/``."""
    return user_agent.split("/", 1)[0][:MAX_MANAGER_LENGTH]


def check_manager(manager: str) -> None:
    """kube's ValidateFieldManager: at most 128 printable characters."""
    if len(manager) > MAX_MANAGER_LENGTH:
        raise options_error("fieldManager", "Invalid value", f"{json.dumps(manager)}: must be "
                            "less than or equal to 128 characters")
    if not manager.isprintable():
        raise options_error("fieldManager", "Invalid value", f"{json.dumps(manager)}: must "
                            "only contain printable characters")


def apply_options(field_manager: str, force: str | None) -> bool:
    """The `force` of an apply request; kube requires apply requests to name their manager."""
    if not field_manager:
        raise options_error("fieldManager", "Required value", "is required for apply patch")
    if force in (None, ""):
        return False
    if force not in _TRUE | _FALSE:
        raise ApiError.bad_request(f'strconv.ParseBool: parsing "{force}": invalid syntax')
    return force in _TRUE


# What Go's strconv.ParseBool accepts, as kube decodes query parameters.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def options_error(name: str, kind: str, detail: str) -> ApiError:
    """422 naming a PatchOptions field, as kube answers invalid patch options."""
    reason = {"Required value": "FieldValueRequired", "Forbidden": "FieldValueForbidden"}.get(
        kind, "FieldValueInvalid")
    return ApiError.invalid("PatchOptions", "", [Cause(name, f"{kind}: {detail}", reason)],
                            group="meta.k8s.io")
