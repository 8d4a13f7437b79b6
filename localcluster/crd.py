"""CustomResourceDefinitions: the checks kube-apiserver makes on one, and the types it adds.

`validate_crd` returns the field-level causes kube would give for a v1 CRD
(names, scope, versions, and that each version's openAPIV3Schema is a
structural schema); `resource_types` turns an accepted CRD into one
`ResourceType` per served version. Both read the CRD after kube's defaulting
(`crd_with_defaults`: singular and listKind from kind, conversion strategy None).

Not checked: that defaults validate against their own schema, CEL rules
(``x-kubernetes-validations``), printer-column and selectable-field JSONPaths,
and conversion webhooks beyond the strategy name.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from jsonschema import Draft4Validator

from localcluster.errors import Cause
from localcluster.resources import ResourceType

_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?\Z")
_DNS1035_MESSAGE = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
    "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or "
    "'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
)
_DNS1123_SUBDOMAIN = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z"
)
_DNS1123_SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    r"for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_TYPES = ("array", "boolean", "integer", "number", "object", "string")
_SCOPES = ("Cluster", "Namespaced")
# Keywords a structural schema may not use at all (kube's "Forbidden" list).
_UNSUPPORTED = ("$ref", "$schema", "id", "definitions", "dependencies", "additionalItems",
                "patternProperties")
# What may not appear inside anyOf/allOf/oneOf/not: those only add value validations.
_NOT_IN_JUNCTORS = ("type", "description", "default", "nullable", "additionalProperties",
                    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
                    "x-kubernetes-int-or-string")
_JUNCTORS = ("allOf", "anyOf", "oneOf")


def _m(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _shown(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=repr)


def _invalid(path: str, value: Any, detail: str) -> Cause:
    return Cause(path, f"Invalid value: {_shown(value)}: {detail}", "FieldValueInvalid")


def _required(path: str, detail: str = "") -> Cause:
    return Cause(path, f"Required value: {detail}" if detail else "Required value",
                 "FieldValueRequired")


def _forbidden(path: str, detail: str) -> Cause:
    return Cause(path, f"Forbidden: {detail}", "FieldValueForbidden")


def _not_supported(path: str, value: Any, allowed: tuple[str, ...]) -> Cause:
    listed = ", ".join(json.dumps(a) for a in allowed)
    return Cause(path, f"Unsupported value: {_shown(value)}: supported values: {listed}",
                 "FieldValueNotSupported")


def _dns1035(value: str) -> list[str]:
    errors = []
    if len(value) > 63:
        errors.append("must be no more than 63 characters")
    if not _DNS1035.match(value):
        errors.append(_DNS1035_MESSAGE)
    return errors


def crd_with_defaults(crd: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `crd` with the fields kube-apiserver defaults filled in."""
    out = copy.deepcopy(dict(crd))
    spec = out.get("spec")
    if not isinstance(spec, dict):
        return out
    names = spec.get("names")
    if isinstance(names, dict):
        kind = _str(names.get("kind"))
        if not names.get("singular") and kind:
            names["singular"] = kind.lower()
        if not names.get("listKind") and kind:
            names["listKind"] = f"{kind}List"
    conversion = spec.setdefault("conversion", {})
    if isinstance(conversion, dict):
        conversion.setdefault("strategy", "None")
    return out


# ---------------------------------------------------------------- validation


def validate_crd(crd: Mapping[str, Any]) -> list[Cause]:
    """The causes kube-apiserver would reject this v1 CRD with; empty when it is fine."""
    crd = crd_with_defaults(crd)
    spec = _m(crd.get("spec"))
    names = _m(spec.get("names"))
    group = _str(spec.get("group"))
    plural = _str(names.get("plural"))
    causes: list[Cause] = []
    name = _str(_m(crd.get("metadata")).get("name"))
    if name != f"{plural}.{group}":
        causes.append(_invalid("metadata.name", name, 'must be spec.names.plural+"."+spec.group'))
    causes += _group_causes(group)
    causes += _names_causes(names)
    scope = spec.get("scope")
    if not scope:
        causes.append(_required("spec.scope"))
    elif scope not in _SCOPES:
        causes.append(_not_supported("spec.scope", scope, _SCOPES))
    strategy = _m(spec.get("conversion")).get("strategy")
    if strategy not in ("None", "Webhook"):
        causes.append(_not_supported("spec.conversion.strategy", strategy, ("None", "Webhook")))
    if spec.get("preserveUnknownFields") is True:
        causes.append(_invalid("spec.preserveUnknownFields", True,
                               "cannot set to true, set x-kubernetes-preserve-unknown-fields "
                               "to true in spec.versions[*].schema instead"))
    causes += _versions_causes(spec.get("versions"))
    return causes


def _group_causes(group: str) -> list[Cause]:
    if not group:
        return [_required("spec.group")]
    causes = []
    if len(group) > 253:
        causes.append(_invalid("spec.group", group, "must be no more than 253 characters"))
    if not _DNS1123_SUBDOMAIN.match(group):
        causes.append(_invalid("spec.group", group, _DNS1123_SUBDOMAIN_MESSAGE))
    if "." not in group:
        causes.append(_invalid("spec.group", group, "should be a domain with at least one dot"))
    return causes


def _names_causes(names: Mapping[str, Any]) -> list[Cause]:
    causes: list[Cause] = []
    for key in ("plural", "singular", "kind", "listKind"):
        value = names.get(key)
        path = f"spec.names.{key}"
        if not value:
            causes.append(_required(path))
            continue
        if not isinstance(value, str):
            causes.append(_invalid(path, value, "must be a string"))
            continue
        if key in ("plural", "singular"):
            errors = _dns1035(value)
            if errors:
                causes.append(_invalid(path, value, ",".join(errors)))
        else:
            errors = _dns1035(value.lower())
            if errors:
                causes.append(_invalid(path, value, "may have mixed case, but should otherwise "
                                                    "match: " + ",".join(errors)))
    if names.get("kind") and names.get("kind") == names.get("listKind"):
        causes.append(_invalid("spec.names.listKind", names.get("listKind"),
                               "kind and listKind may not be the same"))
    for key in ("shortNames", "categories"):
        for index, value in enumerate(_list(names.get(key))):
            errors = _dns1035(value) if isinstance(value, str) else ["must be a string"]
            if errors:
                causes.append(_invalid(f"spec.names.{key}[{index}]", value, ",".join(errors)))
    return causes


def _versions_causes(versions: Any) -> list[Cause]:
    if not isinstance(versions, list) or not versions:
        return [_required("spec.versions", "must have exactly one version marked as "
                                           "storage version")]
    causes: list[Cause] = []
    seen: set[str] = set()
    names = [_m(v).get("name") for v in versions]
    for index, version in enumerate(versions):
        path = f"spec.versions[{index}]"
        name = _m(version).get("name")
        if not isinstance(name, str) or not name:
            causes.append(_required(f"{path}.name"))
        else:
            errors = _dns1035(name)
            if errors:
                causes.append(_invalid(f"{path}.name", name, ",".join(errors)))
            if name in seen:
                causes.append(Cause(f"{path}.name", f"Duplicate value: {_shown(name)}",
                                    "FieldValueDuplicate"))
            seen.add(name)
        schema = _m(_m(version).get("schema")).get("openAPIV3Schema")
        schema_path = f"{path}.schema.openAPIV3Schema"
        if not isinstance(schema, Mapping):
            causes.append(_required(schema_path, "schemas are required"))
        else:
            causes += structural_causes(schema, schema_path)
    storage = sum(1 for v in versions if _m(v).get("storage") is True)
    if storage != 1:
        causes.append(_invalid("spec.versions", names,
                               "must have exactly one version marked as storage version"))
    return causes


def structural_causes(schema: Mapping[str, Any], path: str) -> list[Cause]:
    """Why `schema` is not a structural schema kube-apiserver would accept at its root."""
    causes = list(_metaschema_causes(schema, path))
    root_type = schema.get("type")
    if not root_type:
        causes.append(_required(f"{path}.type", "must not be empty at the root"))
    elif root_type != "object":
        causes.append(_invalid(f"{path}.type", root_type, "must be object at the root"))
    causes += _node_causes(schema, path, typed=False)
    return causes


def _metaschema_causes(schema: Mapping[str, Any], path: str) -> Iterator[Cause]:
    """Keywords of the wrong shape (``minimum: "x"``, ``required: "a"``): Draft 4's metaschema."""
    for error in Draft4Validator(Draft4Validator.META_SCHEMA).iter_errors(schema):
        parts = list(error.absolute_path)
        if error.validator in ("minItems", "uniqueItems") or parts[-1:] == ["type"]:
            continue  # kube takes empty `required`/`enum` lists; types are checked below
        where = _schema_path(path, parts)
        if error.validator == "type":
            detail = f"must be of type {error.validator_value}"
        else:
            detail = error.message
        yield _invalid(where, error.instance, detail)


def _schema_path(path: str, parts: list[Any]) -> str:
    """kube's notation for a place in a schema: ``properties[spec].items.type``."""
    out = path
    named = False
    for part in parts:
        if named or isinstance(part, int):
            out += f"[{part}]"
            named = False
        else:
            out += f".{part}"
            named = part == "properties"
    return out


def _node_causes(node: Mapping[str, Any], path: str, *, typed: bool) -> list[Cause]:
    """Structural rules for one schema node and, recursively, those under it.

    `typed` says whether this node is a specified field (a property, an
    additionalProperties or items schema), which must declare its type.
    """
    causes: list[Cause] = []
    node_type = node.get("type")
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if isinstance(node_type, str) and node_type and node_type not in _TYPES:
        causes.append(_not_supported(f"{path}.type", node_type, _TYPES))
    if typed and not node_type and not int_or_string and preserve is not True:
        causes.append(_required(f"{path}.type", "must not be empty for specified object fields"
                                if not path.endswith(".items") else
                                "must not be empty for specified array items"))
    if int_or_string and node_type:
        causes.append(_invalid(f"{path}.type", node_type,
                               "must be empty for x-kubernetes-int-or-string"))
    if preserve is not None and preserve is not True:
        causes.append(_invalid(f"{path}.x-kubernetes-preserve-unknown-fields", preserve,
                               "must be true or undefined"))
    if node.get("x-kubernetes-embedded-resource") is True and node_type != "object":
        causes.append(_invalid(f"{path}.type", node_type,
                               "must be object if x-kubernetes-embedded-resource is true"))
    for keyword in _UNSUPPORTED:
        if keyword in node:
            causes.append(_forbidden(f"{path}.{keyword}", f"{keyword} is not supported"))
    if node.get("uniqueItems") is True:
        causes.append(_forbidden(f"{path}.uniqueItems", "uniqueItems cannot be set to true "
                                 "since the runtime complexity becomes quadratic"))
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        try:
            re.compile(pattern)
        except re.error as exc:
            causes.append(_invalid(f"{path}.pattern", pattern,
                                   f"must be a valid regular expression, but isn't: {exc}"))
    causes += _children_causes(node, path)
    causes += _junctor_causes(node, path, int_or_string=int_or_string)
    return causes


def _children_causes(node: Mapping[str, Any], path: str) -> list[Cause]:
    causes: list[Cause] = []
    properties = node.get("properties")
    additional = node.get("additionalProperties")
    if isinstance(properties, Mapping):
        for name, child in properties.items():
            if isinstance(child, Mapping):
                causes += _node_causes(child, f"{path}.properties[{name}]", typed=True)
        if additional is not None and additional is not False:
            causes.append(_forbidden(f"{path}.additionalProperties",
                                     "additionalProperties and properties are mutual exclusive"))
    if additional is False:
        causes.append(_forbidden(f"{path}.additionalProperties",
                                 "additionalProperties cannot be set to false"))
    elif isinstance(additional, Mapping):
        causes += _node_causes(additional, f"{path}.additionalProperties", typed=True)
    items = node.get("items")
    if isinstance(items, Mapping):
        causes += _node_causes(items, f"{path}.items", typed=True)
    elif isinstance(items, list):
        causes.append(_forbidden(f"{path}.items", "items must be a schema object and not an "
                                 "array"))
    elif node.get("type") == "array":
        causes.append(_required(f"{path}.items", "must be specified"))
    return causes


def _junctor_causes(node: Mapping[str, Any], path: str, *, int_or_string: bool) -> list[Cause]:
    causes: list[Cause] = []
    branches: list[tuple[str, Any]] = [
        (f"{path}.{key}[{i}]", branch)
        for key in _JUNCTORS for i, branch in enumerate(_list(node.get(key)))
    ]
    if "not" in node:
        branches.append((f"{path}.not", node["not"]))
    for branch_path, branch in branches:
        if isinstance(branch, Mapping):
            causes += _value_validation_causes(branch, branch_path, int_or_string=int_or_string)
    return causes


def _value_validation_causes(
    node: Mapping[str, Any], path: str, *, int_or_string: bool
) -> list[Cause]:
    causes: list[Cause] = []
    for keyword in _NOT_IN_JUNCTORS:
        # `anyOf: [{type: integer}, {type: string}]` is how int-or-string may spell itself
        if keyword == "type" and int_or_string and node.get("type") in ("integer", "string"):
            continue
        if keyword in node:
            causes.append(_forbidden(f"{path}.{keyword}", "must be empty to be structural"))
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), Mapping):
            causes += _value_validation_causes(node[key], f"{path}.{key}",
                                               int_or_string=False)
    for name, child in _m(node.get("properties")).items():
        if isinstance(child, Mapping):
            causes += _value_validation_causes(child, f"{path}.properties[{name}]",
                                               int_or_string=False)
    causes += _junctor_causes(node, path, int_or_string=False)
    return causes


# ---------------------------------------------------------------- resource types


def storage_version(crd: Mapping[str, Any]) -> str:
    """The name of the version marked ``storage: true``; ValueError if there is none."""
    for version in _list(_m(crd.get("spec")).get("versions")):
        if _m(version).get("storage") is True and isinstance(_m(version).get("name"), str):
            return str(version["name"])
    raise ValueError(f"CustomResourceDefinition {_m(crd.get('metadata')).get('name')!r} has no "
                     "storage version")


def resource_types(crd: Mapping[str, Any]) -> list[ResourceType]:
    """One `ResourceType` per served version of an accepted CRD.

    `extra` carries ``storage`` (bool) and, when the version has them,
    ``additionalPrinterColumns`` and ``scale`` (the scale subresource).
    """
    crd = crd_with_defaults(crd)
    spec = _m(crd.get("spec"))
    names = _m(spec.get("names"))
    out: list[ResourceType] = []
    for entry in _list(spec.get("versions")):
        version = _m(entry)
        if version.get("served") is not True:
            continue
        subresources = _m(version.get("subresources"))
        extra: dict[str, Any] = {"storage": version.get("storage") is True}
        if version.get("additionalPrinterColumns"):
            extra["additionalPrinterColumns"] = version["additionalPrinterColumns"]
        if isinstance(subresources.get("scale"), Mapping):
            extra["scale"] = subresources["scale"]
        schema = _m(version.get("schema")).get("openAPIV3Schema")
        out.append(ResourceType(
            group=_str(spec.get("group")),
            version=_str(version.get("name")),
            kind=_str(names.get("kind")),
            plural=_str(names.get("plural")),
            namespaced=spec.get("scope") == "Namespaced",
            schema=dict(schema) if isinstance(schema, Mapping) else None,
            singular=_str(names.get("singular")),
            short_names=tuple(s for s in _list(names.get("shortNames")) if isinstance(s, str)),
            categories=tuple(c for c in _list(names.get("categories")) if isinstance(c, str)),
            status_subresource=isinstance(subresources.get("status"), Mapping),
            field_labels=tuple(
                _str(_m(f).get("jsonPath")).removeprefix(".")
                for f in _list(version.get("selectableFields"))
                if _str(_m(f).get("jsonPath"))
            ),
            crd_name=_str(_m(crd.get("metadata")).get("name")) or None,
            extra=extra,
        ))
    return out


__all__ = ["crd_with_defaults", "resource_types", "storage_version", "structural_causes",
           "validate_crd"]
