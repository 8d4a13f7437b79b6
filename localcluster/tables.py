"""Server-side printing: the ``meta.k8s.io/v1`` Table that ``kubectl get`` asks
for, with kube's columns for the built-in kinds and a CRD's
additionalPrinterColumns for custom resources."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from localcluster.podprint import pod_row
from localcluster.resources import ResourceType

Cell = Callable[[Mapping[str, Any]], Any]


def wants_table(accept: str) -> bool:
    return "as=Table" in accept


def human_duration(seconds: float) -> str:
    """kube's duration.HumanDuration, as shown in AGE columns."""
    if seconds < -1:
        return "<invalid>"
    s = int(max(seconds, 0))
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m" if s % 60 == 0 else f"{minutes}m{s % 60}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return f"{hours}h" if minutes % 60 == 0 else f"{hours}h{minutes % 60}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d" if hours % 24 == 0 else f"{hours // 24}d{hours % 24}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        years = hours // 24 // 365
        return f"{years}y{hours // 24 - years * 365}d"
    return f"{hours // 24 // 365}y"


def _age(obj: Mapping[str, Any]) -> str:
    stamp = (obj.get("metadata") or {}).get("creationTimestamp")
    if not stamp:
        return "<unknown>"
    created = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    return human_duration(time.time() - created.timestamp())


def _dig(obj: Mapping[str, Any], path: str) -> Any:
    cur: Any = obj
    for part in path.strip(".").split("."):
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(part)
    return cur


def _ports(svc: Mapping[str, Any]) -> str:
    ports = (svc.get("spec") or {}).get("ports") or []
    return ",".join(
        f"{p.get('port')}:{p['nodePort']}/{p.get('protocol', 'TCP')}" if p.get("nodePort")
        else f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in ports) or "<none>"


def _endpoints(ep: Mapping[str, Any]) -> str:
    pairs = [f"{a['ip']}:{p['port']}" for s in ep.get("subsets") or []
             for p in s.get("ports") or [] for a in s.get("addresses") or []]
    if not pairs:
        return "<none>"
    shown = ",".join(pairs[:3])
    return shown + (f" + {len(pairs) - 3} more..." if len(pairs) > 3 else "")


def _slice_endpoints(s: Mapping[str, Any]) -> str:
    addrs = [a for e in s.get("endpoints") or [] for a in e.get("addresses") or []]
    if not addrs:
        return "<unset>"
    return ",".join(addrs[:3]) + (f" + {len(addrs) - 3} more..." if len(addrs) > 3 else "")


def _col(name: str, cell: Cell, *, priority: int = 0, kind: str = "string",
         fmt: str = "") -> tuple[dict[str, Any], Cell]:
    return ({"name": name, "type": kind, "format": fmt, "description": "",
             "priority": priority}, cell)


def _since(stamp: Any) -> str:
    """kube's translateTimestampSince, for Time and MicroTime stamps alike."""
    if not stamp:
        return "<unknown>"
    at = dt.datetime.strptime(str(stamp)[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC)
    return human_duration(time.time() - at.timestamp())


EVENT_FIELDS_V1 = {"involvedObject": "regarding", "message": "note",
                   "reportingComponent": "reportingController", "source": "deprecatedSource",
                   "firstTimestamp": "deprecatedFirstTimestamp",
                   "lastTimestamp": "deprecatedLastTimestamp", "count": "deprecatedCount"}


def _ev(o: Mapping[str, Any], core_field: str) -> Any:
    """An Event's field by its core/v1 name, from either version's object."""
    return o.get(core_field) or o.get(EVENT_FIELDS_V1[core_field])


def _event_object(o: Mapping[str, Any]) -> str:
    ref = _ev(o, "involvedObject") or {}
    kind = str(ref.get("kind") or "").lower()
    return f"{kind}/{ref['name']}" if ref.get("name") else kind


def _images(o: Mapping[str, Any], field: str) -> str:
    containers = _dig(o, "spec.template.spec.containers") or []
    return ",".join(str(c.get(field, "")) for c in containers)


def _selector(o: Mapping[str, Any]) -> str:
    sel = _dig(o, "spec.selector") or {}
    parts = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for e in sel.get("matchExpressions") or []:
        op, values = e.get("operator", ""), ",".join(e.get("values") or [])
        parts.append({"In": f"{e.get('key')} in ({values})",
                      "NotIn": f"{e.get('key')} notin ({values})",
                      "Exists": str(e.get("key")),
                      "DoesNotExist": f"!{e.get('key')}"}.get(op, str(e.get("key"))))
    return ",".join(parts) or "<none>"


def _count(o: Mapping[str, Any], path: str) -> int:
    return int(_dig(o, path) or 0)


def _node_status(o: Mapping[str, Any]) -> str:
    ready = next((c for c in _dig(o, "status.conditions") or [] if c.get("type") == "Ready"),
                 None)
    status = "Ready" if ready and ready.get("status") == "True" else (
        "NotReady" if ready and ready.get("status") == "False" else "Unknown")
    return status + (",SchedulingDisabled" if _dig(o, "spec.unschedulable") else "")


def _node_roles(o: Mapping[str, Any]) -> str:
    roles = sorted(k.split("/", 1)[1] for k in (o["metadata"].get("labels") or {})
                   if k.startswith("node-role.kubernetes.io/"))
    return ",".join(r for r in roles if r) or "<none>"


def _node_address(kind: str) -> Cell:
    return lambda o: next((a.get("address") for a in _dig(o, "status.addresses") or []
                           if a.get("type") == kind), "<none>")


def _job_status(o: Mapping[str, Any]) -> str:
    true = {c.get("type") for c in _dig(o, "status.conditions") or []
            if c.get("status") == "True"}
    for ctype, shown in (("Complete", "Complete"), ("Failed", "Failed")):
        if ctype in true:
            return shown
    if o["metadata"].get("deletionTimestamp"):
        return "Terminating"
    for ctype in ("Suspended", "FailureTarget", "SuccessCriteriaMet"):
        if ctype in true:
            return ctype
    return "Running"


def _job_completions(o: Mapping[str, Any]) -> str:
    done = _count(o, "status.succeeded")
    completions = _dig(o, "spec.completions")
    if completions is not None:
        return f"{done}/{completions}"
    parallelism = int(_dig(o, "spec.parallelism") or 0)
    return f"{done}/1 of {parallelism}" if parallelism > 1 else f"{done}/1"


def _job_duration(o: Mapping[str, Any]) -> str:
    start = _dig(o, "status.startTime")
    if not start:
        return ""
    begun = dt.datetime.strptime(start, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    end = _dig(o, "status.completionTime")
    until = (dt.datetime.strptime(end, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()
             if end else time.time())
    return human_duration(until - begun.timestamp())


def _external_ips(svc: Mapping[str, Any]) -> str:
    """kubectl's EXTERNAL-IP: a LoadBalancer's ingress (then its externalIPs), or
    <pending> until it has one; an ExternalName's name; else the externalIPs."""
    external = list(_dig(svc, "spec.externalIPs") or [])
    kind = _dig(svc, "spec.type") or "ClusterIP"
    if kind == "ExternalName":
        return str(_dig(svc, "spec.externalName") or "<none>")
    if kind == "LoadBalancer":
        ingress = [i.get("ip") or i.get("hostname") or ""
                   for i in _dig(svc, "status.loadBalancer.ingress") or []]
        ingress = [i for i in ingress if i]
        return ",".join([*ingress, *external]) if ingress else "<pending>"
    return ",".join(external) or "<none>"


_NAME = _col("Name", lambda o: o["metadata"]["name"], fmt="name")
_AGE = _col("Age", _age)
_WORKLOAD_WIDE = [_col("Containers", lambda o: _images(o, "name"), priority=1),
                  _col("Images", lambda o: _images(o, "image"), priority=1),
                  _col("Selector", _selector, priority=1)]
_CREATED = _col("Created At", lambda o: o["metadata"].get("creationTimestamp", ""),
                kind="date")

COLUMNS: dict[tuple[str, str], list[tuple[dict[str, Any], Cell]]] = {
    ("", "namespaces"): [_NAME, _col("Status", lambda o: _dig(o, "status.phase") or ""), _AGE],
    ("", "services"): [
        _NAME, _col("Type", lambda o: _dig(o, "spec.type") or "ClusterIP"),
        _col("Cluster-IP", lambda o: _dig(o, "spec.clusterIP") or "<none>"),
        _col("External-IP", _external_ips), _col("Port(s)", _ports), _AGE,
        _col("Selector", lambda o: ",".join(
            f"{k}={v}" for k, v in (_dig(o, "spec.selector") or {}).items()) or "<none>",
            priority=1)],
    ("", "pods"): [
        _NAME, _col("Ready", lambda o: pod_row(o).ready),
        _col("Status", lambda o: pod_row(o).status),
        _col("Restarts", lambda o: pod_row(o).restarts_text(_since)),
        _AGE, _col("IP", lambda o: _dig(o, "status.podIP") or "<none>", priority=1),
        _col("Node", lambda o: _dig(o, "spec.nodeName") or "<none>", priority=1)],
    ("", "endpoints"): [_NAME, _col("Endpoints", _endpoints), _AGE],
    ("networking.k8s.io", "servicecidrs"): [
        _NAME, _col("CIDRs", lambda o: ",".join(_dig(o, "spec.cidrs") or [])), _AGE],
    ("", "nodes"): [
        _NAME, _col("Status", _node_status), _col("Roles", _node_roles), _AGE,
        _col("Version", lambda o: _dig(o, "status.nodeInfo.kubeletVersion") or ""),
        _col("Internal-IP", _node_address("InternalIP"), priority=1),
        _col("External-IP", _node_address("ExternalIP"), priority=1),
        _col("OS-Image", lambda o: _dig(o, "status.nodeInfo.osImage") or "", priority=1),
        _col("Kernel-Version", lambda o: _dig(o, "status.nodeInfo.kernelVersion") or "",
             priority=1),
        _col("Container-Runtime", lambda o: _dig(o, "status.nodeInfo.containerRuntimeVersion")
             or "", priority=1)],
    ("apps", "deployments"): [
        _NAME, _col("Ready", lambda o: f"{_count(o, 'status.readyReplicas')}/"
                                       f"{_count(o, 'spec.replicas')}"),
        _col("Up-to-date", lambda o: _count(o, "status.updatedReplicas"), kind="integer"),
        _col("Available", lambda o: _count(o, "status.availableReplicas"), kind="integer"),
        _AGE, *_WORKLOAD_WIDE],
    ("apps", "replicasets"): [
        _NAME, _col("Desired", lambda o: _count(o, "spec.replicas"), kind="integer"),
        _col("Current", lambda o: _count(o, "status.replicas"), kind="integer"),
        _col("Ready", lambda o: _count(o, "status.readyReplicas"), kind="integer"),
        _AGE, *_WORKLOAD_WIDE],
    ("apps", "daemonsets"): [
        _NAME, _col("Desired", lambda o: _count(o, "status.desiredNumberScheduled"),
                    kind="integer"),
        _col("Current", lambda o: _count(o, "status.currentNumberScheduled"), kind="integer"),
        _col("Ready", lambda o: _count(o, "status.numberReady"), kind="integer"),
        _col("Up-to-date", lambda o: _count(o, "status.updatedNumberScheduled"),
             kind="integer"),
        _col("Available", lambda o: _count(o, "status.numberAvailable"), kind="integer"),
        _col("Node Selector", lambda o: ",".join(
            f"{k}={v}" for k, v in sorted((_dig(o, "spec.template.spec.nodeSelector")
                                           or {}).items())) or "<none>"),
        _AGE, *_WORKLOAD_WIDE],
    ("apps", "controllerrevisions"): [
        _NAME, _col("Controller", lambda o: next(
            (f"{r.get('kind', '').lower()}.{r.get('apiVersion', '').split('/')[0]}/"
             f"{r.get('name')}" for r in o["metadata"].get("ownerReferences") or []
             if r.get("controller")), "<none>")),
        _col("Revision", lambda o: o.get("revision", 0), kind="integer"), _AGE],
    ("apps", "statefulsets"): [
        _NAME, _col("Ready", lambda o: f"{_count(o, 'status.readyReplicas')}/"
                                       f"{_count(o, 'spec.replicas')}"),
        _AGE, *_WORKLOAD_WIDE[:2]],
    ("policy", "poddisruptionbudgets"): [
        _NAME, _col("Min Available", lambda o: str(_dig(o, "spec.minAvailable"))
                    if _dig(o, "spec.minAvailable") is not None else "N/A"),
        _col("Max Unavailable", lambda o: str(_dig(o, "spec.maxUnavailable"))
             if _dig(o, "spec.maxUnavailable") is not None else "N/A"),
        _col("Allowed Disruptions", lambda o: _count(o, "status.disruptionsAllowed"),
             kind="integer"), _AGE],
    ("batch", "jobs"): [
        _NAME, _col("Status", _job_status), _col("Completions", _job_completions),
        _col("Duration", _job_duration), _AGE, *_WORKLOAD_WIDE],
    ("discovery.k8s.io", "endpointslices"): [
        _NAME, _col("AddressType", lambda o: o.get("addressType", "")),
        _col("Ports", lambda o: ",".join(str(p.get("port")) for p in o.get("ports") or [])
             or "<unset>"),
        _col("Endpoints", _slice_endpoints), _AGE],
    ("", "secrets"): [_NAME, _col("Type", lambda o: o.get("type", "")),
                      _col("Data", lambda o: len(o.get("data") or {}), kind="integer"), _AGE],
    ("", "configmaps"): [_NAME, _col("Data", lambda o: len(o.get("data") or {}) + len(
        o.get("binaryData") or {}), kind="integer"), _AGE],
    ("", "serviceaccounts"): [_NAME, _col("Secrets", lambda o: len(o.get("secrets") or []),
                                          kind="integer"), _AGE],
    ("coordination.k8s.io", "leases"): [
        _NAME, _col("Holder", lambda o: _dig(o, "spec.holderIdentity") or ""), _AGE],
    ("rbac.authorization.k8s.io", "roles"): [_NAME, _CREATED],
    ("rbac.authorization.k8s.io", "clusterroles"): [_NAME, _CREATED],
    ("rbac.authorization.k8s.io", "rolebindings"): [
        _NAME, _col("Role", lambda o: f"{_dig(o, 'roleRef.kind')}/{_dig(o, 'roleRef.name')}"),
        _AGE],
    ("rbac.authorization.k8s.io", "clusterrolebindings"): [
        _NAME, _col("Role", lambda o: f"{_dig(o, 'roleRef.kind')}/{_dig(o, 'roleRef.name')}"),
        _AGE],
    ("apiextensions.k8s.io", "customresourcedefinitions"): [_NAME, _CREATED],
    ("admissionregistration.k8s.io", "mutatingwebhookconfigurations"): [
        _NAME, _col("Webhooks", lambda o: len(o.get("webhooks") or []), kind="integer"), _AGE],
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations"): [
        _NAME, _col("Webhooks", lambda o: len(o.get("webhooks") or []), kind="integer"), _AGE],
    ("", "events"): [  # core/v1 and events.k8s.io/v1 field names alike
        _col("Last Seen", lambda o: _since(_dig(o, "series.lastObservedTime") or _ev(
            o, "lastTimestamp") or _ev(o, "firstTimestamp") or o.get("eventTime"))),
        _col("Type", lambda o: o.get("type", "")), _col("Reason", lambda o: o.get("reason", "")),
        _col("Object", _event_object),
        _col("Subobject", lambda o: (_ev(o, "involvedObject") or {}).get("fieldPath", ""),
             priority=1),
        _col("Source", lambda o: ", ".join(v for v in (
            (_ev(o, "source") or {}).get("component") or _ev(o, "reportingComponent"),
            (_ev(o, "source") or {}).get("host") or o.get("reportingInstance")) if v),
             priority=1),
        _col("Message", lambda o: str(_ev(o, "message") or "").strip()),
        _col("First Seen", lambda o: _since(_ev(o, "firstTimestamp") or o.get("eventTime")),
             priority=1),
        _col("Count", lambda o: _dig(o, "series.count") or _ev(o, "count") or 1,
             kind="integer", priority=1),
        _col("Name", lambda o: o["metadata"]["name"], priority=1)],
}


_SEGMENT = re.compile(r"""\.([^.\[]+)|\[\*\]|\[(\d+)\]|\[\?\(@\.([^=!]+)==["']([^"']*)["']\)\]""")


def jsonpath(obj: Any, path: str) -> list[Any]:
    """The values `path` selects in `obj`, for the simple JSONPath of printer columns:
    ``.field``, ``[N]``, ``[*]`` and ``[?(@.field=="value")]``."""
    current = [obj]
    pos = 0
    while pos < len(path):
        m = _SEGMENT.match(path, pos)
        if m is None:
            return []  # not a path this evaluator reads: the cell stays empty
        pos = m.end()
        field, index, key, wanted = m.groups()
        nxt: list[Any] = []
        for value in current:
            if field is not None and isinstance(value, Mapping) and field in value:
                nxt.append(value[field])
            elif index is not None and isinstance(value, list) and int(index) < len(value):
                nxt.append(value[int(index)])
            elif key is not None and isinstance(value, list):
                nxt += [v for v in value if isinstance(v, Mapping)
                        and str(v.get(key)) == wanted]
            elif field is None and index is None and key is None and isinstance(value, list):
                nxt += value
        current = nxt
    return current


def _printer_column(spec: Mapping[str, Any]) -> tuple[dict[str, Any], Cell]:
    path = str(spec.get("jsonPath", ""))
    kind = str(spec.get("type", "string"))

    def cell(o: Mapping[str, Any]) -> Any:
        found = jsonpath(o, path)
        # As kube-apiserver: one value as it is, several joined with commas.
        value = found[0] if len(found) == 1 else (
            ",".join(v if isinstance(v, str) else json.dumps(v) for v in found) or None)
        if kind == "date" and value:
            created = dt.datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%SZ")
            return human_duration(time.time() - created.replace(tzinfo=dt.UTC).timestamp())
        if isinstance(value, (dict, list)):
            return json.dumps(value)
        return value if value is not None else ""

    return _col(str(spec.get("name", path)), cell, priority=int(spec.get("priority", 0)),
                kind="string" if kind == "date" else kind)


def columns(rt: ResourceType) -> list[tuple[dict[str, Any], Cell]]:
    if rt.key in COLUMNS:
        return COLUMNS[rt.key]
    extra = rt.extra.get("additionalPrinterColumns") or []
    return [_NAME, *(_printer_column(c) for c in extra)] if extra else [_NAME, _AGE]


def _row(cols: Sequence[tuple[dict[str, Any], Cell]], obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in obj["metadata"].items() if k != "managedFields"}
    return {"cells": [cell(obj) for _, cell in cols],
            "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                       "metadata": meta}}


def table(rt: ResourceType, objs: Sequence[Mapping[str, Any]],
          list_meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    cols = columns(rt)
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
            "metadata": dict(list_meta or {}),
            "columnDefinitions": [c for c, _ in cols],
            "rows": [_row(cols, o) for o in objs]}
