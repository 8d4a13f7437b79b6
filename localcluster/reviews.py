"""The answered-not-stored kinds: TokenRequest, TokenReview, the
SubjectAccessReviews that let a client ask whether it (or someone) may act, and
the self reviews that tell a client who it is (SelfSubjectReview) and all it
may do in a namespace (SelfSubjectRulesReview)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

from localcluster.auth import Attributes, Authorizer, TokenAuthority, User
from localcluster.errors import ApiError, Cause
from localcluster.registry import Registry, now_rfc3339
from localcluster.resources import BUILTIN, ResourceType

_SA = next(rt for rt in BUILTIN if rt.plural == "serviceaccounts")
_BOUND_KINDS = {"Pod": "pods", "Secret": "secrets"}
MIN_EXPIRATION = 600
DEFAULT_EXPIRATION = 3600
MAX_EXPIRATION = 2**32


def token_request(registry: Registry, tokens: TokenAuthority, namespace: str, name: str,
                  body: Any) -> dict[str, Any]:
    """Mint a token for ServiceAccount ``namespace/name`` as TokenRequest asks."""
    if not isinstance(body, Mapping):
        raise ApiError.bad_request("TokenRequest body must be a JSON object")
    sa = registry.get(_SA, namespace, name)
    spec = dict(body.get("spec") or {})
    seconds = spec.get("expirationSeconds", DEFAULT_EXPIRATION)
    causes: list[Cause] = []
    if not isinstance(seconds, int) or isinstance(seconds, bool):
        causes.append(Cause("spec.expirationSeconds", f"Invalid value: {seconds!r}: must be an "
                            "integer"))
    elif seconds < MIN_EXPIRATION:
        causes.append(Cause("spec.expirationSeconds", f"Invalid value: {seconds}: may not "
                            "specify a duration less than 10 minutes"))
    elif seconds > MAX_EXPIRATION:
        causes.append(Cause("spec.expirationSeconds", f"Invalid value: {seconds}: may not "
                            "specify a duration larger than 2^32 seconds"))
    audiences = spec.get("audiences") or list(tokens.api_audiences)
    if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
        causes.append(Cause("spec.audiences", "Invalid value: must be a list of strings"))
    bound: dict[str, Any] | None = None
    ref = spec.get("boundObjectRef")
    if ref:
        kind = ref.get("kind")
        plural = _BOUND_KINDS.get(kind or "")
        if plural is None:
            causes.append(Cause("spec.boundObjectRef.kind", f'Unsupported value: "{kind}": '
                                'supported values: "Pod", "Secret"', "FieldValueNotSupported"))
        else:
            target = registry.store.get(("", plural), namespace, ref.get("name", ""))
            if target is None:
                raise ApiError.not_found(plural, ref.get("name", ""))
            uid = target["metadata"]["uid"]
            if ref.get("uid") and ref["uid"] != uid:
                raise ApiError.conflict(plural, ref["name"], "the UID in the bound object "
                                        f"reference ({ref['uid']}) does not match the UID in "
                                        f"record ({uid}). The object might have been deleted "
                                        "and then recreated")
            bound = {"kind": kind, "name": ref["name"], "uid": uid}
    if causes:
        raise ApiError.invalid("TokenRequest", name, causes, group="authentication.k8s.io")
    token, exp = tokens.issue(
        namespace=namespace, sa_name=name, sa_uid=sa["metadata"]["uid"], audiences=audiences,
        lifetime=int(seconds), bound=bound)
    assert exp is not None
    spec["audiences"], spec["expirationSeconds"] = audiences, seconds
    if bound:
        spec["boundObjectRef"] = {"apiVersion": "v1", **bound}
    return {
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "metadata": {"name": name, "namespace": namespace,
                     "creationTimestamp": now_rfc3339(registry.clock)},
        "spec": spec,
        "status": {"token": token, "expirationTimestamp": dt.datetime.fromtimestamp(
            exp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")},
    }


def token_review(tokens: TokenAuthority, body: Any) -> dict[str, Any]:
    spec = body.get("spec") if isinstance(body, Mapping) else None
    if not isinstance(spec, Mapping) or not isinstance(spec.get("token"), str):
        raise ApiError.invalid("TokenReview", "", [Cause("spec.token", "Required value",
                                                         "FieldValueRequired")],
                               group="authentication.k8s.io")
    result = tokens.authenticate(spec["token"], spec.get("audiences") or None)
    status: dict[str, Any] = {"authenticated": result.user is not None}
    if result.user is not None:
        status["user"] = result.user.to_dict()
        status["audiences"] = list(result.audiences)
    else:
        status["user"] = {}
        status["error"] = result.error
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "metadata": {"creationTimestamp": None}, "spec": dict(spec), "status": status}


def _review_attributes(spec: Mapping[str, Any]) -> Attributes:
    res = spec.get("resourceAttributes")
    if isinstance(res, Mapping):
        return Attributes(verb=res.get("verb", ""), group=res.get("group", ""),
                          resource=res.get("resource", ""),
                          subresource=res.get("subresource", ""),
                          namespace=res.get("namespace", ""), name=res.get("name", ""))
    non = spec.get("nonResourceAttributes")
    if isinstance(non, Mapping):
        return Attributes(verb=non.get("verb", ""), path=non.get("path", ""))
    raise ApiError.invalid("SubjectAccessReview", "", [Cause(
        "spec.resourceAttributes", "Required value: exactly one of nonResourceAttributes or "
        "resourceAttributes must be specified", "FieldValueRequired")],
        group="authorization.k8s.io")


def access_review(rt: ResourceType, authorizer: Authorizer, caller: User,
                  body: Any) -> dict[str, Any]:
    spec = body.get("spec") if isinstance(body, Mapping) else None
    if not isinstance(spec, Mapping):
        raise ApiError.bad_request(f"{rt.kind} body must have a spec")
    attrs = _review_attributes(spec)
    if rt.kind == "SelfSubjectAccessReview":
        who = caller
    else:
        if not spec.get("user") and not spec.get("groups"):
            raise ApiError.invalid(rt.kind, "", [Cause("spec.user", "Invalid value: \"\": at "
                                                       "least one of user or group must be "
                                                       "specified")],
                                   group="authorization.k8s.io")
        who = User(spec.get("user", ""), uid=spec.get("uid", ""),
                   groups=tuple(spec.get("groups") or ()))
    allowed = authorizer.allowed(who, attrs)
    status: dict[str, Any] = {"allowed": allowed}
    if allowed:
        status["reason"] = "RBAC: allowed"
    return {"apiVersion": rt.api_version, "kind": rt.kind,
            "metadata": {"creationTimestamp": None}, "spec": dict(spec), "status": status}


def self_subject_review(caller: User, clock: Callable[[], float]) -> dict[str, Any]:
    """Who the caller is (after impersonation), as `kubectl auth whoami` shows it."""
    info: dict[str, Any] = {"username": caller.name}
    if caller.uid:
        info["uid"] = caller.uid
    info["groups"] = list(caller.groups)
    if caller.extra:
        info["extra"] = {k: list(v) for k, v in caller.extra.items()}
    return {"kind": "SelfSubjectReview", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": now_rfc3339(clock)}, "status": {"userInfo": info}}


def rules_review(authorizer: Authorizer, caller: User, body: Any) -> dict[str, Any]:
    """What the caller may do in a namespace, as `kubectl auth can-i --list` shows it."""
    spec = body.get("spec") if isinstance(body, Mapping) else None
    namespace = spec.get("namespace", "") if isinstance(spec, Mapping) else ""
    if not namespace:
        raise ApiError.bad_request("no namespace on request")
    resource_rules: list[dict[str, Any]] = []
    non_resource_rules: list[dict[str, Any]] = []
    for rule in authorizer.rules_for(caller, namespace):
        if rule.get("resources"):
            out: dict[str, Any] = {"verbs": list(rule.get("verbs") or [])}
            for key in ("apiGroups", "resources", "resourceNames"):
                if rule.get(key):
                    out[key] = list(rule[key])
            resource_rules.append(out)
        if rule.get("nonResourceURLs"):
            non_resource_rules.append({"verbs": list(rule.get("verbs") or []),
                                       "nonResourceURLs": list(rule["nonResourceURLs"])})
    return {"kind": "SelfSubjectRulesReview", "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": None}, "spec": {},
            "status": {"resourceRules": resource_rules, "nonResourceRules": non_resource_rules,
                       "incomplete": False}}
