"""Defaults and validation of the workload kinds, as kube-apiserver's apps and
batch strategies apply them on create and update, with kube's field paths and
messages (Go's ``%#v`` rendering of the offending value included, since that is
what kubectl prints)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from localcluster.errors import ApiError, Cause
from localcluster.resources import ResourceType
from localcluster.selectors import LabelSelector

APPS_KINDS = {"deployments": "deployment", "replicasets": "replicaset",
              "daemonsets": "daemonset", "statefulsets": "statefulset"}
JOB_UID_LABELS = ("batch.kubernetes.io/controller-uid", "controller-uid")
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")


def is_workload(rt: ResourceType) -> bool:
    return (rt.group == "apps" and rt.plural in APPS_KINDS) or rt.key == ("batch", "jobs")


# -- Go renderings of bad values ------------------------------------------------------


def go_string_map(d: Mapping[str, str] | None) -> str:
    if d is None:
        return "map[string]string(nil)"
    return "map[string]string{" + ", ".join(
        f"{json.dumps(k)}:{json.dumps(v)}" for k, v in sorted(d.items())) + "}"


def go_label_selector(sel: Mapping[str, Any]) -> str:
    exprs = sel.get("matchExpressions")
    if exprs is None:
        rendered = "[]v1.LabelSelectorRequirement(nil)"
    else:
        items = []
        for e in exprs:
            values = e.get("values")
            vs = "[]string(nil)" if values is None else "[]string{" + ", ".join(
                json.dumps(v) for v in values) + "}"
            items.append(f'v1.LabelSelectorRequirement{{Key:{json.dumps(e.get("key", ""))}, '
                         f'Operator:{json.dumps(e.get("operator", ""))}, Values:{vs}}}')
        rendered = "[]v1.LabelSelectorRequirement{" + ", ".join(items) + "}"
    return (f"v1.LabelSelector{{MatchLabels:{go_string_map(sel.get('matchLabels'))}, "
            f"MatchExpressions:{rendered}}}")


def go_int_or_string(value: Any) -> str:
    if isinstance(value, str):
        return f'intstr.IntOrString{{Type:1, IntVal:0, StrVal:{json.dumps(value)}}}'
    return f'intstr.IntOrString{{Type:0, IntVal:{int(value or 0)}, StrVal:""}}'


# -- defaults -------------------------------------------------------------------------


def _image_pull_policy(image: str) -> str:
    if "@" in image:
        return "IfNotPresent"
    last = image.rsplit("/", 1)[-1]
    tag = last.rsplit(":", 1)[1] if ":" in last else ""
    return "Always" if tag in ("", "latest") else "IfNotPresent"


def _container_defaults(c: dict[str, Any]) -> None:
    c.setdefault("terminationMessagePath", "/dev/termination-log")
    c.setdefault("terminationMessagePolicy", "File")
    c.setdefault("imagePullPolicy", _image_pull_policy(str(c.get("image") or "")))
    c.setdefault("resources", {})
    for port in c.get("ports") or []:
        port.setdefault("protocol", "TCP")


def template_defaults(template: dict[str, Any]) -> None:
    """SetDefaults_PodSpec and its containers', for a workload's pod template."""
    meta = template.setdefault("metadata", {})
    if meta.get("creationTimestamp", "") is None:
        del meta["creationTimestamp"]
    spec = template.setdefault("spec", {})
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        if isinstance(c, dict):
            _container_defaults(c)


def defaults(plural: str, obj: dict[str, Any]) -> None:
    spec = obj.setdefault("spec", {})
    if isinstance(spec.get("template"), dict):
        template_defaults(spec["template"])
    if plural == "deployments":
        spec.setdefault("replicas", 1)
        strategy = spec.setdefault("strategy", {})
        strategy.setdefault("type", "RollingUpdate")
        if strategy["type"] == "RollingUpdate":
            rolling = strategy.setdefault("rollingUpdate", {})
            rolling.setdefault("maxUnavailable", "25%")
            rolling.setdefault("maxSurge", "25%")
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
    elif plural in ("replicasets", "statefulsets"):
        spec.setdefault("replicas", 1)
    if plural == "daemonsets":
        strategy = spec.setdefault("updateStrategy", {})
        strategy.setdefault("type", "RollingUpdate")
        if strategy["type"] == "RollingUpdate":
            rolling = strategy.setdefault("rollingUpdate", {})
            rolling.setdefault("maxUnavailable", 1)
            rolling.setdefault("maxSurge", 0)
        spec.setdefault("revisionHistoryLimit", 10)
    elif plural == "statefulsets":
        spec.setdefault("podManagementPolicy", "OrderedReady")
        strategy = spec.setdefault("updateStrategy", {})
        strategy.setdefault("type", "RollingUpdate")
        if strategy["type"] == "RollingUpdate":
            strategy.setdefault("rollingUpdate", {}).setdefault("partition", 0)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("persistentVolumeClaimRetentionPolicy",
                        {"whenDeleted": "Retain", "whenScaled": "Retain"})
    elif plural == "jobs":
        if spec.get("completions") is None and spec.get("parallelism") is None:
            spec["completions"] = 1
        spec.setdefault("parallelism", 1)
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
        spec.setdefault("manualSelector", None)
        if spec["manualSelector"] is None:
            del spec["manualSelector"]


def job_selector(obj: dict[str, Any]) -> None:
    """kube's generated Job selector: the Job's uid, also labelled on its pod template."""
    spec = obj["spec"]
    if spec.get("manualSelector"):
        return
    meta = obj["metadata"]
    labels = spec.setdefault("template", {}).setdefault("metadata", {}).setdefault("labels", {})
    for key in JOB_UID_LABELS:
        labels[key] = meta["uid"]
    for key in JOB_NAME_LABELS:
        labels[key] = meta["name"]
    spec["selector"] = {"matchLabels": {JOB_UID_LABELS[0]: meta["uid"]}}


# -- validation -----------------------------------------------------------------------


def _nonnegative(spec: Mapping[str, Any], field: str, path: str) -> list[Cause]:
    value = spec.get(field)
    if isinstance(value, int) and value < 0:
        return [Cause(f"{path}.{field}", f"Invalid value: {value}: must be greater than or "
                      "equal to 0")]
    return []


def _template(plural: str, spec: Mapping[str, Any], selector: LabelSelector | None
              ) -> list[Cause]:
    template = spec.get("template")
    if not isinstance(template, Mapping):
        return [Cause("spec.template", "Required value", "FieldValueRequired")]
    causes: list[Cause] = []
    labels = (template.get("metadata") or {}).get("labels")
    if selector is not None and not selector.empty and not selector.matches(labels or {}):
        causes.append(Cause("spec.template.metadata.labels",
                            f"Invalid value: {go_string_map(labels)}: `selector` does not "
                            "match template `labels`"))
    pod = template.get("spec") or {}
    containers = pod.get("containers") or []
    if not containers:
        causes.append(Cause("spec.template.spec.containers", "Required value",
                            "FieldValueRequired"))
    for i, c in enumerate(containers):
        for field in ("name", "image"):
            if not c.get(field):
                causes.append(Cause(f"spec.template.spec.containers[{i}].{field}",
                                    "Required value", "FieldValueRequired"))
    policy = pod.get("restartPolicy")
    allowed = ["OnFailure", "Never"] if plural == "jobs" else ["Always"]
    if policy not in allowed:
        listed = ", ".join(json.dumps(a) for a in allowed)
        causes.append(Cause("spec.template.spec.restartPolicy",
                            f"Unsupported value: {json.dumps(policy)}: supported values: "
                            f"{listed}", "FieldValueNotSupported"))
    return causes


def _selector(plural: str, spec: Mapping[str, Any]) -> tuple[list[Cause], LabelSelector | None]:
    sel = spec.get("selector")
    if sel is None:
        return [Cause("spec.selector", "Required value", "FieldValueRequired")], None
    if not (sel.get("matchLabels") or sel.get("matchExpressions")):
        noun = "deployment" if plural == "replicasets" else APPS_KINDS.get(plural, "job")
        return [Cause("spec.selector", f"Invalid value: {go_label_selector(sel)}: empty "
                      f"selector is invalid for {noun}")], None
    try:
        return [], LabelSelector.from_label_selector(sel)
    except (ApiError, ValueError) as e:
        return [Cause("spec.selector", f"Invalid value: {go_label_selector(sel)}: "
                      f"invalid label selector: {e}")], None


def _percent_or_int(path: str, value: Any) -> list[Cause]:
    if isinstance(value, int):
        return [] if value >= 0 else [Cause(path, f"Invalid value: {value}: must be greater "
                                            "than or equal to 0")]
    text = str(value)
    if not text.endswith("%") or not text[:-1].isdigit():
        return [Cause(path, f"Invalid value: {json.dumps(text)}: a valid percent string must "
                      "be a numeric string followed by an ending '%' (e.g. '1%',  or '93%', "
                      "regex used for validation is '[0-9]+%')")]
    if int(text[:-1]) > 100:
        return [Cause(path, f"Invalid value: {json.dumps(text)}: must not be greater than "
                      "100%")]
    return []


def _zero(value: Any) -> bool:
    return value in (0, "0%")


def _strategy(spec: Mapping[str, Any]) -> list[Cause]:
    strategy = spec.get("strategy") or {}
    kind = strategy.get("type")
    rolling = strategy.get("rollingUpdate")
    if kind == "Recreate":
        if rolling is not None:
            return [Cause("spec.strategy.rollingUpdate", "Forbidden: may not be specified when "
                          "strategy `type` is 'Recreate'", "FieldValueForbidden")]
        return []
    if kind != "RollingUpdate":
        return [Cause("spec.strategy.type", f"Unsupported value: {json.dumps(kind)}: supported "
                      'values: "Recreate", "RollingUpdate"', "FieldValueNotSupported")]
    rolling = rolling or {}
    surge, unavailable = rolling.get("maxSurge", 0), rolling.get("maxUnavailable", 0)
    causes = _percent_or_int("spec.strategy.rollingUpdate.maxUnavailable", unavailable)
    causes += _percent_or_int("spec.strategy.rollingUpdate.maxSurge", surge)
    if _zero(surge) and _zero(unavailable):
        causes.append(Cause("spec.strategy.rollingUpdate.maxUnavailable",
                            f"Invalid value: {go_int_or_string(unavailable)}: may not be 0 "
                            "when `maxSurge` is 0"))
    return causes


def validate(plural: str, obj: Mapping[str, Any], old: Mapping[str, Any] | None
             ) -> list[Cause]:
    spec = obj.get("spec") or {}
    causes, selector = _selector(plural, spec)
    for field in ("replicas", "minReadySeconds", "revisionHistoryLimit", "parallelism",
                  "completions", "backoffLimit"):
        causes += _nonnegative(spec, field, "spec")
    causes += _template(plural, spec, selector)
    if plural == "deployments":
        causes += _strategy(spec)
    if old is not None:
        old_spec = old.get("spec") or {}
        immutable = ["selector"] + (["template"] if plural == "jobs" else [])
        for field in immutable:
            if spec.get(field) != old_spec.get(field):
                shown = (go_label_selector(spec.get(field) or {}) if field == "selector"
                         else json.dumps(spec.get(field), sort_keys=True))
                causes.append(Cause(f"spec.{field}", f"Invalid value: {shown}: field is "
                                    "immutable"))
    return causes


def admit(rt: ResourceType, obj: dict[str, Any], old: Mapping[str, Any] | None) -> None:
    """Default and validate a workload being written; raise kube's 422 when invalid."""
    defaults(rt.plural, obj)
    if rt.plural == "jobs" and old is None:
        job_selector(obj)
    causes = validate(rt.plural, obj, old)
    if causes:
        raise ApiError.invalid(rt.kind, obj["metadata"].get("name", ""), causes,
                               group=rt.group)


# -- policy/v1 PodDisruptionBudget ------------------------------------------------------

BUDGETS = ("policy", "poddisruptionbudgets")


def admit_budget(obj: Mapping[str, Any]) -> None:
    """kube's ValidatePodDisruptionBudget (policy/v1); raises its 422."""
    spec = obj.get("spec") or {}
    causes: list[Cause] = []
    if "minAvailable" in spec and "maxUnavailable" in spec:
        causes.append(Cause("spec", "Invalid value: policy.PodDisruptionBudgetSpec{...}: "
                            "minAvailable and maxUnavailable cannot be both set"))
    for field in ("minAvailable", "maxUnavailable"):
        if field in spec:
            causes += _percent_or_int(f"spec.{field}", spec[field])  # kube's IntOrPercent checks
    selector = spec.get("selector")
    if selector is not None:
        try:
            LabelSelector.from_label_selector(selector)
        except (ApiError, ValueError) as e:
            causes.append(Cause("spec.selector", f"Invalid value: "
                                f"{go_label_selector(selector)}: invalid label selector: {e}"))
    policy = spec.get("unhealthyPodEvictionPolicy")
    if policy not in (None, "IfHealthyBudget", "AlwaysAllow"):
        causes.append(Cause("spec.unhealthyPodEvictionPolicy", f"Unsupported value: "
                            f"{json.dumps(policy)}: supported values: \"AlwaysAllow\", "
                            "\"IfHealthyBudget\"", "FieldValueNotSupported"))
    if causes:
        raise ApiError.invalid("PodDisruptionBudget", obj["metadata"].get("name", ""), causes,
                               group="policy")
