"""The pure parts of the workload controllers: rollout arithmetic as kube's
deployment controller does it, kube's validation wording, template hashes."""

from __future__ import annotations

from typing import Any

import pytest

from localcluster.workloads import spec
from localcluster.workloads.common import (
    Condition,
    scaled_value,
    set_condition,
    template_hash,
)
from localcluster.workloads.deployments import (
    new_rs_replicas,
    old_scale_downs,
    surge_and_unavailable,
)


def deployment(replicas: int, surge: Any = "25%", unavailable: Any = "25%") -> dict[str, Any]:
    return {"spec": {"replicas": replicas, "strategy": {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}}}}


def rs(name: str, replicas: int, available: int, created: str = "2026-01-01T00:00:00Z"
       ) -> dict[str, Any]:
    return {"metadata": {"name": name, "creationTimestamp": created},
            "spec": {"replicas": replicas},
            "status": {"replicas": replicas, "availableReplicas": available}}


@pytest.mark.parametrize(("replicas", "surge", "unavailable", "want"), [
    (4, "25%", "25%", (1, 1)),
    (3, "25%", "25%", (1, 0)),     # surge rounds up, unavailability down
    (10, 3, "10%", (3, 1)),
    (2, 0, 0, (0, 1)),             # both zero: one may be unavailable
    (1, "50%", "200%", (1, 1)),    # never more unavailable than wanted
])
def test_fenceposts(replicas: int, surge: Any, unavailable: Any,
                    want: tuple[int, int]) -> None:
    assert surge_and_unavailable(deployment(replicas, surge, unavailable)) == want


def test_new_replica_set_grows_within_surge() -> None:
    d = deployment(3)
    old = rs("old", 3, 3)
    assert new_rs_replicas(d, [old], None) == 1
    grown = rs("new", 1, 0)
    assert new_rs_replicas(d, [old, grown], grown) == 1  # at 4 = 3 + surge already
    assert new_rs_replicas(deployment(3), [rs("new", 1, 1)], rs("new", 1, 1)) == 3


def test_old_replica_sets_shrink_keeping_minimum_available() -> None:
    d = deployment(4)                            # surge 1, unavailable 1: keep 3 available
    new, old = rs("new", 1, 0), rs("old", 4, 4)
    assert old_scale_downs(d, new, [old]) == {"old": 3}
    assert old_scale_downs(d, rs("new", 2, 1), [rs("old", 3, 3)]) == {"old": 2}
    assert old_scale_downs(d, rs("new", 4, 4), [rs("old", 0, 0)]) == {}


def test_unavailable_old_pods_go_first_and_oldest_sets_first() -> None:
    d = deployment(4)
    older = rs("older", 2, 0, "2026-01-01T00:00:00Z")
    old = rs("old", 2, 2, "2026-01-02T00:00:00Z")
    # 5 pods, 3 must stay available and the new one is not yet: one unavailable pod may go
    assert old_scale_downs(d, rs("new", 1, 0), [old, older]) == {"older": 1}
    # the new pod available: both unavailable ones go, and no available one may
    assert old_scale_downs(d, rs("new", 1, 1), [old, older]) == {"older": 0}


def test_scaled_values_round_as_kube() -> None:
    assert scaled_value("25%", 3, round_up=True) == 1
    assert scaled_value("25%", 3, round_up=False) == 0
    assert scaled_value(2, 3, round_up=False) == 2


def test_template_hash_is_stable_and_looks_like_kubes() -> None:
    t = {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c"}]}}
    h = template_hash(t)
    assert h == template_hash({"spec": t["spec"], "metadata": t["metadata"]})
    assert h != template_hash({**t, "spec": {"containers": [{"name": "d"}]}})
    assert set(h) <= set("bcdfghjklmnpqrstvwxz2456789") and 6 <= len(h) <= 10


def test_condition_keeps_transition_time_while_status_holds() -> None:
    conds = set_condition([], Condition("Available", "False", "A", "m"), now="t1")
    conds = set_condition(conds, Condition("Available", "False", "B", "n"), now="t2")
    assert conds[0]["lastTransitionTime"] == "t1" and conds[0]["reason"] == "B"
    conds = set_condition(conds, Condition("Available", "True", "C", "o"), now="t3")
    assert conds[0]["lastTransitionTime"] == "t3"


def _messages(plural: str, obj: dict[str, Any], old: dict[str, Any] | None = None
              ) -> list[str]:
    spec.defaults(plural, obj)
    return [f"{c.field}: {c.message}" for c in spec.validate(plural, obj, old)]


def _workload(labels: dict[str, str] | None = None, **spec_fields: Any) -> dict[str, Any]:
    return {"metadata": {"name": "x"}, "spec": {
        **spec_fields,
        "template": {"metadata": {"labels": labels or {"app": "x"}},
                     "spec": {"containers": [{"name": "c", "image": "c:1"}]}}}}


def test_validation_messages_are_kubes() -> None:
    sel = {"matchLabels": {"app": "x"}}
    assert _messages("deployments", _workload(selector=sel)) == []
    assert _messages("deployments", _workload()) == ["spec.selector: Required value"]
    assert _messages("replicasets", _workload(selector={})) == [
        "spec.selector: Invalid value: v1.LabelSelector{MatchLabels:map[string]string(nil), "
        "MatchExpressions:[]v1.LabelSelectorRequirement(nil)}: empty selector is invalid for "
        "deployment"]
    assert _messages("daemonsets", _workload({"app": "y"}, selector=sel)) == [
        'spec.template.metadata.labels: Invalid value: map[string]string{"app":"y"}: '
        "`selector` does not match template `labels`"]
    assert _messages("deployments", _workload(selector=sel, replicas=-1)) == [
        "spec.replicas: Invalid value: -1: must be greater than or equal to 0"]
    assert _messages("deployments", _workload(selector=sel, strategy={
        "type": "Recreate", "rollingUpdate": {}})) == [
        "spec.strategy.rollingUpdate: Forbidden: may not be specified when strategy `type` is "
        "'Recreate'"]
    assert _messages("deployments", _workload(selector=sel, strategy={
        "rollingUpdate": {"maxSurge": "0%", "maxUnavailable": "101%"}})) == [
        'spec.strategy.rollingUpdate.maxUnavailable: Invalid value: "101%": must not be '
        "greater than 100%"]


def test_selector_is_immutable_with_the_go_rendering() -> None:
    sel = {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a"]}]}
    old = _workload({"tier": "a"}, selector={"matchLabels": {"tier": "a"}})
    spec.defaults("deployments", old)
    assert _messages("deployments", _workload({"tier": "a"}, selector=sel), old) == [
        "spec.selector: Invalid value: v1.LabelSelector{MatchLabels:map[string]string(nil), "
        'MatchExpressions:[]v1.LabelSelectorRequirement{v1.LabelSelectorRequirement{Key:"tier", '
        'Operator:"In", Values:[]string{"a"}}}}: field is immutable']


def test_job_defaults_and_generated_selector() -> None:
    job = _workload(template=None)
    job["metadata"]["uid"] = "u-1"
    job["spec"]["template"]["spec"]["restartPolicy"] = "Never"
    spec.defaults("jobs", job)
    spec.job_selector(job)
    assert (job["spec"]["completions"], job["spec"]["parallelism"],
            job["spec"]["backoffLimit"]) == (1, 1, 6)
    assert job["spec"]["selector"] == {"matchLabels": {"batch.kubernetes.io/controller-uid":
                                                       "u-1"}}
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["job-name"] == "x" and labels["controller-uid"] == "u-1"
    assert spec.validate("jobs", job, None) == []


def test_openapi_documents_the_scale_subresource() -> None:
    from localcluster.openapi import SCALE_SCHEMA, openapi_document
    from localcluster.resources import BUILTIN

    doc = openapi_document("apps/v1", BUILTIN)
    scale = doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale"]
    assert set(scale) == {"get", "put", "patch", "parameters"}
    assert scale["patch"]["operationId"] == "patchAppsV1NamespacedDeploymentScale"
    assert scale["put"]["x-kubernetes-group-version-kind"] == {
        "group": "autoscaling", "version": "v1", "kind": "Scale"}
    assert doc["components"]["schemas"][SCALE_SCHEMA]["x-kubernetes-group-version-kind"] == [
        {"group": "autoscaling", "version": "v1", "kind": "Scale"}]
    assert "/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}/scale" not in doc["paths"]
