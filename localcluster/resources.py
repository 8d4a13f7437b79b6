"""The resource types the API server knows: built-in kinds and those CRDs add.

A `ResourceType` says where a kind lives in the REST tree (group, version,
plural, scope), what it is called (kind, short names), which subresources and
field selectors it has, and where its schema comes from: the official
kubernetes client's model for built-ins, the CRD's openAPIV3Schema otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STANDARD_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
CREATE_ONLY = ("create",)


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    model: str | None = None
    """Name of the kubernetes client model class (built-ins), e.g. ``V1Service``."""
    schema: dict[str, Any] | None = field(default=None, hash=False)
    """openAPIV3Schema of a custom resource version."""
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    verbs: tuple[str, ...] = STANDARD_VERBS
    status_subresource: bool = False
    scale_subresource: bool = False
    """Serves ``<plural>/scale`` as an autoscaling/v1 Scale of ``spec.replicas``."""
    field_labels: tuple[str, ...] = ()
    """Field selector keys beyond metadata.name and metadata.namespace."""
    persisted: bool = True
    """False for review kinds (TokenReview, SubjectAccessReview): answered, never stored."""
    crd_name: str | None = None
    stored_as: tuple[str, str] | None = None
    """The (group, plural) whose storage this kind is a view of, when not its own."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_version(self) -> str:
        return self.api_version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def singular_name(self) -> str:
        return self.singular or self.kind.lower()

    @property
    def qualified_plural(self) -> str:
        """The name kube-apiserver uses in messages: ``leases.coordination.k8s.io``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def key(self) -> tuple[str, str]:
        """Storage identity: (group, plural). All versions of a group share storage."""
        return self.stored_as or (self.group, self.plural)


def _core(kind: str, plural: str, **kw: Any) -> ResourceType:
    return ResourceType(group="", version="v1", kind=kind, plural=plural, model=f"V1{kind}", **kw)


BUILTIN: tuple[ResourceType, ...] = (
    _core("Namespace", "namespaces", namespaced=False, short_names=("ns",),
          status_subresource=True, field_labels=("status.phase",)),
    _core("Service", "services", namespaced=True, short_names=("svc",), categories=("all",),
          status_subresource=True, field_labels=("spec.clusterIP", "spec.type")),
    _core("Endpoints", "endpoints", namespaced=True, short_names=("ep",)),
    _core("Pod", "pods", namespaced=True, short_names=("po",), categories=("all",),
          status_subresource=True,
          field_labels=("spec.nodeName", "spec.serviceAccountName", "status.phase",
                        "status.podIP", "spec.hostNetwork")),
    _core("Secret", "secrets", namespaced=True, field_labels=("type",)),
    _core("ConfigMap", "configmaps", namespaced=True, short_names=("cm",)),
    _core("ServiceAccount", "serviceaccounts", namespaced=True, short_names=("sa",)),
    ResourceType("", "v1", "Event", "events", namespaced=True, model="CoreV1Event",
                 short_names=("ev",),
          field_labels=("involvedObject.kind", "involvedObject.name", "involvedObject.namespace",
                        "involvedObject.uid", "reason", "type")),
    ResourceType("events.k8s.io", "v1", "Event", "events", namespaced=True,
                 model="EventsV1Event", short_names=("ev",), stored_as=("", "events"),
                 field_labels=("regarding.kind", "regarding.name", "regarding.namespace",
                               "regarding.uid", "regarding.apiVersion",
                               "regarding.resourceVersion", "regarding.fieldPath", "reason",
                               "reportingController", "type")),
    _core("Node", "nodes", namespaced=False, short_names=("no",), status_subresource=True,
          field_labels=("spec.unschedulable",)),
    *(ResourceType("apps", "v1", kind, plural, namespaced=True, model=f"V1{kind}",
                   short_names=(short,), categories=("all",), status_subresource=True,
                   scale_subresource=kind != "DaemonSet")
      for kind, plural, short in (("Deployment", "deployments", "deploy"),
                                  ("ReplicaSet", "replicasets", "rs"),
                                  ("DaemonSet", "daemonsets", "ds"),
                                  ("StatefulSet", "statefulsets", "sts"))),
    ResourceType("apps", "v1", "ControllerRevision", "controllerrevisions", namespaced=True,
                 model="V1ControllerRevision"),
    ResourceType("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets",
                 namespaced=True, model="V1PodDisruptionBudget", short_names=("pdb",),
                 status_subresource=True),
    ResourceType("batch", "v1", "Job", "jobs", namespaced=True, model="V1Job",
                 categories=("all",), status_subresource=True,
                 field_labels=("status.successful",)),
    ResourceType("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", namespaced=True,
                 model="V1EndpointSlice", field_labels=("addressType",)),
    ResourceType("coordination.k8s.io", "v1", "Lease", "leases", namespaced=True, model="V1Lease"),
    ResourceType("networking.k8s.io", "v1", "ServiceCIDR", "servicecidrs", namespaced=False,
                 model="V1ServiceCIDR", status_subresource=True),
    ResourceType("", "v1", "Binding", "bindings", namespaced=True, model="V1Binding",
                 verbs=CREATE_ONLY, persisted=False),
    ResourceType("authentication.k8s.io", "v1", "TokenReview", "tokenreviews", namespaced=False,
                 model="V1TokenReview", verbs=CREATE_ONLY, persisted=False),
    ResourceType("authentication.k8s.io", "v1", "SelfSubjectReview", "selfsubjectreviews",
                 namespaced=False, model="V1SelfSubjectReview", verbs=CREATE_ONLY,
                 persisted=False),
    ResourceType("authorization.k8s.io", "v1", "SelfSubjectRulesReview",
                 "selfsubjectrulesreviews", namespaced=False, model="V1SelfSubjectRulesReview",
                 verbs=CREATE_ONLY, persisted=False),
    ResourceType("authorization.k8s.io", "v1", "SelfSubjectAccessReview",
                 "selfsubjectaccessreviews", namespaced=False, model="V1SelfSubjectAccessReview",
                 verbs=CREATE_ONLY, persisted=False),
    ResourceType("authorization.k8s.io", "v1", "SubjectAccessReview", "subjectaccessreviews",
                 namespaced=False, model="V1SubjectAccessReview", verbs=CREATE_ONLY,
                 persisted=False),
    ResourceType("rbac.authorization.k8s.io", "v1", "Role", "roles", namespaced=True,
                 model="V1Role"),
    ResourceType("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings",
                 namespaced=True, model="V1RoleBinding"),
    ResourceType("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles",
                 namespaced=False, model="V1ClusterRole"),
    ResourceType("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings",
                 namespaced=False, model="V1ClusterRoleBinding"),
    ResourceType("apiextensions.k8s.io", "v1", "CustomResourceDefinition",
                 "customresourcedefinitions", namespaced=False,
                 model="V1CustomResourceDefinition", short_names=("crd", "crds"),
                 status_subresource=True),
    ResourceType("admissionregistration.k8s.io", "v1", "MutatingWebhookConfiguration",
                 "mutatingwebhookconfigurations", namespaced=False,
                 model="V1MutatingWebhookConfiguration", categories=("api-extensions",)),
    ResourceType("admissionregistration.k8s.io", "v1", "ValidatingWebhookConfiguration",
                 "validatingwebhookconfigurations", namespaced=False,
                 model="V1ValidatingWebhookConfiguration", categories=("api-extensions",)),
)

TOKEN_REQUEST_MODEL = "AuthenticationV1TokenRequest"
