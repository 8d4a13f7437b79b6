"""The ``scale`` subresource: an autoscaling/v1 Scale view of a workload's
``spec.replicas``, read with GET and changed with PUT or PATCH (what ``kubectl
scale`` and autoscalers use)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from localcluster import patch
from localcluster.errors import ApiError, Cause
from localcluster.registry import Registry, WriteOptions
from localcluster.resources import ResourceType
from localcluster.selectors import LabelSelector


def scale_of(rt: ResourceType, obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    spec = obj.get("spec") or {}
    status: dict[str, Any] = {"replicas": int((obj.get("status") or {}).get("replicas") or 0)}
    try:
        selector = str(LabelSelector.from_label_selector(spec.get("selector")))
    except ApiError:
        selector = ""
    if selector:
        status["selector"] = selector
    return {"kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                              "creationTimestamp") if k in meta},
            "spec": {"replicas": int(spec.get("replicas", 1))}, "status": status}


def _replicas_of(rt: ResourceType, name: str, scale: Any) -> int:
    if not isinstance(scale, Mapping):
        raise ApiError.bad_request("the body of a scale request must be a Scale object")
    if scale.get("kind") not in (None, "Scale") or scale.get("apiVersion") not in (
            None, "autoscaling/v1"):
        raise ApiError.bad_request(
            f"the API version in the data ({scale.get('apiVersion')}) does not match the "
            "expected API version (autoscaling/v1)")
    replicas = (scale.get("spec") or {}).get("replicas", 0)
    if not isinstance(replicas, int) or isinstance(replicas, bool):
        raise ApiError.bad_request(
            f'Scale in version "v1" cannot be handled as a Scale: json: cannot unmarshal '
            f"{type(replicas).__name__} into Go struct field ScaleSpec.spec.replicas of type "
            "int32")
    if replicas < 0:
        raise ApiError.invalid("Scale", name, [Cause(
            "spec.replicas", f"Invalid value: {replicas}: must be greater than or equal to 0")],
            group="autoscaling")
    return replicas


async def _write(registry: Registry, rt: ResourceType, scale: Mapping[str, Any], *, ns: str,
                 name: str, opts: WriteOptions) -> dict[str, Any]:
    replicas = _replicas_of(rt, name, scale)
    current = registry.get(rt, ns, name)
    wanted_rv = (scale.get("metadata") or {}).get("resourceVersion")
    body = json.loads(json.dumps(current))
    body["spec"]["replicas"] = replicas
    if wanted_rv:
        body["metadata"]["resourceVersion"] = wanted_rv
    out = await registry.update(rt, ns, name, body, opts)
    return scale_of(rt, out.obj)


async def update_scale(registry: Registry, rt: ResourceType, body: Any, *, ns: str, name: str,
                       opts: WriteOptions) -> dict[str, Any]:
    return await _write(registry, rt, body, ns=ns, name=name, opts=opts)


async def patch_scale(registry: Registry, rt: ResourceType, body: Any, *, content_type: str,
                      ns: str, name: str, opts: WriteOptions) -> dict[str, Any]:
    current = scale_of(rt, registry.get(rt, ns, name))
    if content_type in ("application/merge-patch+json",
                        "application/strategic-merge-patch+json"):
        if not isinstance(body, dict):
            raise ApiError.bad_request("a merge patch must be a JSON object")
        patched = patch.json_merge_patch(current, body)
    elif content_type == "application/json-patch+json":
        patched = patch.json_patch(current, body)
    else:
        raise ApiError.unsupported_media_type(content_type)
    if (patched.get("metadata") or {}).get("resourceVersion") == current["metadata"].get(
            "resourceVersion"):
        patched["metadata"].pop("resourceVersion", None)
    return await _write(registry, rt, patched, ns=ns, name=name, opts=opts)
