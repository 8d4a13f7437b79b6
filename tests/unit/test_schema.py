"""Built-in schemas and `check`: pruning, defaulting and validation the way kube does it."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localcluster.errors import ApiError, Cause
from localcluster.resources import BUILTIN
from localcluster.schema import Checked, builtin_schema, check

META = {"name": "x", "namespace": "default", "labels": {"app": "x"},
        "annotations": {"note": "y"}, "uid": "4f0c6bd2-7a1b-4e32-9b5e-1b0a3c5d6e7f",
        "resourceVersion": "12", "creationTimestamp": "2024-05-01T10:00:00Z",
        "finalizers": ["meshgate.io/cleanup"],
        "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web",
                             "uid": "1b0a3c5d", "controller": True}]}

SAMPLES: dict[str, dict[str, Any]] = {
    "Namespace": {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mesh"},
                  "spec": {"finalizers": ["kubernetes"]},
                  "status": {"phase": "Active", "conditions": [
                      {"type": "NamespaceDeletionContentFailure", "status": "False",
                       "lastTransitionTime": "2024-05-01T10:00:00Z"}]}},
    "Service": {
        "apiVersion": "v1", "kind": "Service", "metadata": META,
        "spec": {"type": "LoadBalancer", "selector": {"app": "web"},
                 "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                 "sessionAffinity": "None", "externalTrafficPolicy": "Cluster",
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP",
                            "nodePort": 30080, "appProtocol": "http"},
                           {"name": "grpc", "port": 9090, "targetPort": 9090}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "172.18.0.10", "ipMode": "VIP"}]},
                   "conditions": [{"type": "Ready", "status": "True", "reason": "Ok",
                                   "message": "", "lastTransitionTime": "2024-05-01T10:00:00Z"}]},
    },
    "Endpoints": {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "web"},
                  "subsets": [{"addresses": [{"ip": "10.0.0.5", "targetRef": {
                      "kind": "Pod", "name": "web-1", "namespace": "default"}}],
                      "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}]},
    "Pod": {
        "apiVersion": "v1", "kind": "Pod", "metadata": META,
        "spec": {
            "serviceAccountName": "web", "nodeName": "node-1", "restartPolicy": "Always",
            "initContainers": [{"name": "init", "image": "busybox", "command": ["true"]}],
            "containers": [{
                "name": "web", "image": "nginx:1.27", "imagePullPolicy": "IfNotPresent",
                "args": ["-g", "daemon off;"],
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "MODE", "value": "prod"},
                        {"name": "POD_IP",
                         "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "resources": {"limits": {"cpu": 1, "memory": "256Mi"},
                              "requests": {"cpu": "100m", "memory": 0.5}},
                "volumeMounts": [{"name": "config", "mountPath": "/etc/web", "readOnly": True}],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"},
                                   "periodSeconds": 5},
                "livenessProbe": {"tcpSocket": {"port": 8080}},
                "securityContext": {"runAsNonRoot": True, "runAsUser": 1000,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
            "volumes": [{"name": "config", "configMap": {"name": "web", "items": [
                {"key": "a", "path": "a.conf"}]}},
                {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
            "tolerations": [{"key": "k", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
        },
        "status": {"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}],
                   "startTime": "2024-05-01T10:00:00Z",
                   "conditions": [{"type": "Ready", "status": "True"}],
                   "containerStatuses": [{"name": "web", "image": "nginx:1.27", "imageID": "",
                                          "ready": True, "restartCount": 0,
                                          "state": {"running": {
                                              "startedAt": "2024-05-01T10:00:01Z"}}}]},
    },
    "Secret": {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
               "type": "Opaque", "data": {"token": "c2VjcmV0"}, "stringData": {"k": "v"}},
    "ConfigMap": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
                  "data": {"a.conf": "x = 1\n"}, "binaryData": {"b": "AAEC"}},
    "ServiceAccount": {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sa"},
                       "secrets": [{"name": "sa-token"}], "imagePullSecrets": [{"name": "reg"}],
                       "automountServiceAccountToken": False},
    "Event": {"apiVersion": "v1", "kind": "Event", "metadata": {"name": "web.1", "namespace": "d"},
              "involvedObject": {"kind": "Service", "name": "web", "namespace": "d",
                                 "uid": "u", "apiVersion": "v1"},
              "reason": "Mirrored", "message": "mirrored from east", "type": "Normal",
              "count": 2, "firstTimestamp": "2024-05-01T10:00:00Z",
              "lastTimestamp": "2024-05-01T10:00:00Z",
              "eventTime": "2024-05-01T10:00:00.123456Z",
              "source": {"component": "meshgate-mirror"}, "reportingComponent": "meshgate"},
    "events.k8s.io/Event": {
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"name": "web.2", "namespace": "d"},
        "regarding": {"kind": "Service", "name": "web", "namespace": "d", "uid": "u",
                      "apiVersion": "v1"},
        "reason": "Mirrored", "note": "mirrored from east", "type": "Normal", "action": "Mirror",
        "eventTime": "2024-05-01T10:00:00.123456Z", "reportingController": "meshgate/mirror",
        "reportingInstance": "mirror-1",
        "series": {"count": 2, "lastObservedTime": "2024-05-01T10:01:00.000000Z"}},
    "EndpointSlice": {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.5"], "conditions": {"ready": True, "serving": True,
                                                                "terminating": False},
                       "nodeName": "node-1", "zone": "a", "hints": {"forZones": [{"name": "a"}]},
                       "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "default"}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}],
    },
    "ServiceCIDR": {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
                    "metadata": {"name": "kubernetes"},
                    "spec": {"cidrs": ["10.96.0.0/16"]},
                    "status": {"conditions": [{
                        "type": "Ready", "status": "True", "reason": "", "message": "",
                        "lastTransitionTime": "2024-05-01T10:00:00Z"}]}},
    "Lease": {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
              "metadata": {"name": "mirror"},
              "spec": {"holderIdentity": "mirror-0", "leaseDurationSeconds": 15,
                       "acquireTime": "2024-05-01T10:00:00.000000Z",
                       "renewTime": "2024-05-01T10:00:05.000000Z", "leaseTransitions": 1}},
    "Binding": {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"},
                "target": {"apiVersion": "v1", "kind": "Node", "name": "c-control-plane"}},
    "TokenReview": {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                    "spec": {"token": "abc", "audiences": ["meshgate"]},
                    "status": {"authenticated": True, "audiences": ["meshgate"],
                               "user": {"username": "system:serviceaccount:d:sa",
                                        "groups": ["system:serviceaccounts"],
                                        "extra": {"k": ["v"]}}}},
    "SelfSubjectAccessReview": {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"verb": "get", "resource": "services",
                                        "namespace": "d"}},
        "status": {"allowed": True}},
    "SelfSubjectReview": {
        "apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview",
        "status": {"userInfo": {"username": "alice", "uid": "u-1",
                                "groups": ["dev", "system:authenticated"],
                                "extra": {"scopes": ["a"]}}}},
    "SelfSubjectRulesReview": {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
        "spec": {"namespace": "d"},
        "status": {"resourceRules": [{"verbs": ["get", "list"], "apiGroups": [""],
                                      "resources": ["pods"], "resourceNames": ["web"]}],
                   "nonResourceRules": [{"verbs": ["get"], "nonResourceURLs": ["/healthz"]}],
                   "incomplete": False}},
    "SubjectAccessReview": {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": "alice", "groups": ["dev"], "extra": {"scopes": ["a"]},
                 "nonResourceAttributes": {"path": "/healthz", "verb": "get"}},
        "status": {"allowed": False, "reason": "no"}},
    "Role": {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": "r", "namespace": "d"},
             "rules": [{"apiGroups": [""], "resources": ["services"],
                        "verbs": ["get", "list", "watch"], "resourceNames": ["web"]}]},
    "RoleBinding": {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                    "metadata": {"name": "rb", "namespace": "d"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                "name": "r"},
                    "subjects": [{"kind": "ServiceAccount", "name": "sa", "namespace": "d"}]},
    "ClusterRole": {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "meshgate-mirror"},
        "rules": [{"apiGroups": ["", "discovery.k8s.io"],
                   "resources": ["services", "endpointslices"], "verbs": ["*"]},
                  {"nonResourceURLs": ["/healthz"], "verbs": ["get"]}],
        "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"agg": "true"}}]}},
    "ClusterRoleBinding": {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "crb"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "meshgate-mirror"},
        "subjects": [{"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}]},
    "CustomResourceDefinition": {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "links.multicluster.meshgate.io"},
        "spec": {"group": "multicluster.meshgate.io", "scope": "Namespaced",
                 "names": {"plural": "links", "singular": "link", "kind": "Link",
                           "listKind": "LinkList", "shortNames": ["lk"]},
                 "versions": [{"name": "v1alpha1", "served": True, "storage": True,
                               "subresources": {"status": {}},
                               "additionalPrinterColumns": [{
                                   "name": "Age", "type": "date",
                                   "jsonPath": ".metadata.creationTimestamp"}],
                               "schema": {"openAPIV3Schema": {
                                   "type": "object",
                                   "properties": {"spec": {"type": "object", "properties": {
                                       "port": {"x-kubernetes-int-or-string": True},
                                       "deep": {"type": "object", "properties": {"a": {
                                           "type": "array", "items": {"type": "string",
                                                                      "enum": ["x"]}}}}},
                                       "x-kubernetes-validations": [{"rule": "true"}]}}}}}]},
        "status": {"acceptedNames": {"plural": "links", "kind": "Link"},
                   "storedVersions": ["v1alpha1"],
                   "conditions": [{"type": "Established", "status": "True",
                                   "lastTransitionTime": "2024-05-01T10:00:00Z"}]}},
    "Node": {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "c-control-plane", "labels": {"kubernetes.io/os": "linux"}},
        "spec": {"unschedulable": False, "taints": [{"key": "k", "effect": "NoSchedule"}]},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.2"}],
                   "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                   "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                   "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                   "lastHeartbeatTime": "2024-05-01T10:00:00Z"}],
                   "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                   "nodeInfo": {"machineID": "m", "systemUUID": "s", "bootID": "b",
                                "kernelVersion": "6.1", "osImage": "Debian",
                                "containerRuntimeVersion": "meshgate://1",
                                "kubeletVersion": "v1.32.0", "kubeProxyVersion": "",
                                "operatingSystem": "linux", "architecture": "amd64"}}},
    "Deployment": {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "strategy": {"type": "RollingUpdate",
                              "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 1}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                     "containers": [{"name": "web", "image": "web:1",
                                     "ports": [{"containerPort": 8080}]}]}}},
        "status": {"replicas": 2, "conditions": [{"type": "Available", "status": "True",
                                                  "lastUpdateTime": "2024-05-01T10:00:00Z"}]}},
    "ReplicaSet": {
        "apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "web-abc"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"spec": {"containers": [{"name": "web", "image": "web:1"}]}}},
        "status": {"replicas": 1, "readyReplicas": 1}},
    "DaemonSet": {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent"},
        "spec": {"selector": {"matchLabels": {"app": "agent"}},
                 "updateStrategy": {"type": "RollingUpdate",
                                    "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}},
                 "template": {"spec": {"containers": [{"name": "a", "image": "a:1"}]}}},
        "status": {"currentNumberScheduled": 1, "desiredNumberScheduled": 1,
                   "numberMisscheduled": 0, "numberReady": 1}},
    "StatefulSet": {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
        "spec": {"replicas": 1, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
                 "template": {"spec": {"containers": [{"name": "db", "image": "db:1"}]}}},
        "status": {"replicas": 1}},
    "PodDisruptionBudget": {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "web", "generation": 1},
        "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}},
                 "unhealthyPodEvictionPolicy": "AlwaysAllow"},
        "status": {"observedGeneration": 1, "disruptionsAllowed": 1, "currentHealthy": 3,
                   "desiredHealthy": 2, "expectedPods": 3,
                   "conditions": [{"type": "DisruptionAllowed", "status": "True",
                                   "reason": "SufficientPods", "message": "",
                                   "lastTransitionTime": "2024-05-01T10:00:00Z",
                                   "observedGeneration": 1}]}},
    "ControllerRevision": {
        "apiVersion": "apps/v1", "kind": "ControllerRevision",
        "metadata": {"name": "agent-5d4f8", "labels": {"controller-revision-hash": "5d4f8"}},
        "revision": 2,
        "data": {"spec": {"template": {"$patch": "replace", "spec": {"containers": [
            {"name": "a", "image": "a:1"}]}}}}},
    "Job": {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"},
        "spec": {"completions": 1, "backoffLimit": 6,
                 "template": {"spec": {"restartPolicy": "Never",
                                       "containers": [{"name": "c", "image": "c:1"}]}}},
        "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}},
    "MutatingWebhookConfiguration": {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "injector"},
        "webhooks": [{
            "name": "inject.meshgate.io", "admissionReviewVersions": ["v1"],
            "sideEffects": "None", "failurePolicy": "Fail", "matchPolicy": "Equivalent",
            "reinvocationPolicy": "IfNeeded", "timeoutSeconds": 10,
            "clientConfig": {"service": {"name": "injector", "namespace": "mesh",
                                         "path": "/inject", "port": 443},
                             "caBundle": "Y2E="},
            "namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                 "values": ["kube-system"]}]},
            "objectSelector": {"matchLabels": {"inject": "true"}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"], "scope": "Namespaced"}]}]},
    "ValidatingWebhookConfiguration": {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "policy"},
        "webhooks": [{
            "name": "policy.meshgate.io", "admissionReviewVersions": ["v1", "v1beta1"],
            "sideEffects": "NoneOnDryRun", "failurePolicy": "Ignore", "matchPolicy": "Exact",
            "timeoutSeconds": 5,
            "clientConfig": {"url": "https://127.0.0.1:8443/validate"},
            "namespaceSelector": {}, "objectSelector": {},
            "rules": [{"operations": ["CREATE", "UPDATE"], "apiGroups": ["*"],
                       "apiVersions": ["*"], "resources": ["pods", "pods/status"],
                       "scope": "*"}]}]},
}


def test_every_builtin_kind_has_a_sample() -> None:
    assert {r.kind for r in BUILTIN} <= set(SAMPLES)


@pytest.mark.parametrize("resource", BUILTIN, ids=lambda r: r.kind)
def test_builtin_schema_declares_the_envelope(resource: Any) -> None:
    schema = builtin_schema(resource.model)
    assert schema["type"] == "object"
    assert {"apiVersion", "kind"} <= set(schema["properties"])
    assert builtin_schema(resource.model) is schema  # cached


@pytest.mark.parametrize("resource", BUILTIN, ids=lambda r: r.kind)
def test_realistic_builtin_objects_round_trip(resource: Any) -> None:
    sample = SAMPLES.get(f"{resource.group}/{resource.kind}") or SAMPLES[resource.kind]
    checked = check(copy.deepcopy(sample), builtin_schema(resource.model))
    assert checked.causes == ()
    assert checked.unknown_fields == ()
    assert checked.obj == sample


def test_unknown_builtin_model_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="V1Nope"):
        builtin_schema("V1Nope")


def test_patch_extensions_kubectl_apply_reads() -> None:
    pod = builtin_schema("V1PodSpec")["properties"]
    assert pod["containers"]["x-kubernetes-patch-merge-key"] == "name"
    assert pod["containers"]["x-kubernetes-patch-strategy"] == "merge"
    assert pod["volumes"]["x-kubernetes-patch-strategy"] == "merge,retainKeys"
    container = builtin_schema("V1Container")["properties"]
    assert container["ports"]["x-kubernetes-patch-merge-key"] == "containerPort"
    assert container["volumeMounts"]["x-kubernetes-patch-merge-key"] == "mountPath"
    meta = builtin_schema("V1ObjectMeta")["properties"]
    assert meta["finalizers"]["x-kubernetes-patch-strategy"] == "merge"
    assert "x-kubernetes-patch-merge-key" not in meta["finalizers"]
    assert meta["ownerReferences"]["x-kubernetes-patch-merge-key"] == "uid"
    ports = builtin_schema("V1ServiceSpec")["properties"]["ports"]
    assert ports["x-kubernetes-patch-merge-key"] == "port"
    subsets = builtin_schema("V1Endpoints")["properties"]["subsets"]
    assert "x-kubernetes-patch-strategy" not in subsets


def test_builtin_types_and_required() -> None:
    port = builtin_schema("V1ServicePort")
    assert port["properties"]["targetPort"] == {
        "description": port["properties"]["targetPort"]["description"],
        "x-kubernetes-int-or-string": True}
    assert port["properties"]["port"]["type"] == "integer"
    assert port["required"] == ["port"]
    assert builtin_schema("V1Container")["required"] == ["name"]
    assert builtin_schema("V1ObjectMeta")["properties"]["labels"]["additionalProperties"] == {
        "type": "string"}
    assert builtin_schema("V1ObjectMeta")["properties"]["creationTimestamp"]["format"] == \
        "date-time"
    assert "required" not in builtin_schema("V1Service")


def test_json_schema_props_inside_crds_are_free_form() -> None:
    validation = builtin_schema("V1CustomResourceValidation")["properties"]["openAPIV3Schema"]
    assert validation["type"] == "object"
    assert validation["x-kubernetes-preserve-unknown-fields"] is True
    crd = copy.deepcopy(SAMPLES["CustomResourceDefinition"])
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema["properties"]["spec"]["x-anything"] = {"nested": [1, {"deep": None}]}
    checked = check(crd, builtin_schema("V1CustomResourceDefinition"))
    assert checked.obj == crd and checked.unknown_fields == ()


# ---------------------------------------------------------------- pruning


def test_pruning_reports_kube_paths() -> None:
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "web", "bogus": 1, "labels": {"a": "b"}},
           "spec": {"foo": 1, "ports": [{"port": 80}, {"port": 81, "bar": {"x": 1}}]},
           "extra": True}
    checked = check(svc, builtin_schema("V1Service"))
    assert checked.unknown_fields == ("metadata.bogus", "spec.foo", "spec.ports[1].bar", "extra")
    assert checked.obj == {"apiVersion": "v1", "kind": "Service",
                           "metadata": {"name": "web", "labels": {"a": "b"}},
                           "spec": {"ports": [{"port": 80}, {"port": 81}]}}
    assert checked.causes == ()


def test_check_does_not_modify_its_input() -> None:
    svc = {"apiVersion": "v1", "kind": "Service", "spec": {"foo": 1}}
    check(svc, builtin_schema("V1Service"))
    assert svc == {"apiVersion": "v1", "kind": "Service", "spec": {"foo": 1}}


LINK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "required": ["host"],
            "properties": {
                "host": {"type": "string", "pattern": "^[a-z0-9.-]+$", "maxLength": 20},
                "replicas": {"type": "integer", "minimum": 1, "maximum": 5},
                "weight": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
                "mode": {"type": "string", "enum": ["a", "b"]},
                "port": {"x-kubernetes-int-or-string": True},
                "ports": {"type": "array", "maxItems": 3, "items": {
                    "type": "object", "required": ["port"],
                    "properties": {"port": {"type": "integer", "format": "int32"},
                                   "names": {"type": "array", "minItems": 1,
                                             "items": {"type": "string", "minLength": 2}}}}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "template": {"type": "object", "x-kubernetes-embedded-resource": True,
                             "x-kubernetes-preserve-unknown-fields": True},
                "gateway": {"type": "string", "default": "east-gw"},
                "note": {"type": "string", "nullable": True},
                "since": {"type": "string", "format": "date-time"},
                "tags": {"type": "array", "x-kubernetes-list-type": "set",
                         "items": {"type": "string"}},
                "peers": {"type": "array", "x-kubernetes-list-type": "map",
                          "x-kubernetes-list-map-keys": ["name"],
                          "items": {"type": "object", "properties": {
                              "name": {"type": "string"}, "addr": {"type": "string"}}}},
                "either": {"type": "string", "anyOf": [{"pattern": "^a"}, {"pattern": "^b"}]},
                "only": {"type": "integer", "oneOf": [{"minimum": 10}, {"maximum": 0}]},
                "notx": {"type": "string", "not": {"enum": ["x"]}},
            },
        },
        "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
    },
}


def link(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "multicluster.meshgate.io/v1alpha1", "kind": "Link",
            "metadata": {"name": "east", "namespace": "mesh"},
            "spec": {"host": "east.example", **spec}}


def causes_of(obj: dict[str, Any]) -> list[Cause]:
    return list(check(obj, LINK_SCHEMA).causes)


def test_custom_resource_prunes_and_defaults() -> None:
    checked = check(link(unknown=1, ports=[{"port": 1, "x": 2}], extra={"a": {"b": [1]}},
                         labels={"k": "v"}, note=None, replicas=None),
                    LINK_SCHEMA)
    assert checked.unknown_fields == ("spec.unknown", "spec.ports[0].x")
    assert checked.obj["spec"] == {"host": "east.example", "ports": [{"port": 1}],
                                   "extra": {"a": {"b": [1]}}, "labels": {"k": "v"},
                                   "note": None, "gateway": "east-gw"}
    assert checked.causes == ()


def test_root_keeps_envelope_and_prunes_metadata() -> None:
    checked = check({"apiVersion": "a/v1", "kind": "K", "metadata": {"name": "n", "junk": 1},
                     "other": 1}, LINK_SCHEMA)
    assert checked.obj == {"apiVersion": "a/v1", "kind": "K", "metadata": {"name": "n"}}
    assert checked.unknown_fields == ("metadata.junk", "other")


def test_embedded_resource_keeps_envelope_and_checks_it() -> None:
    template = {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "t", "zzz": 1, "labels": {"a": 1}}, "spec": {"any": 1}}
    checked = check(link(template=template), LINK_SCHEMA)
    assert checked.unknown_fields == ("spec.template.metadata.zzz",)
    assert checked.obj["spec"]["template"]["spec"] == {"any": 1}
    assert [c.field for c in checked.causes] == ["spec.template.metadata.labels.a"]
    missing = causes_of(link(template={"spec": {}}))
    assert [(c.field, c.message, c.reason) for c in missing] == [
        ("spec.template.apiVersion", "Required value: must not be empty", "FieldValueRequired"),
        ("spec.template.kind", "Required value: must not be empty", "FieldValueRequired"),
    ]


def test_integral_floats_become_integers() -> None:
    checked = check(link(replicas=2.0, port=8080.0, ports=[{"port": 1.0}]), LINK_SCHEMA)
    assert checked.causes == ()
    spec = checked.obj["spec"]
    assert (spec["replicas"], spec["port"], spec["ports"][0]["port"]) == (2, 8080, 1)
    assert all(isinstance(v, int) for v in (spec["replicas"], spec["port"]))


# ---------------------------------------------------------------- validation causes


def test_wrong_type_cause() -> None:
    assert causes_of(link(replicas="three")) == [Cause(
        field="spec.replicas",
        message='Invalid value: "three": spec.replicas in body must be of type integer: "string"',
        reason="FieldValueTypeInvalid")]


def test_bool_is_not_an_integer_and_fraction_is_not_either() -> None:
    assert [c.message for c in causes_of(link(replicas=True))] == [
        'Invalid value: true: spec.replicas in body must be of type integer: "boolean"']
    assert [c.message for c in causes_of(link(replicas=2.5))] == [
        'Invalid value: 2.5: spec.replicas in body must be of type integer: "number"']


def test_missing_required_cause() -> None:
    obj = link()
    del obj["spec"]["host"]
    assert causes_of(obj) == [Cause("spec.host", "Required value", "FieldValueRequired")]


def test_null_in_non_nullable_field_counts_as_missing() -> None:
    obj = link(host=None)
    assert causes_of(obj) == [Cause("spec.host", "Required value", "FieldValueRequired")]


def test_enum_cause() -> None:
    assert causes_of(link(mode="x")) == [Cause(
        "spec.mode", 'Unsupported value: "x": supported values: "a", "b"',
        "FieldValueNotSupported")]


def test_pattern_cause() -> None:
    assert causes_of(link(host="East!")) == [Cause(
        "spec.host", "Invalid value: \"East!\": spec.host in body should match '^[a-z0-9.-]+$'",
        "FieldValueInvalid")]


def test_numeric_bounds() -> None:
    assert [c.message for c in causes_of(link(replicas=0))] == [
        "Invalid value: 0: spec.replicas in body should be greater than or equal to 1"]
    assert [c.message for c in causes_of(link(replicas=6))] == [
        "Invalid value: 6: spec.replicas in body should be less than or equal to 5"]
    assert [c.message for c in causes_of(link(weight=0))] == [
        "Invalid value: 0: spec.weight in body should be greater than 0"]


def test_length_and_count_bounds() -> None:
    assert causes_of(link(host="a" * 21)) == [Cause(
        "spec.host", "Too long: may not be more than 20 bytes", "FieldValueTooLong")]
    assert causes_of(link(ports=[{"port": 1}] * 4)) == [Cause(
        "spec.ports", "Too many: 4: must have at most 3 items", "FieldValueTooMany")]


def test_nested_array_paths() -> None:
    causes = causes_of(link(ports=[{"port": 1}, {"names": []}, {"port": 2, "names": ["ok", "x"]}]))
    assert [(c.field, c.reason) for c in causes] == [
        ("spec.ports[1].port", "FieldValueRequired"),
        ("spec.ports[1].names", "FieldValueInvalid"),
        ("spec.ports[2].names[1]", "FieldValueInvalid"),
    ]
    assert causes[1].message == \
        "Invalid value: []: spec.ports[1].names in body should have at least 1 items"
    assert causes[2].message == \
        'Invalid value: "x": spec.ports[2].names[1] in body should be at least 2 chars long'


def test_int_or_string() -> None:
    assert causes_of(link(port=8080)) == []
    assert causes_of(link(port="http")) == []
    assert causes_of(link(port=[1])) == [Cause(
        "spec.port", 'Invalid value: [1]: spec.port in body must be of type integer,string: '
        '"array"', "FieldValueTypeInvalid")]


def test_preserve_unknown_fields_takes_anything() -> None:
    checked = check(link(extra={"x": [{"y": None}], "z": 1.5}), LINK_SCHEMA)
    assert checked.obj["spec"]["extra"] == {"x": [{"y": None}], "z": 1.5}
    assert checked.causes == () and checked.unknown_fields == ()


def test_additional_properties_values_are_checked() -> None:
    assert causes_of(link(labels={"a": 1})) == [Cause(
        "spec.labels.a", 'Invalid value: 1: spec.labels.a in body must be of type string: '
        '"integer"', "FieldValueTypeInvalid")]


def test_formats() -> None:
    assert [c.message for c in causes_of(link(ports=[{"port": 2**31}]))] == [
        f'Invalid value: {2**31}: spec.ports[0].port in body must be of type int32: "{2**31}"']
    assert causes_of(link(ports=[{"port": 2**31 - 1}])) == []
    assert causes_of(link(since="2024-05-01T10:00:00.5+02:00")) == []
    assert [c.reason for c in causes_of(link(since="yesterday"))] == ["FieldValueTypeInvalid"]
    assert [c.reason for c in causes_of(link(since="2024-13-01T10:00:00Z"))] == [
        "FieldValueTypeInvalid"]


def test_nullable() -> None:
    assert causes_of(link(note=None)) == []
    assert check(link(note=None), LINK_SCHEMA).obj["spec"]["note"] is None


def test_list_types_reject_duplicates() -> None:
    assert causes_of(link(tags=["a", "a"])) == [
        Cause("spec.tags[1]", 'Duplicate value: "a"', "FieldValueDuplicate")]
    peers = [{"name": "a", "addr": "1"}, {"name": "a", "addr": "2"}]
    assert causes_of(link(peers=peers)) == [
        Cause("spec.peers[1]", 'Duplicate value: {"name":"a"}', "FieldValueDuplicate")]


def test_junctors() -> None:
    assert causes_of(link(either="abc")) == []
    assert [c.message for c in causes_of(link(either="c"))] == [
        'Invalid value: "c": spec.either in body must validate at least one schema (anyOf)']
    assert causes_of(link(only=11)) == []
    assert [c.message for c in causes_of(link(only=5))] == [
        "Invalid value: 5: spec.only in body must validate one and only one schema (oneOf)"]
    assert [c.message for c in causes_of(link(notx="x"))] == [
        'Invalid value: "x": spec.notx in body must not validate the schema (not)']


def test_all_of_reports_the_failing_constraint() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer",
                                                     "allOf": [{"minimum": 3}]}}}
    causes = check({"n": 1}, schema).causes
    assert [c.message for c in causes] == [
        "Invalid value: 1: n in body should be greater than or equal to 3"]


def test_unique_items_and_properties_bounds() -> None:
    schema = {"type": "object", "properties": {
        "u": {"type": "array", "uniqueItems": True, "items": {"type": "integer"}},
        "m": {"type": "object", "maxProperties": 1, "minProperties": 1,
              "additionalProperties": {"type": "integer"}}}}
    causes = check({"u": [1, 1], "m": {"a": 1, "b": 2}}, schema).causes
    assert [(c.field, c.reason) for c in causes] == [
        ("u", "FieldValueInvalid"), ("m", "FieldValueTooMany")]
    # true is not 1 to kube: only its type is wrong, it is no duplicate
    assert [c.field for c in check({"u": [1, True], "m": {}}, schema).causes] == ["u[1]", "m"]


def test_metadata_labels_must_be_strings() -> None:
    obj = link()
    obj["metadata"]["labels"] = {"app": 5}
    assert [c.field for c in causes_of(obj)] == ["metadata.labels.app"]


def test_crd_may_narrow_metadata_name() -> None:
    schema = {"type": "object", "properties": {"metadata": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 3}}}}}
    checked = check({"metadata": {"name": "toolong", "labels": {"a": "b"}}}, schema)
    assert checked.unknown_fields == ()
    assert [c.reason for c in checked.causes] == ["FieldValueTooLong"]


def test_a_broken_schema_is_an_api_error() -> None:
    with pytest.raises(ApiError) as info:
        check({"a": 1}, {"type": "object", "properties": {"a": {"type": "wat"}}})
    assert info.value.code == 500


def test_deep_nesting_is_an_api_error_not_a_crash() -> None:
    deep: Any = "x"
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ApiError) as info:
        check({"spec": {"ports": deep}}, LINK_SCHEMA)
    assert info.value.code == 400


# ---------------------------------------------------------------- properties

_NAMES = st.sampled_from(["spec", "status", "host", "replicas", "weight", "mode", "port",
                          "ports", "names", "labels", "extra", "template", "apiVersion",
                          "kind", "metadata", "name", "gateway", "note", "since", "tags",
                          "peers", "either", "only", "notx", "addr", "x"]) | st.text(max_size=4)
_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(_NAMES, inner, max_size=5), max_leaves=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_JSON, metadata=_JSON, status=_JSON, extra=st.dictionaries(_NAMES, _JSON, max_size=3))
def test_check_never_raises_and_is_idempotent(spec: Any, metadata: Any, status: Any,
                                              extra: dict[str, Any]) -> None:
    obj = {**extra, "apiVersion": "multicluster.meshgate.io/v1alpha1", "kind": "Link",
           "metadata": metadata, "spec": spec, "status": status}
    first = check(obj, LINK_SCHEMA)
    assert isinstance(first, Checked)
    for cause in first.causes:
        assert cause.reason.startswith("FieldValue") and cause.message
    again = check(first.obj, LINK_SCHEMA)
    assert again.unknown_fields == ()
    assert again.obj == first.obj
    assert again.causes == first.causes


@settings(max_examples=100, deadline=None)
@given(spec=_JSON)
def test_check_never_raises_on_builtin_schemas(spec: Any) -> None:
    for model in ("V1Pod", "V1Service"):
        first = check({"apiVersion": "v1", "spec": spec, "status": spec}, builtin_schema(model))
        assert check(first.obj, builtin_schema(model)).unknown_fields == ()
