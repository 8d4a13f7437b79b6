"""Per-kind choices kube-apiserver's registry strategies make that are not
validation or defaults: which kinds keep ``metadata.generation``, and what a
DELETE answers with.

kube sets ``generation`` only where a strategy's PrepareForCreate does
(workloads, EndpointSlices, CRDs and every custom resource); other kinds leave
it unset. A DELETE that removes the object at once answers with the object for
the stores built with ``ReturnDeletedObject``, and with a ``Status`` of
``Success`` naming it for the rest; a deletion held by finalizers answers with
the object carrying its ``deletionTimestamp``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from localcluster.resources import ResourceType

GENERATION_KINDS = frozenset({
    ("apiextensions.k8s.io", "customresourcedefinitions"),
    ("discovery.k8s.io", "endpointslices"),
    ("apps", "deployments"), ("apps", "replicasets"), ("apps", "daemonsets"),
    ("apps", "statefulsets"), ("batch", "jobs"), ("batch", "cronjobs"),
    ("networking.k8s.io", "ingresses"), ("networking.k8s.io", "networkpolicies"),
    ("policy", "poddisruptionbudgets"),
    ("admissionregistration.k8s.io", "mutatingwebhookconfigurations"),
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations"),
    ("admissionregistration.k8s.io", "validatingadmissionpolicies"),
    ("admissionregistration.k8s.io", "validatingadmissionpolicybindings"),
})

RETURNS_DELETED_OBJECT = frozenset({
    ("", "pods"), ("", "services"), ("", "namespaces"), ("", "serviceaccounts"),
    ("", "resourcequotas"), ("storage.k8s.io", "storageclasses"),
})


def tracks_generation(rt: ResourceType) -> bool:
    return rt.crd_name is not None or rt.key in GENERATION_KINDS


def delete_response(rt: ResourceType, obj: Mapping[str, Any]) -> dict[str, Any]:
    """What a DELETE answers, given the object it removed or marked for deletion."""
    meta = obj.get("metadata") or {}
    if meta.get("deletionTimestamp") or rt.key in RETURNS_DELETED_OBJECT:
        return dict(obj)
    details: dict[str, Any] = {"name": meta.get("name", "")}
    if rt.group:
        details["group"] = rt.group
    details["kind"] = rt.plural
    details["uid"] = meta.get("uid", "")
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "details": details}
