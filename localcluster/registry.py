"""The object lifecycle: what create, update, patch and delete do to an object
before it is committed, the same for HTTP requests and in-process controllers.

Each write reads the committed state, checks preconditions (resourceVersion,
uid, immutable fields), validates, applies the kind's admission rules (ClusterIP
allocation, defaults, ServiceAccount token Secrets, CRD establishment) and
commits in one transaction under the store's lock, so a rejected request never
leaves a half-written object.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime as dt
import json
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from localcluster import crd, managedfields, patch, podgrace, schema, webhookconfig
from localcluster.admission import Admission
from localcluster.auth import User
from localcluster.catalog import Catalog
from localcluster.errors import ApiError, Cause
from localcluster.eventsv1 import conversion_for
from localcluster.resources import ResourceType
from localcluster.selectors import FieldSelector, LabelSelector
from localcluster.store import EventType, Store, Write
from localcluster.strategy import tracks_generation
from localcluster.timestamps import normalize_times
from localcluster.validate import validate_object, validate_update
from localcluster.webhooks import Attributes, Webhooks, options_for
from localcluster.workloads.propagation import propagation_policy, with_propagation

T = TypeVar("T")
ADMISSION_ATTEMPTS = 3
NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
CRD_KEY = ("apiextensions.k8s.io", "customresourcedefinitions")
NAMESPACE_KEY = ("", "namespaces")
TERMINATING_CAUSE = "NamespaceTerminating"
CREATE_ON_UPDATE = {("", "endpoints"), ("coordination.k8s.io", "leases")}


class ObjectChanged(ApiError):
    """Another write changed the object while admission webhooks ran (a 409 Conflict);
    kube retries such updates and patches on the new object, and so does `Registry`."""


async def _reacquire(lock: asyncio.Lock) -> None:
    """Take back a lock the caller's ``async with`` will release, even when the request is
    cancelled meanwhile (releasing a lock held by another write would break the store)."""
    cancelled = False
    while True:
        try:
            await lock.acquire()
            break
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


def now_rfc3339(clock: Callable[[], float]) -> str:
    return dt.datetime.fromtimestamp(int(clock()), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Outcome:
    """The object a write produced, and warnings to send back as ``Warning`` headers."""

    obj: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    created: bool = False


@dataclass(frozen=True)
class WriteOptions:
    dry_run: bool = False
    field_validation: str = "Warn"
    """Strict, Warn or Ignore: what to do about fields the schema does not declare."""
    field_manager: str = "kube-controller-manager"
    """Who is writing: the manager `metadata.managedFields` records for this write."""
    user: User | None = None
    """The requester admission webhooks are told of; None for the server's own writes."""


def _spec_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    skip = {"metadata", "status", "apiVersion", "kind"}
    keys = (set(old) | set(new)) - skip
    return any(old.get(k) != new.get(k) for k in keys)


class Registry:
    def __init__(
        self, store: Store, catalog: Catalog, admission: Admission, *,
        clock: Callable[[], float] = time.time, graceful_pods: bool = False,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.admission = admission
        self.clock = clock
        self.graceful_pods = graceful_pods
        """A kubelet finishes the deletes of bound Pods (localcluster.podgrace)."""
        self.webhooks = Webhooks(store, catalog, present=self.present,
                                 decode=lambda rt, body: self.decode(
                                     rt, body, WriteOptions(field_validation="Ignore"))[0])

    # -- reading -------------------------------------------------------------------

    def present(self, rt: ResourceType, obj: Mapping[str, Any]) -> dict[str, Any]:
        """The stored object as seen through ``rt``'s version (CRD versions share storage)."""
        conversion = conversion_for(rt)
        if conversion is not None:
            return conversion.from_storage(obj)
        out = dict(obj)
        out["apiVersion"] = rt.api_version
        out["kind"] = rt.kind
        return out

    def get(self, rt: ResourceType, namespace: str, name: str) -> dict[str, Any]:
        obj = self.store.get(rt.key, namespace, name)
        if obj is None:
            raise ApiError.not_found(rt.plural, name, group=rt.group)
        return self.present(rt, obj)

    def list_objects(
        self, rt: ResourceType, namespace: str | None, *, labels: LabelSelector | None = None,
        fields: FieldSelector | None = None, limit: int = 0, continue_token: str = "",
    ) -> dict[str, Any]:
        start: tuple[str, str] | None = None
        if continue_token:
            try:
                start = tuple(json.loads(base64.urlsafe_b64decode(continue_token))["start"])
            except (ValueError, KeyError, TypeError) as e:
                raise ApiError.bad_request(f"invalid continue token: {e}") from e
        items: list[dict[str, Any]] = []
        next_token = ""
        for obj in self.store.items(rt.key, namespace):
            meta = obj["metadata"]
            if start and (meta.get("namespace", ""), meta["name"]) < start:
                continue
            if labels and not labels.matches(meta.get("labels")):
                continue
            view = self.present(rt, obj)  # field selectors name the served version's fields
            if fields and not fields.matches(view):
                continue
            if limit and len(items) == limit:
                token = {"start": [meta.get("namespace", ""), meta["name"]]}
                next_token = base64.urlsafe_b64encode(json.dumps(token).encode()).decode()
                break
            items.append(view)
        list_meta: dict[str, Any] = {"resourceVersion": str(self.store.rv)}
        if next_token:
            list_meta["continue"] = next_token
        return {"apiVersion": rt.api_version, "kind": rt.list_kind, "metadata": list_meta,
                "items": items}

    # -- decoding ------------------------------------------------------------------

    def decode(
        self, rt: ResourceType, body: Any, opts: WriteOptions
    ) -> tuple[dict[str, Any], list[str]]:
        """Check a request body against the kind's schema: prune, warn or refuse."""
        if not isinstance(body, dict):
            raise ApiError.bad_request(f"{rt.kind} in version \"{rt.version}\" cannot be "
                                       f"handled as a {rt.kind}: the body is not a JSON object")
        api_version, kind = body.get("apiVersion"), body.get("kind")
        if api_version not in (None, rt.api_version) or kind not in (None, rt.kind):
            raise ApiError.bad_request(
                f"the API version in the data ({api_version}) does not match the expected API "
                f"version ({rt.api_version})" if api_version != rt.api_version else
                f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})")
        sch = schema.builtin_schema(rt.model) if rt.model else rt.schema
        warnings: list[str] = []
        if sch is None:
            return copy.deepcopy(body), warnings
        checked = schema.check(body, sch)
        if checked.unknown_fields:
            if opts.field_validation == "Strict":
                listed = ", ".join(f'unknown field "{f}"' for f in checked.unknown_fields)
                raise ApiError.bad_request(
                    f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: '
                    f"strict decoding error: {listed}")
            if opts.field_validation == "Warn":
                warnings += [f'unknown field "{f}"' for f in checked.unknown_fields]
        if checked.causes:
            name = (body.get("metadata") or {}).get("name", "")
            if rt.model:
                first = checked.causes[0]
                raise ApiError.bad_request(
                    f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: '
                    f"{first.field}: {first.message}")
            raise ApiError.invalid(rt.kind, name, list(checked.causes), group=rt.group)
        obj = copy.deepcopy(checked.obj)
        if rt.model:
            obj = normalize_times(obj, sch)
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        conversion = conversion_for(rt)
        return (conversion.to_storage(obj) if conversion else obj), warnings

    def _validate(self, rt: ResourceType, obj: Mapping[str, Any],
                  old: Mapping[str, Any] | None) -> None:
        causes = validate_object(rt.plural, obj)
        if old is not None:
            causes += validate_update(rt.plural, old, obj)
        if rt.key == CRD_KEY:
            causes += crd.validate_crd(obj)
        causes += webhookconfig.validate(rt, obj)
        if causes:
            name = (obj.get("metadata") or {}).get("name", "")
            raise ApiError.invalid(rt.kind, name, causes, group=rt.group)

    # -- writing -------------------------------------------------------------------

    async def create(self, rt: ResourceType, namespace: str, body: Any,
                     opts: WriteOptions = WriteOptions(), *, tracked: bool = False) -> Outcome:
        conversion = conversion_for(rt)
        if conversion is not None and isinstance(body, dict):
            causes = conversion.validate_create(body)
            if causes:
                name = (body.get("metadata") or {}).get("name", "")
                raise ApiError.invalid(rt.kind, name, causes, group=rt.group)
        obj, warnings = self.decode(rt, body, opts)
        applied = obj.get("metadata", {}).get("managedFields") if tracked else None
        meta = obj.setdefault("metadata", {})
        if rt.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise ApiError.bad_request("the namespace of the provided object does not match "
                                           "the namespace sent on the request")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        attrs = self._attributes(rt, "CREATE", namespace, meta.get("name", ""), opts)
        if rt.namespaced and self.webhooks.configured():
            self._check_namespace_open(namespace)  # kube's NamespaceLifecycle runs first
        mutated, hook_warnings = await self.webhooks.mutate(attrs, obj, None)
        obj, warnings = mutated or obj, warnings + hook_warnings
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(
                secrets.choice(NAME_ALPHABET) for _ in range(5))
        for k in ("resourceVersion", "uid", "deletionTimestamp", "deletionGracePeriodSeconds",
                  "selfLink", "managedFields"):
            meta.pop(k, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339(self.clock)
        if tracks_generation(rt):
            meta["generation"] = 1
        else:
            meta.pop("generation", None)
        if rt.status_subresource and rt.key != CRD_KEY:
            obj.pop("status", None)
        managedfields.record(managedfields.scope_for(rt), None, obj, applied,
                             manager=opts.field_manager, now=now_rfc3339(self.clock),
                             applied=tracked)
        self._validate(rt, obj, None)
        warnings += await self.webhooks.validate(attrs, obj, None)
        async with self.store.lock:
            name = meta["name"]
            if self.store.get(rt.key, namespace if rt.namespaced else "", name) is not None:
                raise ApiError.already_exists(rt.plural, name, group=rt.group)
            if rt.namespaced:
                self._check_namespace_open(namespace)
            writes = self.admission.on_create(rt, obj)
            writes.insert(0, Write(rt.key, meta.get("namespace", ""), name, obj, EventType.ADDED))
            if opts.dry_run:
                return Outcome(self.present(rt, obj), warnings, created=True)
            await self.store.commit(writes)
        self._after_commit(rt, obj, EventType.ADDED)
        return Outcome(self.present(rt, obj), warnings, created=True)

    async def _outside_lock(self, rt: ResourceType, ns: str, name: str, old: Mapping[str, Any],
                            admit: Callable[[], Awaitable[T]]) -> T:
        """Run `admit` (webhook calls) with the store's lock released, as kube calls webhooks
        outside its storage transaction, so a slow webhook delays no other write. The object
        must still be `old` afterwards; if another write changed it meanwhile, 409."""
        if not self.webhooks.configured():
            return await admit()
        self.store.lock.release()
        try:
            result = await admit()
        finally:
            await _reacquire(self.store.lock)
        current = self.store.get(rt.key, ns, name)
        if current is None:
            raise ApiError.not_found(rt.plural, name, group=rt.group)
        if current["metadata"]["resourceVersion"] != old["metadata"]["resourceVersion"]:
            raise ObjectChanged(409, "Conflict", f'Operation cannot be fulfilled on '
                                f'{rt.qualified_plural} "{name}": the object has been modified; '
                                "please apply your changes to the latest version and try again",
                                group=rt.group, kind=rt.plural, name=name)
        return result

    @staticmethod
    def _attributes(rt: ResourceType, operation: str, namespace: str, name: str,
                    opts: WriteOptions, subresource: str = "", *,
                    delete_options: Mapping[str, Any] | None = None) -> Attributes:
        if rt.key == NAMESPACE_KEY:
            namespace = name  # kube's request namespace for a Namespace is its own name
        return Attributes(rt, operation, namespace, name, subresource, opts.user, opts.dry_run,
                          options_for(operation, dry_run=opts.dry_run,
                                      field_manager=opts.field_manager,
                                      delete_options=delete_options))

    def _check_namespace_open(self, namespace: str) -> None:
        ns = self.store.get(NAMESPACE_KEY, "", namespace)
        if ns is None:
            raise ApiError.not_found("namespaces", namespace)
        if ns["metadata"].get("deletionTimestamp"):
            why = (f"unable to create new content in namespace {namespace} because it is being "
                   "terminated")
            err = ApiError.forbidden(why, kind="namespaces", name=namespace)
            err.causes.append(Cause("metadata.namespace", why, TERMINATING_CAUSE))
            raise err

    async def update(self, rt: ResourceType, namespace: str, name: str, body: Any,
                     opts: WriteOptions = WriteOptions(), *, subresource: str = "") -> Outcome:
        new, warnings = self.decode(rt, body, opts)
        url_name = name
        body_name = (new.get("metadata") or {}).get("name")
        if body_name not in (None, url_name):
            raise ApiError.bad_request(f"the name of the object ({body_name}) does not match the "
                                       f"name on the URL ({url_name})")
        ns = namespace if rt.namespaced else ""
        if self.store.get(rt.key, ns, name) is None and not subresource and (
            rt.key in CREATE_ON_UPDATE
        ):
            new.setdefault("metadata", {})["name"] = name
            return await self.create(rt, namespace, new, opts)
        async with self.store.lock:
            for attempt in range(ADMISSION_ATTEMPTS):
                try:
                    return await self._update_locked(rt, ns, name, copy.deepcopy(new),
                                                     list(warnings), opts, subresource)
                except ObjectChanged:
                    if attempt == ADMISSION_ATTEMPTS - 1:
                        raise
        raise AssertionError("unreachable")

    async def patch(self, rt: ResourceType, namespace: str, name: str, content_type: str,
                    body: Any, opts: WriteOptions = WriteOptions(), *,
                    subresource: str = "") -> Outcome:
        ns = namespace if rt.namespaced else ""
        async with self.store.lock:
            for attempt in range(ADMISSION_ATTEMPTS):
                try:
                    return await self._patch_locked(rt, ns, name, content_type, body, opts,
                                                    subresource)
                except ObjectChanged:  # changed while webhooks ran: patch what is there now
                    if attempt == ADMISSION_ATTEMPTS - 1:
                        raise
        raise AssertionError("unreachable")

    async def _patch_locked(self, rt: ResourceType, ns: str, name: str, content_type: str,
                            body: Any, opts: WriteOptions, subresource: str) -> Outcome:
        current = self.get(rt, ns, name)
        if content_type == "application/merge-patch+json":
            if not isinstance(body, dict):
                raise ApiError.bad_request("a merge patch must be a JSON object")
            patched = patch.json_merge_patch(current, body)
        elif content_type == "application/json-patch+json":
            patched = patch.json_patch(current, body)
        elif content_type == "application/strategic-merge-patch+json":
            if not rt.model:
                raise ApiError.unsupported_media_type(content_type)
            if not isinstance(body, dict):
                raise ApiError.bad_request("a strategic merge patch must be a JSON object")
            patched = patch.strategic_merge_patch(
                current, body, schema.builtin_schema(rt.model))
        else:
            raise ApiError.unsupported_media_type(content_type)
        new, warnings = self.decode(rt, patched, opts)
        return await self._update_locked(rt, ns, name, new, warnings, opts, subresource)

    async def _update_locked(self, rt: ResourceType, ns: str, name: str, new: dict[str, Any],
                             warnings: list[str], opts: WriteOptions,
                             subresource: str, *, tracked: bool = False) -> Outcome:
        old = self.store.get(rt.key, ns, name)
        if old is None:
            raise ApiError.not_found(rt.plural, name, group=rt.group)
        new_meta = new.setdefault("metadata", {})
        old_meta = old["metadata"]
        wanted_rv = new_meta.get("resourceVersion")
        if wanted_rv not in (None, "") and wanted_rv != old_meta["resourceVersion"]:
            raise ApiError.conflict(rt.plural, name, "the object has been modified; please apply "
                                    "your changes to the latest version and try again",
                                    group=rt.group)
        if new_meta.get("uid") not in (None, "", old_meta["uid"]):
            raise ApiError.conflict(rt.plural, name, "Precondition failed: UID in precondition: "
                                    f"{new_meta['uid']}, UID in object meta: {old_meta['uid']}",
                                    group=rt.group)
        if subresource == "status":
            merged = copy.deepcopy(old)
            merged["status"] = new.get("status")
            if merged["status"] is None:
                merged.pop("status")
        else:
            merged = new
            for k in ("uid", "creationTimestamp", "deletionTimestamp",
                      "deletionGracePeriodSeconds", "generation"):
                if k in old_meta:
                    new_meta[k] = old_meta[k]
                else:
                    new_meta.pop(k, None)
            new_meta["name"] = name
            if rt.namespaced:
                new_meta["namespace"] = ns
            else:
                new_meta.pop("namespace", None)
            if rt.status_subresource and "status" in old:
                merged["status"] = copy.deepcopy(old["status"])
            elif rt.status_subresource:
                merged.pop("status", None)
            if tracks_generation(rt) and _spec_changed(old, merged):
                new_meta["generation"] = int(old_meta.get("generation", 1)) + 1
        merged["apiVersion"], merged["kind"] = old.get("apiVersion", rt.api_version), rt.kind
        merged["metadata"]["resourceVersion"] = old_meta["resourceVersion"]
        self.admission.on_update(rt, old, merged)
        attrs = self._attributes(rt, "UPDATE", ns, name, opts, subresource)
        sent_managed = new_meta.get("managedFields")

        async def admit() -> tuple[dict[str, Any], list[str]]:
            mutated, hook_warnings = await self.webhooks.mutate(attrs, merged, old)
            admitted = mutated or merged
            managedfields.record(managedfields.scope_for(rt, subresource), old, admitted,
                                 sent_managed, manager=opts.field_manager,
                                 now=now_rfc3339(self.clock), applied=tracked)
            self._validate(rt, admitted, old)
            return admitted, hook_warnings + await self.webhooks.validate(attrs, admitted, old)

        merged, hook_warnings = await self._outside_lock(rt, ns, name, old, admit)
        warnings = warnings + hook_warnings
        if merged["metadata"].get("deletionTimestamp") and not merged["metadata"].get(
                "finalizers") and not merged["metadata"].get("deletionGracePeriodSeconds"):
            writes = [Write(rt.key, ns, name, None, EventType.DELETED)]
            writes += self.admission.on_delete(rt, merged)
            if not opts.dry_run:
                await self.store.commit(writes)
                self._after_commit(rt, merged, EventType.DELETED)
            return Outcome(self.present(rt, merged), warnings)
        if merged == old:
            return Outcome(self.present(rt, old), warnings)
        if opts.dry_run:
            return Outcome(self.present(rt, merged), warnings)
        await self.store.commit([Write(rt.key, ns, name, merged, EventType.MODIFIED)])
        self._after_commit(rt, merged, EventType.MODIFIED)
        return Outcome(self.present(rt, merged), warnings)

    async def apply(self, rt: ResourceType, namespace: str, name: str, body: Any,
                    opts: WriteOptions, *, force: bool, subresource: str = "") -> Outcome:
        """Server-side apply of `body` for `opts.field_manager`; creates a missing object."""
        config, warnings = self.decode(rt, body, opts)
        if not isinstance(body, dict) or not body.get("apiVersion") or not body.get("kind"):
            raise ApiError.bad_request("apiVersion and kind must be set in an apply patch")
        meta = config.setdefault("metadata", {})
        if meta.get("managedFields") is not None:
            raise ApiError.bad_request("metadata.managedFields must be nil")
        if meta.get("name") not in (None, "", name):
            raise ApiError.bad_request(f"the name of the object ({meta['name']}) does not "
                                       f"match the name on the URL ({name})")
        ns = namespace if rt.namespaced else ""
        scope = managedfields.scope_for(rt, subresource)
        config = {**config, "metadata": {**meta, "name": name}}
        for attempt in range(2):
            async with self.store.lock:
                live = self.store.get(rt.key, ns, name)
                if live is None and subresource:
                    raise ApiError.not_found(rt.plural, name, group=rt.group)
                current = managedfields.Managers.decode(
                    (live or {}).get("metadata", {}).get("managedFields"))
                applied = managedfields.apply(scope, live, config, current, opts.field_manager,
                                              force=force, now=now_rfc3339(self.clock),
                                              sent=body)
                new = applied.obj
                new["metadata"]["managedFields"] = applied.managers.encode()
                if live is not None:
                    try:
                        return await self._update_locked(rt, ns, name, new, list(warnings),
                                                         opts, subresource, tracked=True)
                    except ObjectChanged:
                        if attempt:
                            raise
                        continue  # changed while webhooks ran: apply to what is there now
            try:
                created = await self.create(rt, namespace, new, opts, tracked=True)
            except ApiError as e:
                if e.reason != "AlreadyExists" or attempt:
                    raise
                continue  # created meanwhile: apply to what is there now, as kube retries
            created.warnings[:0] = warnings
            return created
        raise AssertionError("unreachable")

    async def delete(self, rt: ResourceType, namespace: str, name: str,
                     options: Mapping[str, Any] | None = None,
                     opts: WriteOptions = WriteOptions()) -> dict[str, Any]:
        ns = namespace if rt.namespaced else ""
        async with self.store.lock:
            old = self.store.get(rt.key, ns, name)
            if old is None:
                raise ApiError.not_found(rt.plural, name, group=rt.group)
            pre = (options or {}).get("preconditions") or {}
            meta = old["metadata"]
            if pre.get("uid") and pre["uid"] != meta["uid"]:
                raise ApiError.conflict(rt.plural, name, "Precondition failed: UID in "
                                        f"precondition: {pre['uid']}, UID in object meta: "
                                        f"{meta['uid']}", group=rt.group)
            if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
                raise ApiError.conflict(rt.plural, name, "Precondition failed: "
                                        "ResourceVersion in precondition: "
                                        f"{pre['resourceVersion']}, ResourceVersion in object "
                                        f"meta: {meta['resourceVersion']}", group=rt.group)
            attrs = self._attributes(rt, "DELETE", ns, name, opts, delete_options=options)

            async def admit() -> None:
                await self.webhooks.mutate(attrs, None, old)
                await self.webhooks.validate(attrs, None, old)

            await self._outside_lock(rt, ns, name, old, admit)
            old = with_propagation(old, propagation_policy(options)) or old
            meta = old["metadata"]
            if self.graceful_pods and rt.key == podgrace.PODS_KEY:
                period = podgrace.grace_period(old, options or {})
                if period > 0:
                    marked = copy.deepcopy(old)
                    if podgrace.mark(marked, period, self.clock()) and not opts.dry_run:
                        await self.store.commit([Write(rt.key, ns, name, marked,
                                                       EventType.MODIFIED)])
                    return self.present(rt, marked)
            if meta.get("finalizers") or rt.key == NAMESPACE_KEY:
                if meta.get("deletionTimestamp"):
                    return self.present(rt, old)
                marked = copy.deepcopy(old)
                marked["metadata"]["deletionTimestamp"] = now_rfc3339(self.clock)
                marked["metadata"]["deletionGracePeriodSeconds"] = 0
                self.admission.on_terminate(rt, marked)
                if not opts.dry_run:
                    await self.store.commit([Write(rt.key, ns, name, marked, EventType.MODIFIED)])
                    self._after_commit(rt, marked, EventType.MODIFIED)
                return self.present(rt, marked)
            writes = [Write(rt.key, ns, name, None, EventType.DELETED)]
            writes += self.admission.on_delete(rt, old)
            if opts.dry_run:
                return self.present(rt, old)
            events = await self.store.commit(writes)
        self._after_commit(rt, old, EventType.DELETED)
        return self.present(rt, events[0].obj)

    async def delete_collection(self, rt: ResourceType, namespace: str | None, *,
                                labels: LabelSelector | None = None,
                                fields: FieldSelector | None = None,
                                opts: WriteOptions = WriteOptions()) -> dict[str, Any]:
        listed = self.list_objects(rt, namespace, labels=labels, fields=fields)
        deleted = []
        for obj in listed["items"]:
            meta = obj["metadata"]
            try:
                deleted.append(await self.delete(rt, meta.get("namespace", ""), meta["name"],
                                                 opts=opts))
            except ApiError as e:
                if e.code != 404:
                    raise
        listed["items"] = deleted
        return listed

    def _after_commit(self, rt: ResourceType, obj: Mapping[str, Any], typ: EventType) -> None:
        """Serve or stop serving a CRD's types as soon as its write is acknowledged."""
        if rt.key != CRD_KEY:
            return
        if typ is EventType.DELETED or obj["metadata"].get("deletionTimestamp"):
            self.catalog.remove_crd(obj["metadata"]["name"])
        else:
            self.catalog.set_crd(obj)

