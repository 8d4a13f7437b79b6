"""The proxy injector's decision, without I/O: an AdmissionReview (v1) of a Pod in, the
AdmissionReview answer out, with a JSONPatch that adds what `mesh.inject` adds.

As Linkerd's injector: a Pod is injected when it, or else its namespace, carries
``meshgate.io/inject: enabled``, and the Pod does not say ``disabled``. Everything
else is admitted unchanged; a Pod whose ``config.meshgate.io/*`` annotations are
wrong is refused with the reason (admitting it without its proxy would hide the
mistake). The caller reads the namespace's annotations (the review does not carry
them) and serves the answer (mesh.injectorserver).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonpatch

from mesh.errors import ConfigError
from mesh.inject import INJECT_ANNOTATION, InjectSettings, Outcome, inject

API_VERSION = "admission.k8s.io/v1"


@dataclass(frozen=True)
class Decision:
    """What the injector did with one Pod, for its log."""

    namespace: str
    pod: str
    injected: bool
    reason: str


def should_inject(pod_annotations: Mapping[str, Any],
                  namespace_annotations: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether to inject, and why (in the words of its log line)."""
    pod = pod_annotations.get(INJECT_ANNOTATION)
    if pod == "disabled":
        return False, f"the pod has {INJECT_ANNOTATION}: disabled"
    if pod == "enabled":
        return True, f"the pod has {INJECT_ANNOTATION}: enabled"
    if namespace_annotations.get(INJECT_ANNOTATION) == "enabled":
        return True, f"its namespace has {INJECT_ANNOTATION}: enabled"
    return False, f"neither the pod nor its namespace has {INJECT_ANNOTATION}: enabled"


def review(body: Mapping[str, Any], settings: InjectSettings,
           namespace_annotations: Mapping[str, Any]) -> tuple[dict[str, Any], Decision]:
    """The AdmissionReview answering `body`, and the decision taken."""
    request = body.get("request")
    if body.get("apiVersion") != API_VERSION or not isinstance(request, Mapping):
        raise ConfigError(f"not an {API_VERSION} AdmissionReview with a request")
    uid = str(request.get("uid", ""))
    pod = request.get("object")
    namespace = str(request.get("namespace") or "")
    if request.get("kind", {}).get("kind") != "Pod" or not isinstance(pod, dict):
        return _answer(uid), Decision(namespace, "?", False, "not a Pod")
    meta = pod.get("metadata") or {}
    name = str(meta.get("name") or meta.get("generateName") or "?")
    wanted, why = should_inject(meta.get("annotations") or {}, namespace_annotations)
    if not wanted:
        return _answer(uid), Decision(namespace, name, False, why)
    try:
        injected, reports = inject(pod, settings)
    except ConfigError as e:
        message = f"meshgate-proxy-injector: {e}"
        return _answer(uid, allowed=False, message=message), Decision(namespace, name, False,
                                                                      message)
    if reports[0].outcome is not Outcome.INJECTED:
        return _answer(uid), Decision(namespace, name, False, reports[0].reason)
    patch = jsonpatch.make_patch(pod, injected).patch
    return _answer(uid, patch=patch), Decision(namespace, name, True, why)


def _answer(uid: str, *, allowed: bool = True, message: str = "",
            patch: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if message:
        response["status"] = {"code": 400, "message": message}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode("ascii")
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}
