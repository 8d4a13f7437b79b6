"""Semantic validation of objects, with kube-apiserver's field paths and wording.

Structural checks (types, unknown fields, CRD schemas) live in `schema`; this
module holds what a schema cannot say: name formats, label syntax, and the
per-kind rules of the built-in kinds meshgate uses.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from localcluster.defaults import externally_accessible
from localcluster.errors import Cause
from localcluster.podupdate import pod_spec_update

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
MAX_ANNOTATIONS_BYTES = 256 * 1024


def _invalid(path: str, value: Any, why: str) -> Cause:
    return Cause(path, f"Invalid value: {json.dumps(value)}: {why}")


def _required(path: str) -> Cause:
    return Cause(path, "Required value", "FieldValueRequired")


def _unsupported(path: str, value: Any, allowed: list[str]) -> Cause:
    listed = ", ".join(json.dumps(a) for a in allowed)
    return Cause(path, f"Unsupported value: {json.dumps(value)}: supported values: {listed}",
                 "FieldValueNotSupported")


def _dns_label(path: str, name: str) -> list[Cause]:
    if len(name) > 63:
        return [_invalid(path, name, "must be no more than 63 characters")]
    if not DNS1123_LABEL.match(name):
        return [_invalid(path, name, "a lowercase RFC 1123 label must consist of lower case "
                         "alphanumeric characters or '-', and must start and end with an "
                         "alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
                         "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')")]
    return []


def _dns_1035(path: str, name: str) -> list[Cause]:
    if len(name) > 63:
        return [_invalid(path, name, "must be no more than 63 characters")]
    if not DNS1035_LABEL.match(name):
        return [_invalid(path, name, "a DNS-1035 label must consist of lower case alphanumeric "
                         "characters or '-', start with an alphabetic character, and end with an "
                         "alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for "
                         "validation is '[a-z]([-a-z0-9]*[a-z0-9])?')")]
    return []


def _dns_subdomain(path: str, name: str) -> list[Cause]:
    if len(name) > 253:
        return [_invalid(path, name, "must be no more than 253 characters")]
    if not DNS1123_SUBDOMAIN.match(name):
        return [_invalid(path, name, "a lowercase RFC 1123 subdomain must consist of lower case "
                         "alphanumeric characters, '-' or '.', and must start and end with an "
                         "alphanumeric character (e.g. 'example.com', regex used for validation "
                         "is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")]
    return []


def _path_segment(path: str, name: str) -> list[Cause]:
    if name in (".", "..") or "/" in name or "%" in name:
        return [_invalid(path, name, 'may not contain "/" or "%" or be "." or ".."')]
    return []


NAME_RULES: dict[str, Callable[[str, str], list[Cause]]] = {
    "namespaces": _dns_label,
    "services": _dns_1035,
    "roles": _path_segment,
    "rolebindings": _path_segment,
    "clusterroles": _path_segment,
    "clusterrolebindings": _path_segment,
}


def validate_name(plural: str, name: str) -> list[Cause]:
    if not name:
        return [Cause("metadata.name", "name or generateName is required", "FieldValueRequired")]
    return NAME_RULES.get(plural, _dns_subdomain)("metadata.name", name)


def qualified_key_causes(path: str, key: str) -> list[Cause]:
    """A label or annotation key: an optional DNS subdomain prefix and a name of <= 63."""
    prefix, _, name = key.rpartition("/")
    causes: list[Cause] = []
    if prefix and _dns_subdomain(path, prefix):
        causes.append(_invalid(path, key, "prefix part must be a lowercase RFC 1123 subdomain"))
    if not name or len(name) > 63 or not QUALIFIED_NAME.match(name):
        causes.append(_invalid(path, key, "name part must consist of alphanumeric characters, "
                               "'-', '_' or '.', and must start and end with an alphanumeric "
                               "character, with at most 63 characters"))
    return causes


def validate_metadata(meta: Mapping[str, Any]) -> list[Cause]:
    causes: list[Cause] = []
    for key, value in (meta.get("labels") or {}).items():
        causes += qualified_key_causes("metadata.labels", key)
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            causes.append(_invalid(f"metadata.labels[{key}]", value,
                                   "a valid label must be an empty string or consist of "
                                   "alphanumeric characters, '-', '_' or '.', and must start "
                                   "and end with an alphanumeric character, at most 63 long"))
    annotations = meta.get("annotations") or {}
    for key in annotations:
        causes += qualified_key_causes("metadata.annotations", key)
    size = sum(len(k) + len(v) for k, v in annotations.items() if isinstance(v, str))
    if size > MAX_ANNOTATIONS_BYTES:
        causes.append(Cause("metadata.annotations", f"Too long: must have at most "
                            f"{MAX_ANNOTATIONS_BYTES} bytes", "FieldValueTooLong"))
    return causes


def _service(obj: Mapping[str, Any]) -> list[Cause]:
    spec = obj.get("spec") or {}
    causes: list[Cause] = []
    stype = spec.get("type", "ClusterIP")
    types = ["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"]
    if stype not in types:
        causes.append(_unsupported("spec.type", stype, types))
    if stype == "ExternalName" and not str(spec.get("externalName") or "").rstrip("."):
        causes.append(_required("spec.externalName"))
    ports = spec.get("ports") or []
    headless = spec.get("clusterIP") == "None"
    if not ports and stype != "ExternalName" and not headless:
        causes.append(_required("spec.ports"))
    names: set[str] = set()
    seen: set[tuple[int, str]] = set()
    for i, p in enumerate(ports):
        path = f"spec.ports[{i}]"
        name = p.get("name", "")
        if len(ports) > 1 and not name:
            causes.append(_required(f"{path}.name"))
        elif name:
            causes += _dns_label(f"{path}.name", name)
            if name in names:
                causes.append(Cause(f"{path}.name", f"Duplicate value: {json.dumps(name)}",
                                    "FieldValueDuplicate"))
            names.add(name)
        port = p.get("port")
        if not isinstance(port, int) or not 1 <= port <= 65535:
            causes.append(_invalid(f"{path}.port", port, "must be between 1 and 65535, inclusive"))
        proto = p.get("protocol", "TCP")
        if proto not in ("TCP", "UDP", "SCTP"):
            causes.append(_unsupported(f"{path}.protocol", proto, ["SCTP", "TCP", "UDP"]))
        if (port, proto) in seen:
            dup = json.dumps({"port": port, "protocol": proto})
            causes.append(Cause(path, f"Duplicate value: {dup}", "FieldValueDuplicate"))
        seen.add((port, proto))
        target = p.get("targetPort")
        if isinstance(target, int) and not 1 <= target <= 65535:
            causes.append(_invalid(f"{path}.targetPort", target,
                                   "must be between 1 and 65535, inclusive"))
    if stype == "ClusterIP":
        causes += [Cause(f"spec.ports[{i}].nodePort", "Forbidden: may not be used when `type` "
                         "is 'ClusterIP'", "FieldValueForbidden")
                   for i, p in enumerate(ports) if p.get("nodePort")]
    policy = spec.get("externalTrafficPolicy")
    if policy and not externally_accessible({**spec, "type": stype}):
        causes.append(_invalid("spec.externalTrafficPolicy", policy,
                               "may only be set for externally-accessible services"))
    cluster_ip = spec.get("clusterIP")
    if cluster_ip not in (None, "", "None"):
        try:
            ipaddress.ip_address(cluster_ip)
        except ValueError:
            causes.append(_invalid("spec.clusterIP", cluster_ip, "must be a valid IP address"))
    return causes


def _secret(obj: Mapping[str, Any]) -> list[Cause]:
    causes: list[Cause] = []
    for key, value in (obj.get("data") or {}).items():
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError, TypeError):
            causes.append(_invalid(f"data[{key}]", "<value omitted>", "illegal base64 data"))
    return causes


def _endpoint_slice(obj: Mapping[str, Any]) -> list[Cause]:
    causes: list[Cause] = []
    types = ["FQDN", "IPv4", "IPv6"]
    atype = obj.get("addressType")
    if atype is None:
        causes.append(_required("addressType"))
    elif atype not in types:
        causes.append(_unsupported("addressType", atype, types))
    for i, ep in enumerate(obj.get("endpoints") or []):
        if not ep.get("addresses"):
            causes.append(_required(f"endpoints[{i}].addresses"))
    return causes


def _binding(obj: Mapping[str, Any]) -> list[Cause]:
    ref = obj.get("roleRef") or {}
    causes: list[Cause] = []
    if ref.get("kind") not in ("Role", "ClusterRole"):
        causes.append(_unsupported("roleRef.kind", ref.get("kind"), ["ClusterRole", "Role"]))
    if not ref.get("name"):
        causes.append(_required("roleRef.name"))
    return causes


def _cluster_binding(obj: Mapping[str, Any]) -> list[Cause]:
    ref = obj.get("roleRef") or {}
    if ref.get("kind") != "ClusterRole":
        return [_unsupported("roleRef.kind", ref.get("kind"), ["ClusterRole"])]
    return [] if ref.get("name") else [_required("roleRef.name")]


KIND_RULES: dict[str, Callable[[Mapping[str, Any]], list[Cause]]] = {
    "services": _service,
    "secrets": _secret,
    "endpointslices": _endpoint_slice,
    "rolebindings": _binding,
    "clusterrolebindings": _cluster_binding,
}


def validate_object(plural: str, obj: Mapping[str, Any]) -> list[Cause]:
    meta = obj.get("metadata") or {}
    causes = validate_name(plural, meta.get("name", ""))
    causes += validate_metadata(meta)
    rule = KIND_RULES.get(plural)
    if rule:
        causes += rule(obj)
    return causes


IMMUTABLE: dict[str, tuple[str, ...]] = {
    "secrets": ("type",),
    "rolebindings": ("roleRef",),
    "clusterrolebindings": ("roleRef",),
    "customresourcedefinitions": ("spec.group",),
}
FROZEN_WHEN_IMMUTABLE = {"configmaps": ("data", "binaryData"), "secrets": ("data",)}
"""What ``immutable: true`` freezes; a Secret's ``stringData`` is already folded into ``data``."""


def _dig(obj: Mapping[str, Any], path: str) -> Any:
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, Mapping) else None
    return cur


def _frozen_by_immutable(plural: str, old: Mapping[str, Any],
                         new: Mapping[str, Any]) -> list[Cause]:
    if plural not in FROZEN_WHEN_IMMUTABLE or old.get("immutable") is not True:
        return []
    why = "Forbidden: field is immutable when `immutable` is set"
    causes = []
    if new.get("immutable") is not True:
        causes.append(Cause("immutable", why, "FieldValueForbidden"))
    for key in FROZEN_WHEN_IMMUTABLE[plural]:
        if (old.get(key) or {}) != (new.get(key) or {}):
            causes.append(Cause(key, why, "FieldValueForbidden"))
    return causes


def _service_cluster_ips(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Cause]:
    """kube's validateUpgradeDowngradeClusterIPs for single-stack Services."""
    old_spec, new_spec = old.get("spec") or {}, new.get("spec") or {}
    if "ExternalName" in (old_spec.get("type"), new_spec.get("type")):
        return []
    before = list(old_spec.get("clusterIPs") or [])
    after = list(new_spec.get("clusterIPs") or [])
    if before == ["None"] and after == ["None"]:
        return []
    if before and not after:
        return [Cause("spec.clusterIPs[0]",
                      f"Invalid value: {json.dumps(after)}: primary clusterIP can not be unset")]
    return [Cause(f"spec.clusterIPs[{i}]", f"Invalid value: {json.dumps(after)}: may not "
                  "change once set") for i, ip in enumerate(before[:len(after)]) if ip != after[i]]


def validate_update(plural: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Cause]:
    causes: list[Cause] = []
    for path in IMMUTABLE.get(plural, ()):
        before, after = _dig(old, path), _dig(new, path)
        if before not in (None, "") and after != before:
            causes.append(Cause(path, f"Invalid value: {json.dumps(after)}: field is immutable"))
    causes += _frozen_by_immutable(plural, old, new)
    if plural == "services":
        causes += _service_cluster_ips(old, new)
    elif plural == "pods":
        causes += pod_spec_update(old.get("spec") or {}, new.get("spec") or {})
    return causes
