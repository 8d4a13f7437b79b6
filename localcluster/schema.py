"""Structural schemas: derived for built-in kinds, and used to prune and validate objects.

`builtin_schema` turns a model class of the official kubernetes client into an
OpenAPI v3 structural schema, adding the strategic-merge extensions kubectl
reads. `check` treats an incoming object the way kube-apiserver treats a custom
resource with a structural schema:

1. prune: fields the schema does not declare are dropped (and reported, for
   ``fieldValidation=Strict``/``Warn``), except under
   ``x-kubernetes-preserve-unknown-fields`` or ``additionalProperties``;
   ``apiVersion``, ``kind`` and ``metadata`` are always kept at the root and in
   embedded resources, and ``metadata`` is pruned to ObjectMeta;
2. drop ``null`` values of non-nullable properties and apply ``default``s;
3. validate values with a Draft 4 validator from `jsonschema`, extended for
   ``nullable``, ``x-kubernetes-int-or-string``, ``x-kubernetes-embedded-resource``
   and ``x-kubernetes-list-type``, and report failures as kube's StatusCauses.

``x-kubernetes-validations`` (CEL rules) are not evaluated. Formats checked are
int32, int64, date-time, date, byte, uuid, ipv4, ipv6 and cidr; others pass.
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
import ipaddress
import json
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import kubernetes.client
from jsonschema import Draft4Validator, FormatChecker, ValidationError, validators

from localcluster.errors import ApiError, Cause

# ---------------------------------------------------------------- built-ins

FREE_FORM: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}

# Models that hold arbitrary JSON (CRD schemas inside CRDs) rather than a fixed shape.
_FREE_FORM_MODELS = frozenset({"V1JSONSchemaProps"})

# The client types IntOrString as 'object'; these are the fields that hold one.
_INT_OR_STRING_NAMES = frozenset({"port", "targetPort", "maxSurge", "maxUnavailable",
                                  "minAvailable"})

# resource.Quantity is 'str' in the client, but JSON and YAML numbers (`cpu: 1`,
# `cpu: 0.5`) are accepted by kube, so these fields take a string or a number.
_QUANTITY_FIELDS = frozenset({
    ("V1ResourceRequirements", "limits"), ("V1ResourceRequirements", "requests"),
    ("V1VolumeResourceRequirements", "limits"), ("V1VolumeResourceRequirements", "requests"),
    ("V1EmptyDirVolumeSource", "sizeLimit"), ("V1ResourceFieldSelector", "divisor"),
    ("V1PodSpec", "overhead"), ("V1ContainerStatus", "allocatedResources"),
    ("V1NodeStatus", "capacity"), ("V1NodeStatus", "allocatable"),
    ("V1PersistentVolumeSpec", "capacity"), ("V1PersistentVolumeClaimStatus", "capacity"),
    ("V1PersistentVolumeClaimStatus", "allocatedResources"),
    ("V1ResourceQuotaSpec", "hard"), ("V1ResourceQuotaStatus", "hard"),
    ("V1ResourceQuotaStatus", "used"),
})
_QUANTITY: dict[str, Any] = {"oneOf": [{"type": "string"}, {"type": "number"}]}

# Strategic-merge metadata of the fields kubectl apply merges (from kube's Go tags).
_PATCH: dict[tuple[str, str], tuple[str, str | None]] = {
    ("V1ObjectMeta", "finalizers"): ("merge", None),
    ("V1ObjectMeta", "ownerReferences"): ("merge", "uid"),
    ("V1ServiceSpec", "ports"): ("merge", "port"),
    ("V1ServiceStatus", "conditions"): ("merge", "type"),
    ("V1PodSpec", "containers"): ("merge", "name"),
    ("V1PodSpec", "initContainers"): ("merge", "name"),
    ("V1PodSpec", "ephemeralContainers"): ("merge", "name"),
    ("V1PodSpec", "volumes"): ("merge,retainKeys", "name"),
    ("V1PodSpec", "imagePullSecrets"): ("merge", "name"),
    ("V1PodSpec", "hostAliases"): ("merge", "ip"),
    ("V1PodSpec", "topologySpreadConstraints"): ("merge", "topologyKey"),
    ("V1PodSpec", "schedulingGates"): ("merge", "name"),
    ("V1PodSpec", "resourceClaims"): ("merge,retainKeys", "name"),
    ("V1PodStatus", "conditions"): ("merge", "type"),
    ("V1PodStatus", "podIPs"): ("merge", "ip"),
    ("V1ServiceAccount", "secrets"): ("merge", "name"),
    ("V1NamespaceStatus", "conditions"): ("merge", "type"),
    ("V1MutatingWebhookConfiguration", "webhooks"): ("merge", "name"),
    ("V1ValidatingWebhookConfiguration", "webhooks"): ("merge", "name"),
    **{(container, name): ("merge", key)
       for container in ("V1Container", "V1EphemeralContainer")
       for name, key in (("ports", "containerPort"), ("env", "name"),
                         ("volumeMounts", "mountPath"), ("volumeDevices", "devicePath"))},
}

# Only fields kube-apiserver itself rejects when missing; the client marks more
# (e.g. CRD versions' `served`) that kube merely decodes as zero values.
_REQUIRED: dict[str, tuple[str, ...]] = {
    "V1ServicePort": ("port",), "CoreV1EndpointPort": ("port",), "V1EndpointAddress": ("ip",),
    "V1PodSpec": ("containers",), "V1Container": ("name",), "V1EphemeralContainer": ("name",),
    "V1ContainerPort": ("containerPort",), "V1EnvVar": ("name",), "V1Volume": ("name",),
    "V1VolumeMount": ("name", "mountPath"), "V1KeyToPath": ("key", "path"),
    "V1HostAlias": ("ip",), "V1HTTPGetAction": ("port",), "V1TCPSocketAction": ("port",),
    "V1SecretKeySelector": ("key",), "V1ConfigMapKeySelector": ("key",),
    "V1ObjectFieldSelector": ("fieldPath",), "V1ResourceFieldSelector": ("resource",),
    "V1LabelSelectorRequirement": ("key", "operator"),
    "V1OwnerReference": ("apiVersion", "kind", "name", "uid"),
    "V1EndpointSlice": ("addressType",), "V1Endpoint": ("addresses",),
    "V1PolicyRule": ("verbs",), "RbacV1Subject": ("kind", "name"),
    "V1RoleRef": ("kind", "name"), "V1RoleBinding": ("roleRef",),
    "V1ClusterRoleBinding": ("roleRef",), "V1CustomResourceDefinition": ("spec",),
    "V1CustomResourceDefinitionSpec": ("group", "names", "scope", "versions"),
    "V1CustomResourceDefinitionNames": ("kind", "plural"),
    "V1CustomResourceDefinitionVersion": ("name",),
}

# Structs kube's types mark `+structType=atomic`: replaced whole, owned as one field.
_ATOMIC_STRUCTS = frozenset({
    "V1LabelSelector", "V1OwnerReference", "V1ObjectReference", "V1LocalObjectReference",
    "V1TypedLocalObjectReference", "V1ObjectFieldSelector", "V1ResourceFieldSelector",
    "V1SecretKeySelector", "V1ConfigMapKeySelector", "V1NodeSelector", "V1NodeSelectorTerm",
})

_SCALARS: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "datetime": {"type": "string", "format": "date-time"},
    "date": {"type": "string", "format": "date"},
    "bytes": {"type": "string", "format": "byte"},
}

_building: set[str] = set()


@functools.cache
def builtin_schema(model: str) -> dict[str, Any]:
    """The structural schema of a kubernetes client model, e.g. ``"V1Service"``.

    Nested models are inlined. The result is cached and shared: do not mutate it.
    Raises ValueError for a name the client does not have.
    """
    if model in _FREE_FORM_MODELS or model in _building:
        # A model met again while it is being built would recurse forever.
        return dict(FREE_FORM)
    cls = getattr(kubernetes.client, model, None)
    types: Mapping[str, str] | None = getattr(cls, "openapi_types", None)
    if cls is None or types is None:
        raise ValueError(f"the kubernetes client has no model named {model!r}")
    names: Mapping[str, str] = cls.attribute_map
    field_info: Mapping[str, Any] = getattr(cls, "model_fields", {})
    _building.add(model)
    try:
        properties: dict[str, Any] = {}
        for attr, type_name in types.items():
            name = names[attr]
            prop = _field_schema(model, name, type_name)
            description = getattr(field_info.get(attr), "description", None)
            if description:
                prop = {**prop, "description": description}  # the field says more than its type
            properties[name] = prop
    finally:
        _building.discard(model)
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    summary = _model_description(cls)
    if summary:
        schema = {"description": summary, **schema}
    if model in _REQUIRED:
        schema["required"] = list(_REQUIRED[model])
    if model in _ATOMIC_STRUCTS:
        schema["x-kubernetes-map-type"] = "atomic"
    return schema


def _model_description(cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    summary = doc.split("\n\n", 1)[0]
    if summary.startswith(("NOTE:", "Attributes:")):
        return ""
    return " ".join(summary.split())


def _field_schema(model: str, name: str, type_name: str) -> dict[str, Any]:
    if type_name == "object" and name in _INT_OR_STRING_NAMES:
        schema: dict[str, Any] = {"x-kubernetes-int-or-string": True}
    elif (model, name) in _QUANTITY_FIELDS:
        schema = _type_schema(type_name, quantity=True)
    else:
        schema = _type_schema(type_name, quantity=False)
    patch = _PATCH.get((model, name))
    if patch is not None:
        schema = dict(schema)
        schema["x-kubernetes-patch-strategy"] = patch[0]
        if patch[1] is not None:
            schema["x-kubernetes-patch-merge-key"] = patch[1]
    return schema


def _type_schema(type_name: str, *, quantity: bool) -> dict[str, Any]:
    if type_name.startswith("List[") and type_name.endswith("]"):
        return {"type": "array", "items": _type_schema(type_name[5:-1], quantity=quantity)}
    if type_name.startswith("Dict[") and type_name.endswith("]"):
        value_type = type_name[5:-1].split(",", 1)[1].strip()
        return {"type": "object",
                "additionalProperties": _type_schema(value_type, quantity=quantity)}
    if quantity:
        return dict(_QUANTITY)
    if type_name == "object":
        return {"x-kubernetes-preserve-unknown-fields": True}
    if type_name in _SCALARS:
        return dict(_SCALARS[type_name])
    return builtin_schema(type_name)


# ---------------------------------------------------------------- pruning


@dataclass(frozen=True)
class Checked:
    """What `check` made of an object: the pruned object, what was dropped, what is wrong."""

    obj: dict[str, Any]
    unknown_fields: tuple[str, ...]
    causes: tuple[Cause, ...]


_META_FIELDS = ("apiVersion", "kind", "metadata")


def check(obj: Mapping[str, Any], schema: Mapping[str, Any]) -> Checked:
    """Prune, default and validate `obj` (a whole object) against its kind's schema.

    Never raises anything but `ApiError`: a schema the validator cannot use is
    an internal error (500), an object nested too deeply a bad request.
    """
    try:
        root = _root_schema(schema)
        unknown: list[str] = []
        pruned = _prune(obj, root, "", unknown)
        causes = tuple(_validate(pruned, root))
    except RecursionError:
        raise ApiError.bad_request("the object is nested too deeply") from None
    except ApiError:
        raise
    except Exception as exc:  # a broken schema must not escape as a foreign exception
        raise ApiError(500, "InternalError", f"cannot validate against the schema: {exc}") from exc
    return Checked(obj=pruned, unknown_fields=tuple(unknown), causes=causes)


def _root_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    properties = dict(_mapping(schema.get("properties")))
    properties.setdefault("apiVersion", {"type": "string"})
    properties.setdefault("kind", {"type": "string"})
    properties["metadata"] = _metadata_schema(properties.get("metadata"))
    root = dict(schema)
    root["properties"] = properties
    root.setdefault("type", "object")
    return root


def _metadata_schema(declared: Any) -> dict[str, Any]:
    """ObjectMeta, narrowed by what a CRD may say about name and generateName."""
    meta = builtin_schema("V1ObjectMeta")
    if declared is meta or not isinstance(declared, Mapping):
        return meta
    narrowed = _mapping(declared.get("properties"))
    if not any(key in narrowed for key in ("name", "generateName")):
        return meta
    properties = dict(meta["properties"])
    for key in ("name", "generateName"):
        if isinstance(narrowed.get(key), Mapping):
            properties[key] = {**properties[key], **narrowed[key]}
    return {**meta, "properties": properties}


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _child(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_mismatch(schema: Mapping[str, Any], json_type: str) -> bool:
    declared = schema.get("type")
    return declared is not None and declared != json_type


def _prune(value: Any, schema: Mapping[str, Any], path: str, unknown: list[str]) -> Any:
    """A copy of `value` without undeclared fields; their paths go to `unknown`."""
    if isinstance(value, Mapping):
        if _type_mismatch(schema, "object"):
            return copy.deepcopy(value)  # left whole for validation to report
        return _prune_object(value, schema, path, unknown)
    if isinstance(value, list):
        if _type_mismatch(schema, "array"):
            return copy.deepcopy(value)
        items = schema.get("items")
        if items is None and schema.get("x-kubernetes-preserve-unknown-fields") is True:
            return copy.deepcopy(value)
        item_schema = _mapping(items)
        return [_prune(item, item_schema, f"{path}[{i}]", unknown) for i, item in enumerate(value)]
    if (isinstance(value, float) and value.is_integer()
            and (schema.get("type") == "integer" or schema.get("x-kubernetes-int-or-string"))):
        return int(value)  # JSON 3.0 is the integer 3; Go clients reject "3.0" for an int
    return value


def _prune_object(
    value: Mapping[str, Any], schema: Mapping[str, Any], path: str, unknown: list[str]
) -> dict[str, Any]:
    properties = _mapping(schema.get("properties"))
    additional = schema.get("additionalProperties")
    keep_unknown = schema.get("x-kubernetes-preserve-unknown-fields") is True or additional is True
    embedded = schema.get("x-kubernetes-embedded-resource") is True
    out: dict[str, Any] = {}
    for key, item in value.items():
        item_path = _child(path, key)
        declared = properties.get(key)
        if embedded and key in _META_FIELDS and not isinstance(declared, Mapping):
            declared = _metadata_schema(None) if key == "metadata" else {"type": "string"}
        if isinstance(declared, Mapping):
            if item is None and not declared.get("nullable"):
                # kube drops nulls of non-nullable fields before defaulting
                continue
            out[key] = _prune(item, declared, item_path, unknown)
        elif isinstance(additional, Mapping):
            out[key] = _prune(item, additional, item_path, unknown)
        elif keep_unknown:
            out[key] = copy.deepcopy(item)
        else:
            unknown.append(item_path)
    for key, declared in properties.items():
        if key not in out and isinstance(declared, Mapping) and "default" in declared:
            # kube prunes defaults when the CRD is written; what they'd lose is not the caller's
            out[key] = _prune(copy.deepcopy(declared["default"]), declared, "", [])
    return out


# ---------------------------------------------------------------- validation


def _is_integer(_checker: Any, value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _is_number(_checker: Any, value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_TYPE_CHECKER = Draft4Validator.TYPE_CHECKER.redefine_many(
    {"integer": _is_integer, "number": _is_number}
)

_Keyword = Callable[[Any, Any, Any, Mapping[str, Any]], Iterator[ValidationError]]


def _unless_null(keyword: _Keyword) -> _Keyword:
    """kube accepts null for a nullable field without looking at its other constraints."""

    def checked(
        validator: Any, value: Any, instance: Any, schema: Mapping[str, Any]
    ) -> Iterator[ValidationError]:
        if instance is None and schema.get("nullable") is True:
            return
        yield from keyword(validator, value, instance, schema)

    return checked


def _required(
    validator: Any, required: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if not isinstance(instance, Mapping) or not isinstance(required, list):
        return
    for name in required:
        if name not in instance:
            yield ValidationError("Required value", path=(name,))


@functools.lru_cache(maxsize=512)
def _compiled(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except (re.error, TypeError):
        return None


def _pattern(
    validator: Any, pattern: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    compiled = _compiled(pattern) if isinstance(pattern, str) else None
    if isinstance(instance, str) and compiled is not None and not compiled.search(instance):
        yield ValidationError(f"does not match {pattern!r}")


def _int_or_string(
    validator: Any, enabled: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if enabled is True and not (isinstance(instance, str) or _is_integer(None, instance)):
        yield ValidationError("must be an integer or a string")


def _embedded(
    validator: Any, enabled: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if enabled is not True or not isinstance(instance, Mapping):
        return
    properties = _mapping(schema.get("properties"))
    for key in ("apiVersion", "kind"):
        if not instance.get(key):
            yield ValidationError("Required value: must not be empty", path=(key,))
        elif key not in properties:
            yield from validator.descend(instance[key], {"type": "string"}, path=key)
    if "metadata" in instance and "metadata" not in properties:
        yield from validator.descend(instance["metadata"], _metadata_schema(None), path="metadata")


def _list_type(
    validator: Any, list_type: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if not isinstance(instance, list) or list_type not in ("set", "map"):
        return
    keys = schema.get("x-kubernetes-list-map-keys") or []
    seen: set[str] = set()
    for index, item in enumerate(instance):
        if list_type == "map" and isinstance(item, Mapping):
            identity: Any = {key: item.get(key) for key in keys}
        else:
            identity = item
        canonical = _json(identity, sort_keys=True)
        if canonical in seen:
            yield ValidationError(f"Duplicate value: {_json(identity)}", path=(index,))
        seen.add(canonical)


def _format_int(bits: int) -> Callable[[Any], bool]:
    limit = 1 << (bits - 1)

    def fits(value: Any) -> bool:
        return not _is_integer(None, value) or -limit <= value < limit

    return fits


_DATE_TIME = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)\Z")


def _date_time(value: Any) -> bool:
    if not isinstance(value, str):
        return True
    if not _DATE_TIME.match(value):
        return False
    text = re.sub(r"\.(\d{1,6})\d*", r".\1", value.upper().replace("Z", "+00:00"))
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def _string_format(parse: Callable[[str], object]) -> Callable[[Any], bool]:
    def valid(value: Any) -> bool:
        if not isinstance(value, str):
            return True
        try:
            parse(value)
        except (ValueError, binascii.Error):
            return False
        return True

    return valid


def _date(value: str) -> None:
    if not re.fullmatch(r"\d{4}-\d\d-\d\d", value):
        raise ValueError(value)
    date.fromisoformat(value)


_FORMATS = FormatChecker(formats=())
for _name, _valid in {
    "int32": _format_int(32),
    "int64": _format_int(64),
    "date-time": _date_time,
    "date": _string_format(_date),
    "byte": _string_format(lambda s: base64.b64decode(s, validate=True)),
    "uuid": _string_format(uuid.UUID),
    "ipv4": _string_format(ipaddress.IPv4Address),
    "ipv6": _string_format(ipaddress.IPv6Address),
    "cidr": _string_format(lambda s: ipaddress.ip_network(s, strict=False)),
}.items():
    _FORMATS.checks(_name)(_valid)

_DRAFT4 = Draft4Validator.VALIDATORS
_KubeValidator = validators.extend(
    Draft4Validator,
    validators={
        "type": _unless_null(_DRAFT4["type"]),
        "enum": _unless_null(_DRAFT4["enum"]),
        "format": _unless_null(_DRAFT4["format"]),
        "anyOf": _unless_null(_DRAFT4["anyOf"]),
        "allOf": _unless_null(_DRAFT4["allOf"]),
        "oneOf": _unless_null(_DRAFT4["oneOf"]),
        "not": _unless_null(_DRAFT4["not"]),
        "required": _required,
        "pattern": _pattern,
        "x-kubernetes-int-or-string": _unless_null(_int_or_string),
        "x-kubernetes-embedded-resource": _embedded,
        "x-kubernetes-list-type": _list_type,
    },
    type_checker=_TYPE_CHECKER,
    format_checker=_FORMATS,
)


def _validate(obj: Mapping[str, Any], schema: Mapping[str, Any]) -> Iterator[Cause]:
    validator = _KubeValidator(schema, format_checker=_FORMATS)
    for error in validator.iter_errors(obj):
        yield _cause(error)


def _json(value: Any, *, sort_keys: bool = False) -> str:
    return json.dumps(value, sort_keys=sort_keys, separators=(",", ":"), default=repr)


def _number(value: Any) -> str:
    """A bound as Go's %v prints a float64: 1, 1.5."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _field_path(parts: Sequence[Any]) -> str:
    path = ""
    for part in parts:
        path = f"{path}[{part}]" if isinstance(part, int) else _child(path, part)
    return path


def _cause(error: ValidationError) -> Cause:
    path = _field_path(list(error.absolute_path))
    where = f"{path or '<root>'} in body"
    keyword = str(error.validator)
    bound: Any = error.validator_value
    value: Any = error.instance
    shown = _json(value)

    def invalid(detail: str, reason: str = "FieldValueInvalid") -> Cause:
        return Cause(path, f"Invalid value: {shown}: {where} {detail}", reason)

    if keyword == "required" or (keyword == "x-kubernetes-embedded-resource"
                                 and error.message.startswith("Required")):
        return Cause(path, error.message, "FieldValueRequired")
    if keyword == "type":
        return invalid(f'must be of type {bound}: "{_json_type(value)}"', "FieldValueTypeInvalid")
    if keyword == "x-kubernetes-int-or-string":
        return invalid(f'must be of type integer,string: "{_json_type(value)}"',
                       "FieldValueTypeInvalid")
    if keyword == "enum":
        allowed = ", ".join(json.dumps(v if isinstance(v, str) else _json(v)) for v in bound)
        return Cause(path, f"Unsupported value: {shown}: supported values: {allowed}",
                     "FieldValueNotSupported")
    if keyword == "x-kubernetes-list-type":
        return Cause(path, error.message, "FieldValueDuplicate")
    if keyword == "format":
        return invalid(f"must be of type {bound}: {json.dumps(str(value))}",
                       "FieldValueTypeInvalid")
    if keyword == "maxLength":
        return Cause(path, f"Too long: may not be more than {bound} bytes", "FieldValueTooLong")
    if keyword in ("maxItems", "maxProperties"):
        return Cause(path, f"Too many: {len(value)}: must have at most {bound} items",
                     "FieldValueTooMany")
    return invalid(_DETAILS.get(keyword, lambda e: e.message)(error))


def _bound(error: ValidationError, exclusive: str, strict: str, inclusive: str) -> str:
    parent = _mapping(error.schema)
    word = strict if parent.get(exclusive) is True else inclusive
    return f"should be {word} {_number(error.validator_value)}"


_DETAILS: dict[str, Callable[[ValidationError], str]] = {
    "pattern": lambda e: f"should match '{e.validator_value}'",
    "minimum": lambda e: _bound(e, "exclusiveMinimum", "greater than",
                                "greater than or equal to"),
    "maximum": lambda e: _bound(e, "exclusiveMaximum", "less than", "less than or equal to"),
    "minLength": lambda e: f"should be at least {e.validator_value} chars long",
    "minItems": lambda e: f"should have at least {e.validator_value} items",
    "minProperties": lambda e: f"should have at least {e.validator_value} properties",
    "uniqueItems": lambda e: "shouldn't contain duplicates",
    "multipleOf": lambda e: f"should be a multiple of {_number(e.validator_value)}",
    "anyOf": lambda e: "must validate at least one schema (anyOf)",
    "oneOf": lambda e: "must validate one and only one schema (oneOf)",
    "not": lambda e: "must not validate the schema (not)",
}

__all__ = ["FREE_FORM", "Checked", "builtin_schema", "check"]
