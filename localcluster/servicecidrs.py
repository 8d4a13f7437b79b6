"""networking.k8s.io/v1 ServiceCIDR: the ranges ClusterIPs come from.

kube-apiserver (1.33+) keeps one ServiceCIDR, named ``kubernetes``, for its
``--service-cluster-ip-range`` and marks it Ready; clients (meshgate's injector
among them) read the service range from it instead of guessing. The embedded
cluster serves the same default object for ``cluster up --service-cidr``.

Its allocator takes ClusterIPs from that one range only, so a second ServiceCIDR,
which kube would add to the ranges it allocates from, is refused with a 403 that
says so, rather than accepted and never used. Validation and immutability are
kube's ValidateServiceCIDR / ValidateServiceCIDRUpdate, with their wording.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from typing import Any

from localcluster.errors import ApiError, Cause
from localcluster.resources import BUILTIN

GROUP = "networking.k8s.io"
KEY = (GROUP, "servicecidrs")
DEFAULT_NAME = "kubernetes"
"""The ServiceCIDR kube-apiserver creates for its own --service-cluster-ip-range."""

SERVICE_CIDRS = next(rt for rt in BUILTIN if rt.key == KEY)


def default_object(service_cidr: str) -> dict[str, Any]:
    """The default ServiceCIDR (created at every start unless present)."""
    return {"metadata": {"name": DEFAULT_NAME}, "spec": {"cidrs": [service_cidr]}}


def set_ready(obj: dict[str, Any], now: str) -> None:
    """Ready, as kube's servicecidr controller reports an accepted range."""
    obj["status"] = {"conditions": [{"type": "Ready", "status": "True",
                                     "lastTransitionTime": now, "reason": "",
                                     "message": ""}]}


def admit(obj: Mapping[str, Any], old: Mapping[str, Any] | None, *, served: str) -> None:
    """kube's validation; and the one range this cluster allocates from (``served``)."""
    name = obj["metadata"].get("name", "")
    spec = obj.get("spec") or {}
    cidrs = spec.get("cidrs") or []
    causes = _validate(cidrs, spec)
    if not causes and old is not None and cidrs != (old.get("spec") or {}).get("cidrs"):
        causes = [Cause("spec.cidrs", f"Invalid value: {json.dumps(cidrs)}: field is "
                        "immutable")]
    if causes:
        raise ApiError.invalid("ServiceCIDR", name, causes, group=GROUP)
    if old is None and name != DEFAULT_NAME:
        raise ApiError.forbidden(
            f'servicecidrs.{GROUP} "{name}" is forbidden: this cluster allocates ClusterIPs '
            f"from its one service range {served} (`cluster up --service-cidr`); a second "
            "ServiceCIDR would never be used", group=GROUP, kind="servicecidrs", name=name)


def _validate(cidrs: list[Any], spec: Mapping[str, Any]) -> list[Cause]:
    if not cidrs:
        return [Cause("spec.cidrs", "Required value: at least one CIDR required",
                      "FieldValueRequired")]
    if len(cidrs) > 2:
        return [Cause("spec.cidrs", f"Invalid value: {json.dumps(spec)}: may only hold up "
                      "to 2 values")]
    causes: list[Cause] = []
    families = set()
    for i, cidr in enumerate(cidrs):
        try:
            families.add(ipaddress.ip_network(str(cidr), strict=False).version)
        except ValueError:
            causes.append(Cause(f"spec.cidrs[{i}]", f"Invalid value: {json.dumps(cidr)}: "
                                "must be a valid CIDR value, (e.g. 10.9.8.0/24 or "
                                "2001:db8::/64)"))
    if not causes and len(cidrs) == 2 and len(families) != 2:
        causes.append(Cause("spec.cidrs", f"Invalid value: {json.dumps(spec)}: may specify "
                            "no more than one IP for each IP family, i.e 192.168.0.0/24 and "
                            "2001:db8::/64"))
    return causes
