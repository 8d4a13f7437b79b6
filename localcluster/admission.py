"""Per-kind rules applied as an object is written, as kube-apiserver's registry
strategies and built-in admission do: Service ClusterIP allocation and
defaults, Secret ``stringData`` and ServiceAccount token Secrets, Namespace
phases, CRD establishment, and the objects that go with a deleted one.

Hooks return the extra writes that must commit in the same transaction.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import random
from collections.abc import Callable, Mapping
from typing import Any

from localcluster import crd, servicecidrs, webhookconfig
from localcluster.apiaccess import mount_api_access
from localcluster.auth import TokenAuthority
from localcluster.catalog import Catalog
from localcluster.defaults import admit_pod, default_pod_spec, default_service_spec
from localcluster.errors import ApiError, Cause
from localcluster.nodeports import NodePortAllocator
from localcluster.resources import ResourceType
from localcluster.store import Event, EventType, Store, Write
from localcluster.workloads import spec as workload_spec

SA_TOKEN_TYPE = "kubernetes.io/service-account-token"
SA_NAME_ANNOTATION = "kubernetes.io/service-account.name"
SA_UID_ANNOTATION = "kubernetes.io/service-account.uid"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "endpointslice-controller.k8s.io"


class ClusterIPAllocator:
    """Hands out Service addresses from the service CIDR; the first is the API's own."""

    def __init__(self, cidr: str, store: Store) -> None:
        self.network = ipaddress.ip_network(cidr)
        self.allocated: set[str] = set()
        for svc in store.items(("", "services")):
            self.allocated.update(_cluster_ips(svc))
        store.subscribe(self._observe)

    @property
    def api_address(self) -> str:
        return str(self.network.network_address + 1)

    def _observe(self, ev: Event) -> None:
        if ev.key != ("", "services"):
            return
        if ev.type is EventType.DELETED:
            self.allocated.difference_update(_cluster_ips(ev.obj))
        else:
            self.allocated.update(_cluster_ips(ev.obj))

    def allocate(self) -> str:
        size = self.network.num_addresses - 2
        base = self.network.network_address
        for _ in range(64):
            candidate = str(base + random.randint(2, size))
            if candidate not in self.allocated:
                return candidate
        for offset in range(2, size + 1):
            candidate = str(base + offset)
            if candidate not in self.allocated:
                return candidate
        raise ApiError(500, "InternalError",
                       f"failed to allocate a serviceIP: range {self.network} is full")

    def check(self, ip: str, name: str) -> None:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return  # validation reports the malformed address
        if addr not in self.network:
            raise ApiError.invalid("Service", name, [Cause(
                "spec.clusterIPs", f'Invalid value: ["{ip}"]: failed to allocate IP {ip}: the '
                f"provided IP ({ip}) is not in the valid range. The range of valid IPs is "
                f"{self.network}")])
        if ip in self.allocated:
            raise ApiError.invalid("Service", name, [Cause(
                "spec.clusterIPs", f'Invalid value: ["{ip}"]: failed to allocate IP {ip}: '
                "provided IP is already allocated")])


def _cluster_ips(svc: Mapping[str, Any]) -> list[str]:
    spec = svc.get("spec") or {}
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    return [ip for ip in ips if ip and ip != "None"]


class Admission:
    def __init__(self, store: Store, catalog: Catalog, *, service_cidr: str,
                 tokens: TokenAuthority, ca_pem: bytes,
                 clock: Callable[[], float]) -> None:
        self.store = store
        self.catalog = catalog
        self.service_cidr = service_cidr
        self.ips = ClusterIPAllocator(service_cidr, store)
        self.node_ports = NodePortAllocator(store)
        self.tokens = tokens
        self.ca_pem = ca_pem
        self.clock = clock

    # -- hooks -------------------------------------------------------------------------

    def on_create(self, rt: ResourceType, obj: dict[str, Any]) -> list[Write]:
        if rt.key == ("", "services"):
            self._service_defaults(obj, None)
        elif rt.key == ("", "secrets"):
            self._secret(obj)
        elif rt.key == ("", "namespaces"):
            obj["spec"] = {"finalizers": ["kubernetes"]}
            obj["status"] = {"phase": "Active"}
        elif rt.key == ("", "pods"):
            default_pod_spec(obj.setdefault("spec", {}))
            admit_pod(obj)
            mount_api_access(obj, self.store.get(("", "serviceaccounts"), obj["metadata"].get(
                "namespace", ""), obj["spec"]["serviceAccountName"]))
        elif rt.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            self._establish(obj)
        elif workload_spec.is_workload(rt):
            workload_spec.admit(rt, obj, None)
        elif rt.key == workload_spec.BUDGETS:
            workload_spec.admit_budget(obj)
        elif webhookconfig.is_configuration(rt):
            webhookconfig.set_defaults(obj, mutating=rt.key == webhookconfig.MUTATING)
        elif rt.key == servicecidrs.KEY:
            servicecidrs.admit(obj, None, served=self.service_cidr)
            servicecidrs.set_ready(obj, dt.datetime.fromtimestamp(
                int(self.clock()), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        return []

    def on_update(self, rt: ResourceType, old: Mapping[str, Any], new: dict[str, Any]) -> None:
        if rt.key == ("", "services"):
            self._service_defaults(new, old)
        elif rt.key == ("", "secrets"):
            self._secret(new)
        elif rt.key == ("", "pods"):
            default_pod_spec(new.setdefault("spec", {}))
        elif rt.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            self._establish(new)
        elif workload_spec.is_workload(rt):
            workload_spec.admit(rt, new, old)
        elif rt.key == workload_spec.BUDGETS:
            workload_spec.admit_budget(new)
        elif webhookconfig.is_configuration(rt):
            webhookconfig.set_defaults(new, mutating=rt.key == webhookconfig.MUTATING)
        elif rt.key == servicecidrs.KEY:
            servicecidrs.admit(new, old, served=self.service_cidr)

    def on_terminate(self, rt: ResourceType, obj: dict[str, Any]) -> None:
        """An object with finalizers (or a Namespace) starts its deletion."""
        if rt.key == ("", "namespaces"):
            obj.setdefault("status", {})["phase"] = "Terminating"

    def on_delete(self, rt: ResourceType, obj: Mapping[str, Any]) -> list[Write]:
        """Objects that cannot outlive ``obj``: deleted in the same transaction."""
        meta = obj["metadata"]
        ns, name = meta.get("namespace", ""), meta["name"]
        if rt.key == ("", "services"):
            doomed = [((("", "endpoints")), ns, name)] if self.store.get(
                ("", "endpoints"), ns, name) else []
            for s in self.store.items(("discovery.k8s.io", "endpointslices"), ns):
                labels = s["metadata"].get("labels") or {}
                if labels.get(SERVICE_NAME_LABEL) == name and labels.get(
                        MANAGED_BY_LABEL) == MANAGED_BY:
                    doomed.append((("discovery.k8s.io", "endpointslices"), ns,
                                   s["metadata"]["name"]))
            return [Write(k, n, m, None, EventType.DELETED) for k, n, m in doomed]
        if rt.key == ("", "serviceaccounts"):
            return [
                Write(("", "secrets"), ns, s["metadata"]["name"], None, EventType.DELETED)
                for s in self.store.items(("", "secrets"), ns)
                if s.get("type") == SA_TOKEN_TYPE
                and (s["metadata"].get("annotations") or {}).get(SA_NAME_ANNOTATION) == name
            ]
        if rt.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            key = (obj["spec"]["group"], obj["spec"]["names"]["plural"])
            return [
                Write(key, o["metadata"].get("namespace", ""), o["metadata"]["name"], None,
                      EventType.DELETED)
                for o in self.store.items(key)
            ]
        return []

    # -- kinds -----------------------------------------------------------------------

    def _service_defaults(self, svc: dict[str, Any], old: Mapping[str, Any] | None) -> None:
        spec = svc.setdefault("spec", {})
        default_service_spec(spec, old)
        if old is None:
            svc["status"] = {"loadBalancer": {}}
        old_spec = (old or {}).get("spec") or {}
        if spec["type"] == "ExternalName":
            # kube's dropTypeDependentFields: what only an addressed Service has goes,
            # unless the request changed it (then validation answers).
            for key in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy",
                        "internalTrafficPolicy"):
                if key in spec and spec[key] == old_spec.get(key):
                    del spec[key]
            return
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        self.node_ports.assign(svc, old)
        name = svc["metadata"]["name"]
        if old_spec.get("clusterIPs"):
            # kube's patchAllocatedValues, then normalizeClusterIPs
            if not spec.get("clusterIP") and old_spec.get("clusterIP"):
                spec["clusterIP"] = old_spec["clusterIP"]
            if not spec.get("clusterIPs") and old_spec.get("clusterIPs"):
                spec["clusterIPs"] = list(old_spec["clusterIPs"])
            if spec.get("clusterIP") != old_spec.get("clusterIP") and spec.get(
                    "clusterIPs") == old_spec.get("clusterIPs"):
                spec["clusterIPs"] = [spec["clusterIP"]]
            return
        ip = spec.get("clusterIP") or (spec.get("clusterIPs") or [""])[0]
        if ip == "None":
            spec["clusterIP"], spec["clusterIPs"] = "None", ["None"]
            return
        if ip:
            self.ips.check(ip, name)
        else:
            ip = self.ips.allocate()
        spec["clusterIP"], spec["clusterIPs"] = ip, [ip]

    def _secret(self, secret: dict[str, Any]) -> None:
        secret.setdefault("type", "Opaque")
        string_data = secret.pop("stringData", None) or {}
        data = secret.setdefault("data", {})
        for k, v in string_data.items():
            data[k] = base64.b64encode(str(v).encode()).decode()
        if not data:
            secret.pop("data")
        if secret["type"] != SA_TOKEN_TYPE:
            return
        meta = secret["metadata"]
        annotations = meta.setdefault("annotations", {})
        ns = meta["namespace"]
        sa = self.store.get(("", "serviceaccounts"), ns, annotations.get(SA_NAME_ANNOTATION, ""))
        if sa is None or (secret.get("data") or {}).get("token"):
            return
        annotations[SA_UID_ANNOTATION] = sa["metadata"]["uid"]
        token, _ = self.tokens.issue(
            namespace=ns, sa_name=sa["metadata"]["name"], sa_uid=sa["metadata"]["uid"],
            audiences=(), lifetime=None,
            bound={"kind": "Secret", "name": meta["name"], "uid": meta["uid"]},
        )
        secret["data"] = {
            **(secret.get("data") or {}),
            "token": base64.b64encode(token.encode()).decode(),
            "ca.crt": base64.b64encode(self.ca_pem).decode(),
            "namespace": base64.b64encode(ns.encode()).decode(),
        }

    def _establish(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if crd.validate_crd(obj):
            return  # validation reports it with field paths
        conflict = self.catalog.conflicts(obj)
        if conflict:
            raise ApiError.invalid("CustomResourceDefinition", name,
                                   [Cause("spec.names.plural", f"Invalid value: {conflict}")],
                                   group="apiextensions.k8s.io")
        names = crd.crd_with_defaults(obj)["spec"]["names"]
        stamp = obj["metadata"]["creationTimestamp"]
        obj["status"] = {
            "acceptedNames": names,
            "storedVersions": sorted({crd.storage_version(obj),
                                      *((obj.get("status") or {}).get("storedVersions") or [])}),
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                 "message": "no conflicts found", "lastTransitionTime": stamp},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                 "message": "the initial names have been accepted", "lastTransitionTime": stamp},
            ],
        }
