"""Who is calling, and may they: bearer-token authentication, ServiceAccount
tokens (TokenRequest and legacy Secret tokens) and RBAC authorization.

ServiceAccount tokens are ES256 JWTs shaped like kube-apiserver's: issuer,
``system:serviceaccount:<ns>:<name>`` subject, audiences, expiry and the
``kubernetes.io`` claim binding them to the ServiceAccount's uid (and to a Pod
or Secret when bound). A token stops authenticating when what it is bound to is
deleted. RBAC follows kube's rules exactly, and denials use kube-apiserver's
wording, so that clients print the message users know.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

Lookup = Callable[[tuple[str, str], str, str], Mapping[str, Any] | None]
"""(group, plural), namespace, name -> stored object or None."""

ADMIN_USER = "meshgate-admin"


@dataclass(frozen=True)
class User:
    name: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"username": self.name, "groups": list(self.groups)}
        if self.uid:
            out["uid"] = self.uid
        if self.extra:
            out["extra"] = dict(self.extra)
        return out


ANONYMOUS = User("system:anonymous", groups=("system:unauthenticated",))


@dataclass(frozen=True)
class TokenResult:
    user: User | None
    audiences: tuple[str, ...] = ()
    error: str = ""


class TokenAuthority:
    """Issues and verifies the cluster's bearer tokens."""

    def __init__(
        self, *, issuer: str, key: ec.EllipticCurvePrivateKey, admin_token: str, lookup: Lookup,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuer = issuer
        self.api_audiences = (issuer,)
        self._key = key
        self._public = key.public_key()
        self._admin_token = admin_token
        self._lookup = lookup
        self._clock = clock

    def issue(
        self, *, namespace: str, sa_name: str, sa_uid: str, audiences: Iterable[str],
        lifetime: int | None, bound: Mapping[str, Any] | None = None,
    ) -> tuple[str, int | None]:
        """A signed token and its expiry (epoch seconds), or no expiry for legacy tokens."""
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": f"system:serviceaccount:{namespace}:{sa_name}",
            "aud": list(audiences) or list(self.api_audiences),
            "iat": now, "nbf": now, "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": sa_name, "uid": sa_uid},
            },
        }
        exp = None
        if lifetime is not None:
            exp = now + lifetime
            claims["exp"] = exp
        if bound:
            claims["kubernetes.io"][bound["kind"].lower()] = {
                "name": bound["name"], "uid": bound.get("uid", ""),
            }
        token = jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": "meshgate"})
        return token, exp

    def authenticate(self, token: str, audiences: Iterable[str] | None = None) -> TokenResult:
        """Resolve a bearer token to a user; ``audiences`` defaults to the API server's own."""
        wanted = tuple(audiences) if audiences else self.api_audiences
        if secrets.compare_digest(token.encode(), self._admin_token.encode()):
            return TokenResult(
                User(ADMIN_USER, groups=("system:masters", "system:authenticated")), wanted
            )
        try:
            claims = jwt.decode(
                token, self._public, algorithms=["ES256"], issuer=self.issuer,
                options={"verify_aud": False, "verify_exp": False, "verify_nbf": False},
            )
        except jwt.PyJWTError as e:
            return TokenResult(None, error=f"invalid bearer token: {e}")
        now = self._clock()
        if "exp" in claims and now >= float(claims["exp"]):
            return TokenResult(None, error="invalid bearer token, token has expired")
        aud = claims.get("aud")
        token_aud = [aud] if isinstance(aud, str) else list(aud or [])
        matched = tuple(a for a in wanted if a in token_aud)
        if not matched:
            return TokenResult(None, error="invalid bearer token, token audiences "
                               f"{token_aud} is invalid for the target audiences {list(wanted)}")
        info = claims.get("kubernetes.io") or {}
        ns = info.get("namespace", "")
        sa = info.get("serviceaccount") or {}
        stored = self._lookup(("", "serviceaccounts"), ns, sa.get("name", ""))
        if stored is None or stored["metadata"].get("uid") != sa.get("uid"):
            return TokenResult(None, error="invalid bearer token, service account "
                               f"{ns}/{sa.get('name', '')} has been deleted")
        extra: dict[str, list[str]] = {}
        for kind, plural in (("pod", "pods"), ("secret", "secrets")):
            ref = info.get(kind)
            if ref:
                obj = self._lookup(("", plural), ns, ref.get("name", ""))
                if obj is None or (ref.get("uid") and obj["metadata"].get("uid") != ref["uid"]):
                    return TokenResult(None, error=f"invalid bearer token, {kind} "
                                       f"{ns}/{ref.get('name', '')} has been deleted")
                if kind == "pod":
                    extra["authentication.kubernetes.io/pod-name"] = [ref["name"]]
                    extra["authentication.kubernetes.io/pod-uid"] = [ref.get("uid", "")]
        if "jti" in claims and "exp" in claims:
            extra["authentication.kubernetes.io/credential-id"] = [f"JTI={claims['jti']}"]
        user = User(
            claims["sub"], uid=sa.get("uid", ""),
            groups=("system:serviceaccounts", f"system:serviceaccounts:{ns}",
                    "system:authenticated"),
            extra=extra,
        )
        return TokenResult(user, matched)


# -- RBAC ------------------------------------------------------------------------


@dataclass(frozen=True)
class Attributes:
    """What a request asks to do, as RBAC sees it."""

    verb: str
    group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""
    """Set instead of resource for non-resource URLs such as /version."""

    @property
    def is_resource(self) -> bool:
        return not self.path


def _rule_allows(rule: Mapping[str, Any], attrs: Attributes) -> bool:
    verbs = rule.get("verbs") or []
    if "*" not in verbs and attrs.verb not in verbs:
        return False
    if not attrs.is_resource:
        urls = rule.get("nonResourceURLs") or []
        return any(
            u == "*" or u == attrs.path or (u.endswith("*") and attrs.path.startswith(u[:-1]))
            for u in urls
        )
    groups = rule.get("apiGroups")
    if groups is None or ("*" not in groups and attrs.group not in groups):
        return False
    resources = rule.get("resources") or []
    full = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    if not any(
        r == "*" or r == full or (attrs.subresource and r == f"*/{attrs.subresource}")
        for r in resources
    ):
        return False
    names = rule.get("resourceNames") or []
    return not names or attrs.name in names


def _subject_matches(subject: Mapping[str, Any], user: User, binding_ns: str) -> bool:
    kind = subject.get("kind")
    if kind == "User":
        return bool(subject.get("name") == user.name)
    if kind == "Group":
        return subject.get("name") in user.groups
    if kind == "ServiceAccount":
        ns = subject.get("namespace") or binding_ns
        return user.name == f"system:serviceaccount:{ns}:{subject.get('name')}"
    return False


class Authorizer:
    """RBAC over the stored Roles, ClusterRoles and their bindings."""

    def __init__(self, items: Callable[[tuple[str, str], str | None], Iterable[Mapping[str, Any]]],
                 lookup: Lookup) -> None:
        self._items = items
        self._lookup = lookup

    def _role_rules(self, ref: Mapping[str, Any], namespace: str) -> list[Mapping[str, Any]]:
        if ref.get("kind") == "ClusterRole":
            role = self._lookup(("rbac.authorization.k8s.io", "clusterroles"), "", ref["name"])
        else:
            role = self._lookup(("rbac.authorization.k8s.io", "roles"), namespace, ref["name"])
        return list((role or {}).get("rules") or [])

    def allowed(self, user: User, attrs: Attributes) -> bool:
        if "system:masters" in user.groups:
            return True
        for crb in self._items(("rbac.authorization.k8s.io", "clusterrolebindings"), None):
            if any(_subject_matches(s, user, "") for s in crb.get("subjects") or []) and any(
                _rule_allows(r, attrs) for r in self._role_rules(crb["roleRef"], "")
            ):
                return True
        if attrs.is_resource and attrs.namespace:
            rbs = self._items(("rbac.authorization.k8s.io", "rolebindings"), attrs.namespace)
            for rb in rbs:
                if any(
                    _subject_matches(s, user, attrs.namespace) for s in rb.get("subjects") or []
                ) and any(
                    _rule_allows(r, attrs)
                    for r in self._role_rules(rb["roleRef"], attrs.namespace)
                ):
                    return True
        return False

    def rules_for(self, user: User, namespace: str) -> list[Mapping[str, Any]]:
        """Every RBAC rule that applies to ``user`` in ``namespace`` (cluster-wide ones
        first), as kube's rule resolver visits them."""
        rules: list[Mapping[str, Any]] = []
        for crb in self._items(("rbac.authorization.k8s.io", "clusterrolebindings"), None):
            if any(_subject_matches(s, user, "") for s in crb.get("subjects") or []):
                rules += self._role_rules(crb["roleRef"], "")
        if namespace:
            for rb in self._items(("rbac.authorization.k8s.io", "rolebindings"), namespace):
                if any(_subject_matches(s, user, namespace) for s in rb.get("subjects") or []):
                    rules += self._role_rules(rb["roleRef"], namespace)
        return rules


def forbidden_message(user: User, attrs: Attributes) -> str:
    """kube-apiserver's wording for an RBAC denial."""
    if not attrs.is_resource:
        return f'forbidden: User "{user.name}" cannot {attrs.verb} path "{attrs.path}"'
    qualified = f"{attrs.resource}.{attrs.group}" if attrs.group else attrs.resource
    subject = f'{qualified} "{attrs.name}"' if attrs.name else qualified
    full = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    scope = (f'in the namespace "{attrs.namespace}"' if attrs.namespace
             else "at the cluster scope")
    return (f'{subject} is forbidden: User "{user.name}" cannot {attrs.verb} resource '
            f'"{full}" in API group "{attrs.group}" {scope}')


AUTOUPDATE = "rbac.authorization.kubernetes.io/autoupdate"
"""On a default role or binding: "true" (the default) lets each start add what a newer
server's defaults hold to it; "false" leaves it as the administrator made it."""


def reconciled(current: Mapping[str, Any], default: Mapping[str, Any]
               ) -> dict[str, Any] | None:
    """`current` with what the default `default` holds and it lacks (rules of a role,
    subjects of a binding), as kube-apiserver reconciles its bootstrap policy on every
    start: nothing is taken away, and an object annotated autoupdate "false" is left
    alone. None when nothing is to change."""
    annotations = (current.get("metadata") or {}).get("annotations") or {}
    if annotations.get(AUTOUPDATE) == "false":
        return None
    field = "rules" if default.get("kind") == "ClusterRole" else "subjects"
    have = list(current.get(field) or [])
    missing = [item for item in default.get(field) or [] if item not in have]
    if not missing and AUTOUPDATE in annotations:
        return None
    updated = {**current, field: have + missing}
    meta = dict(current.get("metadata") or {})
    meta["annotations"] = {**annotations, AUTOUPDATE: annotations.get(AUTOUPDATE, "true")}
    updated["metadata"] = meta
    return updated


def bootstrap_rbac() -> list[dict[str, Any]]:
    """The default roles every cluster starts with (a subset of kube's bootstrap policy)."""
    rbac = "rbac.authorization.k8s.io/v1"
    labels = {"kubernetes.io/bootstrapping": "rbac-defaults"}
    annotations = {AUTOUPDATE: "true"}

    def role(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
        return {"apiVersion": rbac, "kind": "ClusterRole",
                "metadata": {"name": name, "labels": labels, "annotations": annotations},
                "rules": rules}

    def binding(name: str, group: str) -> dict[str, Any]:
        return {"apiVersion": rbac, "kind": "ClusterRoleBinding",
                "metadata": {"name": name, "labels": labels, "annotations": annotations},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                            "name": name},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                              "name": group}]}

    read = ["get", "list", "watch"]
    return [
        role("cluster-admin", [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                               {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
        binding("cluster-admin", "system:masters"),
        role("system:discovery", [{"nonResourceURLs": [
            "/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/readyz",
            "/openapi", "/openapi/*", "/version", "/version/"], "verbs": ["get"]}]),
        binding("system:discovery", "system:authenticated"),
        role("system:public-info-viewer", [{"nonResourceURLs": [
            "/healthz", "/livez", "/readyz", "/version", "/version/"], "verbs": ["get"]}]),
        binding("system:public-info-viewer", "system:authenticated"),
        role("system:basic-user", [{"apiGroups": ["authorization.k8s.io"],
                                    "resources": ["selfsubjectaccessreviews",
                                                  "selfsubjectrulesreviews"],
                                    "verbs": ["create"]},
                                   {"apiGroups": ["authentication.k8s.io"],
                                    "resources": ["selfsubjectreviews"],
                                    "verbs": ["create"]}]),
        binding("system:basic-user", "system:authenticated"),
        role("system:auth-delegator", [
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
             "verbs": ["create"]},
            {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"],
             "verbs": ["create"]}]),
        role("view", [{"apiGroups": ["", "discovery.k8s.io", "coordination.k8s.io"],
                       "resources": ["services", "endpoints", "endpointslices", "pods",
                                     "configmaps", "serviceaccounts", "namespaces", "leases",
                                     "events"], "verbs": read}]),
    ]
