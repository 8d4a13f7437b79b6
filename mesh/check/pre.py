"""``meshgate check --pre``: whether ``meshgate install`` can succeed on a cluster,
decided from what the API server answered (`PreState`).

The objects install renders (`rendered`) say what the caller must be allowed:
one ``create`` SelfSubjectAccessReview per resource and namespace (`Access`), and
the API group versions the cluster must serve. Kubernetes older than
`MIN_VERSION` is refused: meshgate's proxy is a native sidecar (an init container
with ``restartPolicy: Always``), on by default from 1.29.

Creating a Role or ClusterRole is refused by RBAC unless the caller holds every
right it grants, or may ``escalate`` roles (kube's privilege escalation
prevention), so the rights of each role install renders are asked for too
(`role_access`), unless the caller may escalate."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from mesh import manifests
from mesh.check.names import (
    INJECTOR_WEBHOOK,
    ISSUER_SECRET,
    NS,
    TRUST_ROOTS_CONFIGMAP,
)
from mesh.check.results import Category, Got, Obj, Result

MIN_VERSION = (1, 29)
"""The oldest Kubernetes meshgate supports."""
REQUIRED_APIS = ("apps/v1", "admissionregistration.k8s.io/v1")
"""Served group versions meshgate needs besides those its manifests name: the
injector is a MutatingWebhookConfiguration."""
WEBHOOK = {"apiVersion": "admissionregistration.k8s.io/v1",
           "kind": "MutatingWebhookConfiguration", "metadata": {"name": INJECTOR_WEBHOOK}}
IDENTITY_OBJECTS = ({"apiVersion": "v1", "kind": "Secret",
                     "metadata": {"name": ISSUER_SECRET, "namespace": NS}},
                    {"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": TRUST_ROOTS_CONFIGMAP, "namespace": NS}})
"""What ``install --identity-dir`` adds to deploy/'s files (their kinds matter here)."""

KUBE_API = Category("kubernetes-api")
KUBE_VERSION = Category("kubernetes-version")
SETUP = Category("pre-kubernetes-setup")


@dataclass(frozen=True, order=True)
class Access:
    """One SelfSubjectAccessReview's resourceAttributes."""

    verb: str
    group: str
    resource: str
    namespace: str = ""
    subresource: str = ""
    name: str = ""

    def describe(self) -> str:
        where = f"in namespace {self.namespace}" if self.namespace else "cluster-wide"
        return f"{self.verb} {self.target()} {where}"

    def target(self) -> str:
        """``resource.group[/subresource][ name]``, as kubectl names it."""
        resource = f"{self.resource}.{self.group}" if self.group else self.resource
        if self.subresource:
            resource += f"/{self.subresource}"
        return f"{resource} {self.name}" if self.name else resource

    def attributes(self) -> Obj:
        """The SelfSubjectAccessReview's ``spec.resourceAttributes``."""
        attributes = {"verb": self.verb, "group": self.group, "resource": self.resource,
                      "namespace": self.namespace, "subresource": self.subresource,
                      "name": self.name}
        return {k: v for k, v in attributes.items() if v or k in ("verb", "group")}


def rendered() -> list[Obj]:
    """Everything `meshgate install` renders, with --crds and --ha, and the injector."""
    docs = manifests.build(manifests.CRDS)
    docs += manifests.build(manifests.BASE, components=(manifests.HA,))
    docs += [*IDENTITY_OBJECTS]
    if not any(d["kind"] == WEBHOOK["kind"] for d in docs):
        docs.append(WEBHOOK)
    return docs


def resource_of(kind: str) -> str:
    """The resource of a kind, guessed as kubectl and Linkerd do for known kinds
    (``UnsafeGuessKindToResource``): lower case, plural."""
    lower = kind.lower()
    if lower.endswith("s"):
        return lower + "es"
    if lower.endswith("y") and lower[-2:-1] not in tuple("aeiou"):
        return lower[:-1] + "ies"
    return lower + "s"


def required_access(docs: Iterable[Obj]) -> list[tuple[str, Access]]:
    """(kind, access) for each resource and namespace of `docs`, in their order."""
    seen: dict[Access, str] = {}
    for doc in docs:
        group = doc["apiVersion"].rpartition("/")[0]
        access = Access("create", group, resource_of(doc["kind"]),
                        doc["metadata"].get("namespace", ""))
        seen.setdefault(access, doc["kind"])
    return [(kind, access) for access, kind in seen.items()]


ROLE_KINDS = {"ClusterRole": "clusterroles", "Role": "roles"}
RBAC = "rbac.authorization.k8s.io"


def roles(docs: Iterable[Obj]) -> list[Obj]:
    """The Roles and ClusterRoles among `docs`."""
    return [doc for doc in docs if doc["kind"] in ROLE_KINDS and doc["apiVersion"].startswith(
        RBAC + "/")]


def escalate_access(role: Obj) -> Access:
    """The right to create `role` without holding what it grants."""
    return Access("escalate", RBAC, ROLE_KINDS[role["kind"]],
                  role["metadata"].get("namespace", ""))


def role_access(role: Obj) -> list[Access]:
    """Each right `role` grants, at its scope (a ClusterRole's: cluster-wide)."""
    namespace = role["metadata"].get("namespace", "")
    found: list[Access] = []
    for rule in role.get("rules") or []:
        for group in rule.get("apiGroups") or []:
            for resource in rule.get("resources") or []:
                base, _, subresource = resource.partition("/")
                for verb in rule.get("verbs") or []:
                    for name in rule.get("resourceNames") or [""]:
                        found.append(Access(verb, group, base, namespace, subresource, name))
    return list(dict.fromkeys(found))


def required_apis(docs: Iterable[Obj]) -> list[str]:
    names = dict.fromkeys(doc["apiVersion"] for doc in docs)
    names.update(dict.fromkeys(REQUIRED_APIS))
    return list(names)


@dataclass(frozen=True)
class PreState:
    """What the API server answered."""

    version: Obj
    """``/version``."""
    served: frozenset[str]
    """The group versions of discovery (``v1``, ``apps/v1``, ...)."""
    apis: Sequence[str]
    """The group versions meshgate needs (`required_apis`)."""
    access: Sequence[tuple[str, Access]]
    """What the caller must be allowed (`required_access`), with the kind it is for."""
    allowed: Mapping[Access, bool | str]
    """Each review's answer: allowed or not, or why there was no answer."""
    namespace: Got
    """The control plane's Namespace."""
    roles: Sequence[Obj] = ()
    """The roles install renders; `allowed` answers `escalate_access` for each and,
    where that is refused, each of `role_access`."""


def checks(state: PreState) -> Iterator[Result]:
    yield from version_checks(state.version, state.served, state.apis)
    yield from setup_checks(state)


def parse_version(doc: Obj) -> tuple[int, int] | None:
    """(major, minor) of ``/version``; providers write minor as ``29+``."""
    try:
        major = int(re.sub(r"\D", "", str(doc.get("major", ""))))
        minor = int(re.sub(r"\D", "", str(doc.get("minor", ""))))
    except ValueError:
        match = re.match(r"v?(\d+)\.(\d+)", str(doc.get("gitVersion", "")))
        if not match:
            return None
        return int(match[1]), int(match[2])
    return major, minor


def version_checks(version: Obj, served: frozenset[str], apis: Sequence[str]
                   ) -> Iterator[Result]:
    floor = ".".join(map(str, MIN_VERSION))
    title = "is running the minimum Kubernetes API version"
    have = parse_version(version)
    shown = version.get("gitVersion") or f"{version.get('major')}.{version.get('minor')}"
    if have is None:
        yield KUBE_VERSION.fail(title, f"the API server's /version ({version}) names no "
                                "version", f"meshgate needs Kubernetes {floor} or newer")
    elif have < MIN_VERSION:
        yield KUBE_VERSION.fail(title, f"the cluster runs Kubernetes {shown}; meshgate needs "
                                f"{floor} or newer (its proxy is a native sidecar)",
                                f"upgrade the cluster to Kubernetes {floor} or newer")
    else:
        yield KUBE_VERSION.ok(title)
    title = "serves the APIs meshgate uses"
    missing = [name for name in apis if name not in served]
    if missing:
        yield KUBE_VERSION.fail(title, "the API server does not serve " + ", ".join(missing),
                                f"meshgate needs Kubernetes {floor} or newer with these API "
                                "groups enabled")
    else:
        yield KUBE_VERSION.ok(title)


def setup_checks(state: PreState) -> Iterator[Result]:
    title = "control plane namespace does not already exist"
    if state.namespace.error:  # a warning, as the check is: install may still succeed
        yield SETUP.warn(title, f"cannot read Namespace {NS}: "
                         f"{state.namespace.error}", "kubectl get namespace "
                         f"{NS} as someone who may")
    elif state.namespace.obj is not None:
        yield SETUP.warn(title, f"the Namespace {NS} already exists",
                         "install applies over what is there; if it is an old install, "
                         "`meshgate uninstall | kubectl delete -f -` first")
    else:
        yield SETUP.ok(title)
    by_kind: dict[str, list[Access]] = {}
    for kind, access in state.access:
        by_kind.setdefault(kind, []).append(access)
    for kind, accesses in by_kind.items():
        yield _may_create(kind, accesses, state.allowed)
    if state.roles:
        yield grant_check(state.roles, state.allowed)


def grant_check(rendered_roles: Sequence[Obj], allowed: Mapping[Access, bool | str]) -> Result:
    """Whether the caller holds every right the roles grant, or may escalate."""
    title = "can grant the rights of meshgate's roles"
    lines: list[str] = []
    for role in rendered_roles:
        if allowed.get(escalate_access(role)) is True:
            continue
        verbs: dict[str, list[str]] = {}
        for access in role_access(role):
            if allowed.get(access) is not True:
                verbs.setdefault(access.target(), []).append(access.verb)
        if verbs:
            namespace = role["metadata"].get("namespace")
            lines.append(f"{role['kind']} {role['metadata']['name']}"
                         + (f" in namespace {namespace}" if namespace else "")
                         + " grants what you do not hold: "
                         + "; ".join(f"{t} ({', '.join(v)})" for t, v in verbs.items()))
    if not lines:
        return SETUP.ok(title)
    return SETUP.fail(title, "\n".join(lines), "RBAC lets you create a role only with rights "
                      "you hold: install as a cluster administrator, or be granted these "
                      "rights (or the escalate verb on roles and clusterroles)")


def _may_create(kind: str, accesses: list[Access],
                allowed: Mapping[Access, bool | str]) -> Result:
    title = f"can create {kind}s"
    denied = [a for a in accesses if allowed.get(a) is False]
    unknown = [(a, answer) for a in accesses
               if not isinstance(answer := allowed.get(a, "not asked"), bool)]
    if not denied and not unknown:
        return SETUP.ok(title)
    lines = [f"not allowed to {a.describe()}" for a in denied]
    lines += [f"no answer to whether you may {a.describe()}: {why}" for a, why in unknown]
    return SETUP.fail(title, "\n".join(lines), "install as a cluster administrator, or "
                      "have one grant you these rights (a Role or ClusterRole and its binding)")
