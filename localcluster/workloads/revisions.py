"""ControllerRevisions: the template history of DaemonSets and StatefulSets, kept
as kube keeps it (a strategic merge patch that replaces ``spec.template``,
numbered revisions, the owner's template labels plus ``controller-revision-hash``),
so that ``kubectl rollout history`` and ``kubectl rollout undo`` work on them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from localcluster.resources import ResourceType
from localcluster.workloads.common import (
    TYPES,
    Writer,
    owned,
    owner_reference,
    template_hash,
)

REVISIONS = TYPES[("apps", "controllerrevisions")]
REVISION_LABEL = "controller-revision-hash"


def revision_data(template: Mapping[str, Any]) -> dict[str, Any]:
    """What kube stores for a template: a patch that puts it back whole."""
    return {"spec": {"template": {**template, "$patch": "replace"}}}


async def current_revision(w: Writer, rt: ResourceType, owner: Mapping[str, Any]
                           ) -> tuple[str, str]:
    """The ControllerRevision of the owner's template, made (or renumbered as the newest,
    after a rollback) if need be; returns (its name, the template hash). Revisions
    beyond ``revisionHistoryLimit`` that no longer match the template are deleted."""
    meta, spec = owner["metadata"], owner.get("spec") or {}
    template = spec.get("template") or {}
    h = template_hash(template)
    data = revision_data(template)
    history = sorted(owned(w.registry, REVISIONS, owner), key=lambda r: int(r.get(
        "revision") or 0))
    top = int(history[-1].get("revision") or 0) if history else 0
    mine = next((r for r in history if r.get("data") == data), None)
    if mine is None:
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        labels[REVISION_LABEL] = h
        mine = await w.create(REVISIONS, meta["namespace"], {
            "apiVersion": "apps/v1", "kind": "ControllerRevision",
            "metadata": {"name": f"{meta['name']}-{h}", "labels": labels,
                         "ownerReferences": [owner_reference(rt, owner)]},
            "data": data, "revision": top + 1})
    elif int(mine.get("revision") or 0) != top:
        await w.update(REVISIONS, mine, lambda b: b.__setitem__("revision", top + 1))
    limit = int(spec.get("revisionHistoryLimit", 10))
    older = [r for r in history if r["metadata"]["name"] != mine["metadata"]["name"]]
    for old in older[:max(0, len(older) - limit)]:
        await w.delete(REVISIONS, meta["namespace"], old["metadata"]["name"])
    return str(mine["metadata"]["name"]), h
