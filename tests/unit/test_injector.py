"""mesh.injector: the webhook's answer to an AdmissionReview of a Pod, as the API server
applies it: a JSONPatch that yields what `meshgate inject` prints, only for Pods that
(or whose namespace) ask for it, and a refusal naming a bad annotation."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import jsonpatch
import pytest

from mesh.errors import ConfigError
from mesh.inject import InjectSettings, inject
from mesh.injector import review

SETTINGS = InjectSettings(service_cidrs=("10.96.0.0/16",),
                          trust_anchors_pem="-----BEGIN CERTIFICATE-----\nMIIB\n"
                          "-----END CERTIFICATE-----\n")
POD: dict[str, Any] = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"generateName": "web-7d9f-", "namespace": "shop", "labels": {"app": "web"}},
    "spec": {"serviceAccountName": "web",
             "containers": [{"name": "web", "image": "nginx"}]}}


def admission(pod: dict[str, Any], kind: str = "Pod") -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                        "kind": {"group": "", "version": "v1", "kind": kind},
                        "resource": {"group": "", "version": "v1", "resource": "pods"},
                        "namespace": "shop", "operation": "CREATE", "object": pod}}


def annotated(value: str) -> dict[str, Any]:
    pod = copy.deepcopy(POD)
    pod["metadata"]["annotations"] = {"meshgate.io/inject": value}
    return pod


def patched(answer: dict[str, Any], pod: dict[str, Any]) -> dict[str, Any]:
    response = answer["response"]
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(pod, patch)  # type: ignore[no-any-return]


def test_a_pod_of_an_annotated_namespace_gets_the_patch_inject_would_make() -> None:
    answer, decision = review(admission(POD), SETTINGS, {"meshgate.io/inject": "enabled"})
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["response"]["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert answer["response"]["allowed"] is True
    assert patched(answer, POD) == inject(POD, SETTINGS)[0]
    assert decision.injected and decision.pod == "web-7d9f-"


def test_a_pod_annotated_enabled_is_injected_in_any_namespace() -> None:
    pod = annotated("enabled")
    answer, _ = review(admission(pod), SETTINGS, {})
    assert patched(answer, pod) == inject(pod, SETTINGS)[0]


@pytest.mark.parametrize(("pod", "namespace", "reason"), [
    (POD, {}, "neither the pod nor its namespace has meshgate.io/inject: enabled"),
    (annotated("disabled"), {"meshgate.io/inject": "enabled"},
     "the pod has meshgate.io/inject: disabled"),
])
def test_other_pods_are_admitted_unchanged(pod: dict[str, Any], namespace: dict[str, str],
                                           reason: str) -> None:
    answer, decision = review(admission(pod), SETTINGS, namespace)
    assert answer["response"] == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                                  "allowed": True}
    assert not decision.injected and decision.reason == reason


def test_an_injected_pod_is_admitted_unchanged() -> None:
    pod = inject(annotated("enabled"), SETTINGS)[0]
    answer, decision = review(admission(pod), SETTINGS, {})
    assert "patch" not in answer["response"] and answer["response"]["allowed"]
    assert decision.reason.startswith("already injected")


def test_a_bad_config_annotation_refuses_the_pod_naming_it() -> None:
    pod = annotated("enabled")
    pod["metadata"]["annotations"]["config.meshgate.io/proxy-log-level"] = "loud"
    answer, decision = review(admission(pod), SETTINGS, {})
    response = answer["response"]
    assert response["allowed"] is False and "patch" not in response
    assert response["status"]["message"] == (
        "meshgate-proxy-injector: pod/web-7d9f-: annotation config.meshgate.io/"
        "proxy-log-level='loud' must be one of debug, info, warning, error")
    assert not decision.injected


def test_not_a_review_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"not an admission\.k8s\.io/v1 AdmissionReview"):
        review({"kind": "Pod"}, SETTINGS, {})
    answer, decision = review(admission(POD, kind="Service"), SETTINGS,
                              {"meshgate.io/inject": "enabled"})
    assert answer["response"]["allowed"] and decision.reason == "not a Pod"
