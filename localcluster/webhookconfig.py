"""MutatingWebhookConfiguration and ValidatingWebhookConfiguration
(admissionregistration.k8s.io/v1): kube's defaults and validation of them, with
its field paths and wording (pkg/apis/admissionregistration/validation and
k8s.io/apiserver/pkg/util/webhook).

Defaults are v1's: ``failurePolicy: Fail``, ``matchPolicy: Equivalent``,
``timeoutSeconds: 10``, empty ``namespaceSelector``/``objectSelector``, rule
``scope: "*"``, service ``port: 443`` and, for mutating webhooks,
``reinvocationPolicy: Never``. ``matchConditions`` (CEL) are refused: this
server has no CEL evaluator, and admitting a condition it cannot evaluate would
call webhooks kube would skip.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from localcluster.errors import Cause
from localcluster.resources import ResourceType
from localcluster.selectors import LabelSelector

GROUP = "admissionregistration.k8s.io"
MUTATING = (GROUP, "mutatingwebhookconfigurations")
VALIDATING = (GROUP, "validatingwebhookconfigurations")
ADMISSION_REVIEW_VERSIONS = ("v1", "v1beta1")
FAILURE_POLICIES = ["Fail", "Ignore"]
MATCH_POLICIES = ["Equivalent", "Exact"]
NO_SIDE_EFFECTS = ["None", "NoneOnDryRun"]
OPERATIONS = ["*", "CONNECT", "CREATE", "DELETE", "UPDATE"]
REINVOCATION_POLICIES = ["IfNeeded", "Never"]
SCOPES = ["*", "Cluster", "Namespaced"]
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
URL_FORM = "; desired format: https://host[/path]"


def is_configuration(rt: ResourceType) -> bool:
    return rt.key in (MUTATING, VALIDATING)


def set_defaults(obj: dict[str, Any], *, mutating: bool) -> None:
    """SetDefaults_MutatingWebhook / SetDefaults_ValidatingWebhook, and their rules'."""
    for hook in obj.get("webhooks") or []:
        if not isinstance(hook, dict):
            continue
        hook.setdefault("failurePolicy", "Fail")
        hook.setdefault("matchPolicy", "Equivalent")
        hook.setdefault("namespaceSelector", {})
        hook.setdefault("objectSelector", {})
        hook.setdefault("timeoutSeconds", 10)
        if mutating:
            hook.setdefault("reinvocationPolicy", "Never")
        for rule in hook.get("rules") or []:
            if isinstance(rule, dict):
                rule.setdefault("scope", "*")
        service = (hook.get("clientConfig") or {}).get("service")
        if isinstance(service, dict):
            service.setdefault("port", 443)


def _invalid(path: str, value: Any, why: str, *, go_type: str = "[]string") -> Cause:
    """field.Invalid's message; a list is printed as Go's %#v prints the internal type."""
    if isinstance(value, list):
        shown = f"{go_type}{{{', '.join(json.dumps(v) for v in value)}}}"
    else:
        shown = json.dumps(value)
    return Cause(path, f"Invalid value: {shown}: {why}")


def _required(path: str, detail: str = "") -> Cause:
    return Cause(path, f"Required value: {detail}" if detail else "Required value",
                 "FieldValueRequired")


def _unsupported(path: str, value: Any, allowed: list[str]) -> Cause:
    listed = ", ".join(json.dumps(a) for a in allowed)
    return Cause(path, f"Unsupported value: {json.dumps(value)}: supported values: {listed}",
                 "FieldValueNotSupported")


def _validate_resources(resources: list[Any], path: str) -> list[Cause]:
    causes: list[Cause] = []
    if not resources:
        causes.append(_required(path))
    with_wild_sub: set[str] = set()
    wild_res_subs: set[str] = set()
    has_double = has_single = has_plain = False
    for i, res_sub in enumerate(resources):
        if res_sub == "":
            causes.append(_required(f"{path}[{i}]"))
            continue
        has_double = has_double or res_sub == "*/*"
        has_single = has_single or res_sub == "*"
        res, slash, sub = str(res_sub).partition("/")
        if not slash:
            has_plain = res_sub != "*"
            continue
        if res in with_wild_sub:
            causes.append(_invalid(f"{path}[{i}]", res_sub,
                                   f"if '{res}/*' is present, must not specify {res_sub}"))
        if sub in wild_res_subs:
            causes.append(_invalid(f"{path}[{i}]", res_sub,
                                   f"if '*/{sub}' is present, must not specify {res_sub}"))
        if sub == "*":
            with_wild_sub.add(res)
        if res == "*":
            wild_res_subs.add(sub)
    if len(resources) > 1 and has_double:
        causes.append(_invalid(path, resources,
                               "if '*/*' is present, must not specify other resources"))
    if has_single and has_plain:
        causes.append(_invalid(path, resources, "if '*' is present, must not specify other "
                               "resources without subresources"))
    return causes


def _validate_rule(rule: Mapping[str, Any], path: str) -> list[Cause]:
    causes: list[Cause] = []
    operations = rule.get("operations") or []
    if not operations:
        causes.append(_required(f"{path}.operations"))
    if len(operations) > 1 and "*" in operations:
        causes.append(_invalid(f"{path}.operations", operations,
                               "if '*' is present, must not specify other operations",
                               go_type="[]admissionregistration.OperationType"))
    for i, op in enumerate(operations):
        if op not in OPERATIONS:
            causes.append(_unsupported(f"{path}.operations[{i}]", op, OPERATIONS))
    groups = rule.get("apiGroups") or []
    if not groups:
        causes.append(_required(f"{path}.apiGroups"))
    if len(groups) > 1 and "*" in groups:
        causes.append(_invalid(f"{path}.apiGroups", groups,
                               "if '*' is present, must not specify other API groups"))
    versions = rule.get("apiVersions") or []
    if not versions:
        causes.append(_required(f"{path}.apiVersions"))
    if len(versions) > 1 and "*" in versions:
        causes.append(_invalid(f"{path}.apiVersions", versions,
                               "if '*' is present, must not specify other API versions"))
    causes += [_required(f"{path}.apiVersions[{i}]") for i, v in enumerate(versions) if v == ""]
    causes += _validate_resources(rule.get("resources") or [], f"{path}.resources")
    scope = rule.get("scope")
    if scope is not None and scope not in SCOPES:
        causes.append(_unsupported(f"{path}.scope", scope, SCOPES))
    return causes


def _validate_review_versions(versions: list[Any], path: str) -> list[Cause]:
    accepted = ", ".join(ADMISSION_REVIEW_VERSIONS)
    if not versions:
        return [_required(path, f"must specify one of {accepted}")]
    causes: list[Cause] = []
    seen: set[str] = set()
    for i, v in enumerate(versions):
        if v in seen:
            causes.append(_invalid(f"{path}[{i}]", v, "duplicate version"))
            continue
        seen.add(v)
        if not DNS1035_LABEL.match(str(v)) or len(str(v)) > 63:
            causes.append(_invalid(
                f"{path}[{i}]", v, "a DNS-1035 label must consist of lower case alphanumeric "
                "characters or '-', start with an alphabetic character, and end with an "
                "alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for "
                "validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"))
    if not seen & set(ADMISSION_REVIEW_VERSIONS):
        causes.append(_invalid(path, versions, f"must include at least one of {accepted}"))
    return causes


def _validate_url(url: str, path: str) -> list[Cause]:
    try:
        parts = urlsplit(url)
    except ValueError as e:
        return [_required(path, f"url must be a valid URL: {e}{URL_FORM}")]
    causes: list[Cause] = []
    if parts.scheme != "https":
        causes.append(_invalid(path, parts.scheme, "'https' is the only allowed URL scheme"
                               + URL_FORM))
    if not parts.netloc:
        causes.append(_invalid(path, parts.netloc, "host must be specified" + URL_FORM))
    if "@" in parts.netloc:
        causes.append(_invalid(path, parts.netloc.rpartition("@")[0],
                               "user information is not permitted in the URL"))
    if parts.fragment:
        causes.append(_invalid(path, parts.fragment, "fragments are not permitted in the URL"))
    if parts.query:
        causes.append(_invalid(path, parts.query, "query parameters are not permitted in the URL"))
    return causes


def _validate_service(service: Mapping[str, Any], path: str) -> list[Cause]:
    causes: list[Cause] = []
    if not service.get("name"):
        causes.append(_required(f"{path}.name"))
    if not service.get("namespace"):
        causes.append(_required(f"{path}.namespace"))
    port = service.get("port", 443)
    if not isinstance(port, int) or not 1 <= port <= 65535:
        causes.append(_invalid(f"{path}.port", port, "port is not valid: must be between 1 "
                               "and 65535, inclusive"))
    url_path = service.get("path")
    if url_path in (None, "", "/"):
        return causes
    if url_path == "//":
        return [*causes, _invalid(f"{path}.path", url_path, "segment[0] may not be empty")]
    if not url_path.startswith("/"):
        causes.append(_invalid(f"{path}.path", url_path, "must start with a '/'"))
    for i, step in enumerate(url_path[1:].removesuffix("/").split("/")):
        if not step:
            causes.append(_invalid(f"{path}.path", url_path, f"segment[{i}] may not be empty"))
        elif len(step) > 253 or not DNS1123_SUBDOMAIN.match(step):
            causes.append(_invalid(
                f"{path}.path", url_path, f"segment[{i}]: a lowercase RFC 1123 subdomain must "
                "consist of lower case alphanumeric characters, '-' or '.', and must start and "
                "end with an alphanumeric character (e.g. 'example.com', regex used for "
                "validation is "
                "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"))
    return causes


def _validate_selector(sel: Any, path: str) -> list[Cause]:
    try:
        LabelSelector.from_label_selector(sel if sel is not None else {})
    except Exception as e:  # the selector parser's ApiError or ValueError, reported as a cause
        return [_invalid(path, sel, str(e))]
    return []


def _validate_webhook(hook: Mapping[str, Any], path: str, *, mutating: bool) -> list[Cause]:
    causes: list[Cause] = []
    name = str(hook.get("name") or "")
    if not name:
        causes.append(_required(f"{path}.name"))
    elif "." not in name or not DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
        why = ("should be a domain with at least three segments separated by dots"
               if DNS1123_SUBDOMAIN.match(name) else
               "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
               "characters, '-' or '.', and must start and end with an alphanumeric character "
               "(e.g. 'example.com', regex used for validation is "
               "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")
        causes.append(_invalid(f"{path}.name", name, why))
    elif name.count(".") < 2:
        causes.append(_invalid(f"{path}.name", name,
                               "should be a domain with at least three segments separated by "
                               "dots"))
    for i, rule in enumerate(hook.get("rules") or []):
        causes += _validate_rule(rule, f"{path}.rules[{i}]")
    for key, allowed in (("failurePolicy", FAILURE_POLICIES), ("matchPolicy", MATCH_POLICIES)):
        if hook.get(key) is not None and hook[key] not in allowed:
            causes.append(_unsupported(f"{path}.{key}", hook[key], allowed))
    side_effects = hook.get("sideEffects")
    if side_effects is None:
        causes.append(_required(f"{path}.sideEffects",
                                f"must specify one of {', '.join(NO_SIDE_EFFECTS)}"))
    elif side_effects not in NO_SIDE_EFFECTS:
        causes.append(_unsupported(f"{path}.sideEffects", side_effects, NO_SIDE_EFFECTS))
    timeout = hook.get("timeoutSeconds")
    if timeout is not None and not 1 <= timeout <= 30:
        causes.append(_invalid(f"{path}.timeoutSeconds", timeout,
                               "the timeout value must be between 1 and 30 seconds"))
    for key in ("namespaceSelector", "objectSelector"):
        if hook.get(key) is not None:
            causes += _validate_selector(hook[key], f"{path}.{key}")
    policy = hook.get("reinvocationPolicy")
    if mutating and policy is not None and policy not in REINVOCATION_POLICIES:
        causes.append(_unsupported(f"{path}.reinvocationPolicy", policy, REINVOCATION_POLICIES))
    cc = hook.get("clientConfig") or {}
    if (cc.get("url") is None) == (cc.get("service") is None):
        causes.append(_required(f"{path}.clientConfig",
                                "exactly one of url or service is required"))
    elif cc.get("url") is not None:
        causes += _validate_url(str(cc["url"]), f"{path}.clientConfig.url")
    else:
        causes += _validate_service(cc["service"], f"{path}.clientConfig.service")
    if hook.get("matchConditions"):
        causes.append(Cause(f"{path}.matchConditions", "Forbidden: matchConditions (CEL) are "
                            "not supported by this API server", "FieldValueForbidden"))
    causes += _validate_review_versions(hook.get("admissionReviewVersions") or [],
                                        f"{path}.admissionReviewVersions")
    return causes


def validate(rt: ResourceType, obj: Mapping[str, Any]) -> list[Cause]:
    """The causes kube's ValidateMutating/ValidatingWebhookConfiguration gives (beyond
    metadata, which `validate` checks for every kind)."""
    if not is_configuration(rt):
        return []
    mutating = rt.key == MUTATING
    causes: list[Cause] = []
    names: set[str] = set()
    for i, hook in enumerate(obj.get("webhooks") or []):
        path = f"webhooks[{i}]"
        causes += _validate_webhook(hook, path, mutating=mutating)
        name = hook.get("name")
        if name:
            if name in names:
                causes.append(Cause(f"{path}.name", f"Duplicate value: {json.dumps(name)}",
                                    "FieldValueDuplicate"))
            names.add(name)
    return causes
