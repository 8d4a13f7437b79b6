"""The defaults kube-apiserver gives Pods and Services (pkg/apis/core/v1
defaults.go), and what its built-in admission adds to a new Pod
(ServiceAccount, Priority, DefaultTolerationSeconds) and to a new Service.

``default_*`` runs on every write, as kube's decoding does; ``admit_*`` only
when the object is created. `default_pod_spec` also serves pod templates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DEFAULT_VOLUME_MODE = 0o644
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
UNREACHABLE_TAINT = "node.kubernetes.io/unreachable"
DEFAULT_TOLERATION_SECONDS = 300
CLIENT_IP_AFFINITY_SECONDS = 10800
PROJECTED_SOURCES = ("secret", "configMap", "downwardAPI", "projected")


def image_pull_policy(image: str) -> str:
    """``Always`` for ``:latest`` or no tag (and no digest), else ``IfNotPresent``."""
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = last.rsplit(":", 1)[1] if ":" in last else ("" if digest else "latest")
    return "Always" if tag == "latest" else "IfNotPresent"


def _default_handler(handler: dict[str, Any]) -> None:
    http = handler.get("httpGet")
    if isinstance(http, dict):
        http.setdefault("path", "/")
        http.setdefault("scheme", "HTTP")


def _default_probe(probe: dict[str, Any]) -> None:
    probe.setdefault("timeoutSeconds", 1)
    probe.setdefault("periodSeconds", 10)
    probe.setdefault("successThreshold", 1)
    probe.setdefault("failureThreshold", 3)
    _default_handler(probe)


def _default_field_refs(items: list[Any]) -> None:
    for item in items:
        ref = item.get("fieldRef") if isinstance(item, dict) else None
        if isinstance(ref, dict):
            ref.setdefault("apiVersion", "v1")


def default_container(c: dict[str, Any], *, host_network: bool) -> None:
    if c.get("image") is not None:
        c.setdefault("imagePullPolicy", image_pull_policy(str(c["image"])))
    c.setdefault("terminationMessagePath", "/dev/termination-log")
    c.setdefault("terminationMessagePolicy", "File")
    c.setdefault("resources", {})
    limits = c["resources"].get("limits") or {}
    if limits:
        requests = c["resources"].setdefault("requests", {})
        for resource, amount in limits.items():
            requests.setdefault(resource, amount)
    for port in c.get("ports") or []:
        port.setdefault("protocol", "TCP")
        if host_network and port.get("containerPort"):
            port.setdefault("hostPort", port["containerPort"])
    for key in ("livenessProbe", "readinessProbe", "startupProbe"):
        if isinstance(c.get(key), dict):
            _default_probe(c[key])
    for hook in ((c.get("lifecycle") or {}).get("postStart"),
                 (c.get("lifecycle") or {}).get("preStop")):
        if isinstance(hook, dict):
            _default_handler(hook)
    _default_field_refs([e.get("valueFrom") or {} for e in c.get("env") or []])


def _default_volume(volume: dict[str, Any]) -> None:
    sources = [k for k in volume if k != "name"]
    if not sources:
        volume["emptyDir"] = {}
    for key in PROJECTED_SOURCES:
        if isinstance(volume.get(key), dict):
            volume[key].setdefault("defaultMode", DEFAULT_VOLUME_MODE)
    _default_field_refs((volume.get("downwardAPI") or {}).get("items") or [])
    for source in (volume.get("projected") or {}).get("sources") or []:
        _default_field_refs((source.get("downwardAPI") or {}).get("items") or [])
    if isinstance(volume.get("hostPath"), dict):
        volume["hostPath"].setdefault("type", "")


def default_pod_spec(spec: dict[str, Any]) -> None:
    """SetDefaults_PodSpec with its containers and volumes, for Pods and pod templates."""
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("enableServiceLinks", True)
    if not spec.get("serviceAccountName") and spec.get("serviceAccount"):
        spec["serviceAccountName"] = spec["serviceAccount"]
    if spec.get("serviceAccountName"):
        spec["serviceAccount"] = spec["serviceAccountName"]
    host_network = bool(spec.get("hostNetwork"))
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(key) or []:
            default_container(c, host_network=host_network)
    for volume in spec.get("volumes") or []:
        _default_volume(volume)


def _tolerates(tolerations: list[Mapping[str, Any]], taint: str) -> bool:
    return any(t.get("key") in (taint, "", None) and t.get("effect") in ("NoExecute", "", None)
               for t in tolerations)


def qos_class(spec: Mapping[str, Any]) -> str:
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    requests, limits = [], []
    for c in containers:
        res = c.get("resources") or {}
        requests.append({k: v for k, v in (res.get("requests") or {}).items()
                         if k in ("cpu", "memory")})
        limits.append({k: v for k, v in (res.get("limits") or {}).items()
                       if k in ("cpu", "memory")})
    if not any(requests) and not any(limits):
        return "BestEffort"
    if all(set(lim) == {"cpu", "memory"} and req == lim for req, lim in zip(
            requests, limits, strict=True)):
        return "Guaranteed"
    return "Burstable"


def admit_pod(pod: dict[str, Any]) -> None:
    """What a new Pod gets from kube's ServiceAccount, Priority and
    DefaultTolerationSeconds admission, and the status its strategy starts it with."""
    spec = pod.setdefault("spec", {})
    if not spec.get("serviceAccountName"):
        spec["serviceAccountName"] = spec["serviceAccount"] = "default"
    spec.setdefault("priority", 0)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    tolerations = spec.setdefault("tolerations", [])
    for taint in (NOT_READY_TAINT, UNREACHABLE_TAINT):
        if not _tolerates(tolerations, taint):
            tolerations.append({"key": taint, "operator": "Exists", "effect": "NoExecute",
                                "tolerationSeconds": DEFAULT_TOLERATION_SECONDS})
    pod["status"] = {"phase": "Pending", "qosClass": qos_class(spec)}


def externally_accessible(spec: Mapping[str, Any]) -> bool:
    kind = spec.get("type")
    return kind in ("NodePort", "LoadBalancer") or (
        kind == "ClusterIP" and bool(spec.get("externalIPs")))


def default_service_spec(spec: dict[str, Any], old: Mapping[str, Any] | None) -> None:
    """SetDefaults_Service, and on update what kube drops when the type changes."""
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    if spec["sessionAffinity"] == "None":
        spec.pop("sessionAffinityConfig", None)
    elif not (((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
              .get("timeoutSeconds")):
        spec["sessionAffinityConfig"] = {
            "clientIP": {"timeoutSeconds": CLIENT_IP_AFFINITY_SECONDS}}
    for port in spec.get("ports") or []:
        port.setdefault("protocol", "TCP")
        if port.get("targetPort") in (None, 0, ""):
            port["targetPort"] = port.get("port")
    if old is not None:
        _drop_type_dependent(spec, old.get("spec") or {})
    if externally_accessible(spec):
        spec.setdefault("externalTrafficPolicy", "Cluster")
    if spec["type"] != "ExternalName":
        spec.setdefault("internalTrafficPolicy", "Cluster")
    if spec["type"] == "LoadBalancer":
        spec.setdefault("allocateLoadBalancerNodePorts", True)


def _drop_type_dependent(spec: dict[str, Any], old: Mapping[str, Any]) -> None:
    """kube's dropTypeDependentFields: a field the new type cannot have, left as it was,
    goes; one the request changed stays, for validation to refuse."""
    if spec["type"] not in ("NodePort", "LoadBalancer"):
        old_ports = {p.get("nodePort") for p in old.get("ports") or []}
        for port in spec.get("ports") or []:
            if port.get("nodePort") in old_ports:
                port.pop("nodePort", None)
    same = {k for k in ("externalTrafficPolicy", "healthCheckNodePort",
                        "allocateLoadBalancerNodePorts", "loadBalancerClass")
            if k in spec and spec.get(k) == old.get(k)}
    if not externally_accessible(spec):
        for k in same & {"externalTrafficPolicy"}:
            spec.pop(k)
    if spec["type"] != "LoadBalancer":
        for k in same & {"healthCheckNodePort", "allocateLoadBalancerNodePorts",
                         "loadBalancerClass"}:
            spec.pop(k)
    if spec.get("externalTrafficPolicy") != "Local" and "healthCheckNodePort" in same:
        spec.pop("healthCheckNodePort", None)
