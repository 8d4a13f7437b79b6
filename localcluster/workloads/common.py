"""What the workload controllers share: ownership, pod readiness, template
hashes, conditions, and writes through the registry whose conflicts ask for a
retry (the controller then recomputes from what is stored)."""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from localcluster.errors import ApiError
from localcluster.registry import NAME_ALPHABET, Registry, now_rfc3339
from localcluster.resources import BUILTIN, ResourceType
from localcluster.selectors import LabelSelector
from mesh.workqueue import PermanentError, TemporaryError

TYPES = {(rt.group, rt.plural): rt for rt in BUILTIN}
PODS = TYPES[("", "pods")]
NODES = TYPES[("", "nodes")]
DEPLOYMENTS = TYPES[("apps", "deployments")]
REPLICASETS = TYPES[("apps", "replicasets")]
DAEMONSETS = TYPES[("apps", "daemonsets")]
STATEFULSETS = TYPES[("apps", "statefulsets")]
JOBS = TYPES[("batch", "jobs")]


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def owner_reference(rt: ResourceType, owner: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": rt.api_version, "kind": rt.kind, "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def owned(registry: Registry, rt: ResourceType, owner: Mapping[str, Any]
          ) -> list[dict[str, Any]]:
    """Objects of ``rt`` in the owner's namespace whose controller is ``owner``."""
    uid = owner["metadata"]["uid"]
    ns = owner["metadata"].get("namespace")
    return [o for o in registry.store.items(rt.key, ns) if controller_uid(o) == uid]


async def adopt(w: Writer, rt: ResourceType, owner: Mapping[str, Any], *,
                owner_rt: ResourceType) -> None:
    """Claim the owner's orphans: objects its selector matches that no controller owns
    (left behind by a delete with propagationPolicy=Orphan, say), as kube's
    ControllerRefManager does."""
    try:
        selector = LabelSelector.from_label_selector((owner.get("spec") or {}).get("selector"))
    except ApiError:
        return
    if selector.empty:
        return
    ref = owner_reference(owner_rt, owner)
    for obj in list(w.store.items(rt.key, owner["metadata"]["namespace"])):
        if controller_uid(obj) is None and not terminating(obj) and selector.matches(
                obj["metadata"].get("labels")):
            await w.update(rt, obj, lambda b: b["metadata"].__setitem__(
                "ownerReferences", [*(b["metadata"].get("ownerReferences") or []), ref]))


def terminating(obj: Mapping[str, Any]) -> bool:
    return bool(obj["metadata"].get("deletionTimestamp"))


def pod_phase(pod: Mapping[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def pod_active(pod: Mapping[str, Any]) -> bool:
    """kube's IsPodActive: not finished and not being deleted."""
    return pod_phase(pod) not in ("Succeeded", "Failed") and not terminating(pod)


def _ready_condition(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond
    return None


def pod_ready(pod: Mapping[str, Any]) -> bool:
    cond = _ready_condition(pod)
    return cond is not None and cond.get("status") == "True"


def parse_time(stamp: str | None) -> float | None:
    if not stamp:
        return None
    return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()


def available_in(pod: Mapping[str, Any], min_ready: int, now: float) -> float | None:
    """Seconds until a ready pod counts as available (0: it is), None if it never will as
    it is: not ready, or (as kube's IsPodAvailable) ready since no recorded time."""
    if not pod_ready(pod):
        return None
    if min_ready <= 0:
        return 0.0
    since = parse_time((_ready_condition(pod) or {}).get("lastTransitionTime"))
    return None if since is None else max(0.0, since + min_ready - now)


def template_hash(template: Mapping[str, Any]) -> str:
    """A short stable digest of a pod template: FNV-32a, encoded as kube's
    rand.SafeEncodeString does, so hashes look like the ones kube makes."""
    h = 0x811C9DC5
    for byte in json.dumps(template, sort_keys=True, separators=(",", ":")).encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return "".join(NAME_ALPHABET[b % len(NAME_ALPHABET)] for b in str(h).encode())


def scaled_value(value: Any, total: int, *, round_up: bool) -> int:
    """intstr.GetScaledValueFromIntOrPercent."""
    if isinstance(value, int):
        return value
    text = str(value)
    if text.endswith("%"):
        scaled = int(text[:-1]) * total / 100
        return math.ceil(scaled) if round_up else math.floor(scaled)
    return int(text)


@dataclass(frozen=True)
class Condition:
    """A status condition as a controller decides it; times are added when it is set."""

    type: str
    status: str
    reason: str
    message: str


def set_condition(conditions: list[dict[str, Any]], want: Condition, *, now: str,
                  update_time: bool = False) -> list[dict[str, Any]]:
    """Set one condition, keeping lastTransitionTime while its status stays the same."""
    old = next((c for c in conditions if c.get("type") == want.type), None)
    if old is not None and (old.get("status"), old.get("reason"), old.get("message")) == (
            want.status, want.reason, want.message):
        return conditions
    cond: dict[str, Any] = {"type": want.type, "status": want.status}
    if update_time:
        cond["lastUpdateTime"] = now
    cond["lastTransitionTime"] = (old["lastTransitionTime"] if old is not None and old.get(
        "status") == want.status and old.get("lastTransitionTime") else now)
    cond["reason"], cond["message"] = want.reason, want.message
    return [cond if c.get("type") == want.type else c for c in conditions] \
        if old is not None else [*conditions, cond]


def without_empty(status: Mapping[str, Any], keep: Iterable[str] = ()) -> dict[str, Any]:
    """Go's omitempty: zero counts are left out, except the fields in `keep`."""
    kept = set(keep)
    return {k: v for k, v in status.items() if k in kept or v not in (0, None, [], {})}


class Writer:
    """Registry writes for controllers: conflicts and vanished objects are retried."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.store = registry.store

    def now(self) -> float:
        return self.registry.clock()

    def stamp(self) -> str:
        return now_rfc3339(self.registry.clock)

    async def create(self, rt: ResourceType, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return (await self.registry.create(rt, ns, body)).obj
        except ApiError as e:
            if e.code in (404, 409):
                raise TemporaryError(f"creating {rt.plural} in {ns}: {e}") from e
            if e.code == 403 and e.kind == "namespaces":
                # the namespace is being emptied: its owners go too, nothing to retry
                raise PermanentError(f"creating {rt.plural} in {ns}: {e}") from e
            raise

    async def update(self, rt: ResourceType, obj: Mapping[str, Any],
                     change: Callable[[dict[str, Any]], None], *, status: bool = False) -> None:
        """Apply `change` to a copy of `obj` and write it if it differs, guarded by its
        resourceVersion."""
        body = copy.deepcopy(dict(obj))
        change(body)
        if body == obj:
            return
        meta = obj["metadata"]
        try:
            await self.registry.update(rt, meta.get("namespace", ""), meta["name"], body,
                                       subresource="status" if status else "")
        except ApiError as e:
            if e.code in (404, 409):
                raise TemporaryError(f"{rt.plural} {meta.get('namespace', '')}/{meta['name']} "
                                     f"changed underneath: {e}") from e
            raise

    async def delete(self, rt: ResourceType, ns: str, name: str,
                     options: Mapping[str, Any] | None = None) -> None:
        try:
            await self.registry.delete(rt, ns, name, options)
        except ApiError as e:
            if e.code != 404:
                raise

    def node_name(self) -> str | None:
        """The node Pods are placed on: this cluster has one (no scheduler to choose)."""
        for node in self.store.items(NODES.key):
            if not terminating(node):
                return str(node["metadata"]["name"])
        return None

    def pod_body(self, owner_rt: ResourceType, owner: Mapping[str, Any],
                 template: Mapping[str, Any], *, labels: Mapping[str, str] | None = None,
                 node: str | None = None) -> dict[str, Any]:
        """A Pod from a template, owned by `owner`, named as generateName makes names."""
        tmeta = template.get("metadata") or {}
        meta: dict[str, Any] = {
            "generateName": f"{owner['metadata']['name']}-",
            "namespace": owner["metadata"]["namespace"],
            "labels": {**(tmeta.get("labels") or {}), **(labels or {})},
            "ownerReferences": [owner_reference(owner_rt, owner)],
        }
        if tmeta.get("annotations"):
            meta["annotations"] = dict(tmeta["annotations"])
        spec = copy.deepcopy(dict(template.get("spec") or {}))
        placed = node or self.node_name()
        if placed and not spec.get("nodeName"):
            spec["nodeName"] = placed
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
