"""The ``pods/binding`` subresource, served as kube-apiserver serves it, and the
one-node scheduler that uses it.

POST of a Binding sets ``spec.nodeName`` (immutable by any other write) and the
``PodScheduled`` condition; a Pod already bound, or being deleted, answers 409.
The scheduler binds every Pod that names the default scheduler and no node to
the cluster's node, and records ``Scheduled`` as kube's default-scheduler does.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

from localcluster.errors import ApiError, Cause
from localcluster.events import EventRecorder
from localcluster.registry import Registry, now_rfc3339
from localcluster.store import EventType, Write

log = logging.getLogger(__name__)

PODS_KEY = ("", "pods")
DEFAULT_SCHEDULER = "default-scheduler"


def _conflict(name: str, detail: str) -> ApiError:
    return ApiError.conflict("pods/binding", name, detail)


def _validate(name: str, body: Any) -> tuple[str, dict[str, str]]:
    if not isinstance(body, dict) or body.get("kind") not in (None, "Binding"):
        raise ApiError.bad_request("the body of a pods/binding request must be a Binding")
    meta = body.get("metadata") or {}
    if meta.get("name") not in (None, "", name):
        raise ApiError.bad_request("name in URL does not match name in Binding object")
    target = body.get("target") or {}
    causes = []
    if target.get("kind") not in (None, "", "Node"):
        causes.append(Cause("target.kind", f'Unsupported value: "{target["kind"]}": '
                            'supported values: "Node", "<empty>"', "FieldValueNotSupported"))
    if not target.get("name"):
        causes.append(Cause("target.name", "Required value", "FieldValueRequired"))
    if causes:
        raise ApiError.invalid("Binding", name, causes)
    return str(target["name"]), dict(meta.get("annotations") or {})


async def bind(registry: Registry, namespace: str, name: str, body: Any, *,
               dry_run: bool = False) -> dict[str, Any]:
    """Assign Pod namespace/name to the Binding's node; the ``Status`` to answer."""
    node, annotations = _validate(name, body)
    uid = ((body.get("metadata") or {}).get("uid")) or ""
    async with registry.store.lock:
        current = registry.store.get(PODS_KEY, namespace, name)
        if current is None:
            raise ApiError.not_found("pods", name)
        meta = current["metadata"]
        if uid and uid != meta["uid"]:
            raise _conflict(name, f"Precondition failed: UID in precondition: {uid}, UID in "
                            f"object meta: {meta['uid']}")
        if meta.get("deletionTimestamp"):
            raise _conflict(name, f"pod {name} is being deleted, cannot be assigned to a host")
        if (current.get("spec") or {}).get("nodeName"):
            raise _conflict(name, f"pod {name} is already assigned to node "
                            f"\"{current['spec']['nodeName']}\"")
        pod = copy.deepcopy(current)
        pod["spec"]["nodeName"] = node
        if annotations:
            pod["metadata"].setdefault("annotations", {}).update(annotations)
        status = pod.setdefault("status", {})
        conditions = [c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"]
        conditions.insert(0, {"type": "PodScheduled", "status": "True",
                              "lastProbeTime": None,
                              "lastTransitionTime": now_rfc3339(registry.clock)})
        status["conditions"] = conditions
        status.setdefault("phase", "Pending")
        if not dry_run:
            await registry.store.commit([Write(PODS_KEY, namespace, name, pod,
                                               EventType.MODIFIED)])
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "code": 201}


def wants_binding(pod: Mapping[str, Any]) -> bool:
    spec = pod.get("spec") or {}
    return (not spec.get("nodeName") and not pod["metadata"].get("deletionTimestamp")
            and spec.get("schedulerName", DEFAULT_SCHEDULER) == DEFAULT_SCHEDULER)


class Scheduler:
    """Binds each unscheduled Pod to the one node."""

    def __init__(self, registry: Registry, node: str) -> None:
        self.registry = registry
        self.node = node
        self.events = EventRecorder(registry, component=DEFAULT_SCHEDULER,
                                    clock=registry.clock)

    async def schedule(self, namespace: str, name: str) -> None:
        pod = self.registry.store.get(PODS_KEY, namespace, name)
        if pod is None or not wants_binding(pod):
            return
        try:
            await bind(self.registry, namespace, name, {
                "metadata": {"name": name, "uid": pod["metadata"]["uid"]},
                "target": {"kind": "Node", "name": self.node}})
        except ApiError as e:
            if e.code in (404, 409):
                return  # gone, bound or deleted meanwhile: nothing to schedule
            raise
        bound = self.registry.store.get(PODS_KEY, namespace, name) or pod
        await self.events.normal(
            {"kind": "Pod", "apiVersion": "v1", **{"metadata": bound["metadata"]}},
            "Scheduled", f"Successfully assigned {namespace}/{name} to {self.node}")
