"""Decode Kubernetes protobuf request bodies into the JSON-shaped dicts the rest
of the server works on.

kubectl 1.37's typed clientsets send the bodies of built-in kinds as
``application/vnd.kubernetes.protobuf``: the 4-byte magic ``k8s\\x00`` and then a
``runtime.Unknown`` envelope whose ``typeMeta`` names the object and whose
``raw`` holds the object as the typed message of its ``generated.proto``.

`decode` reads that with a small wire-format reader and a declarative table of
the messages it knows (`SCHEMA`), taking every field number from the real
``generated.proto`` files of k8s.io/api and k8s.io/apimachinery. The result is
what the same client would have sent as JSON: camelCase names, bytes as base64,
``metav1.Time`` as RFC 3339, ``IntOrString`` as int or string. kube's proto2
encoding emits every non-pointer scalar even when it is zero, so empty strings,
zero numbers, false booleans and empty lists/maps are left out — except the
fields that are pointers in Go (marked ``?`` in the table), which are only on
the wire when set, so there even a zero or false is kept (``gracePeriodSeconds:
0``, ``automountServiceAccountToken: false``).

Field numbers the table does not list are skipped, as protobuf intends. Any
other problem is an `ApiError`: a kind outside `SUPPORTED` is 415, and bytes
that are not valid protobuf for the schema are 400.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
from collections.abc import Iterator
from typing import Any, NamedTuple

from localcluster.errors import ApiError

CONTENT_TYPE = "application/vnd.kubernetes.protobuf"
MAGIC = b"k8s\x00"

# ---------------------------------------------------------------- schema
#
# message name -> {field number: (json name, kind)}. A kind is a scalar
# ("str", "bytes", "int64", "int32", "bool"), a map ("map" = map<string,string>,
# "bytesmap" = map<string,bytes>, "extramap" = map<string,ExtraValue>) or the
# name of another message. "[]" in front marks a repeated field; "?" after a
# scalar marks a Go pointer field, kept even when zero. "Time" and
# "IntOrString" are messages that become a string and an int-or-string.

_RBAC = "rbac.authorization.k8s.io/v1"
_AUTHN = "authentication.k8s.io/v1"
_AUTHZ = "authorization.k8s.io/v1"

_META = (1, "metadata", "ObjectMeta")

SCHEMA: dict[str, dict[int, tuple[str, str]]] = {
    # k8s.io/apimachinery/pkg/runtime/generated.proto
    "runtime.Unknown": {1: ("typeMeta", "runtime.TypeMeta"), 2: ("raw", "bytes"),
                        3: ("contentEncoding", "str"), 4: ("contentType", "str")},
    "runtime.TypeMeta": {1: ("apiVersion", "str"), 2: ("kind", "str")},
    # k8s.io/apimachinery/pkg/util/intstr/generated.proto
    "IntOrString": {1: ("type", "int64"), 2: ("intVal", "int32"), 3: ("strVal", "str")},
    # k8s.io/apimachinery/pkg/apis/meta/v1/generated.proto
    "Time": {1: ("seconds", "int64"), 2: ("nanos", "int32")},
    "ObjectMeta": {
        1: ("name", "str"), 2: ("generateName", "str"), 3: ("namespace", "str"),
        4: ("selfLink", "str"), 5: ("uid", "str"), 6: ("resourceVersion", "str"),
        7: ("generation", "int64"), 8: ("creationTimestamp", "Time"),
        9: ("deletionTimestamp", "Time"), 10: ("deletionGracePeriodSeconds", "int64?"),
        11: ("labels", "map"), 12: ("annotations", "map"),
        13: ("ownerReferences", "[]OwnerReference"), 14: ("finalizers", "[]str"),
    },
    "OwnerReference": {
        5: ("apiVersion", "str"), 1: ("kind", "str"), 3: ("name", "str"), 4: ("uid", "str"),
        6: ("controller", "bool?"), 7: ("blockOwnerDeletion", "bool?"),
    },
    "LabelSelector": {1: ("matchLabels", "map"),
                      2: ("matchExpressions", "[]LabelSelectorRequirement")},
    "LabelSelectorRequirement": {1: ("key", "str"), 2: ("operator", "str"),
                                 3: ("values", "[]str")},
    "DeleteOptions": {
        1: ("gracePeriodSeconds", "int64?"), 2: ("preconditions", "Preconditions"),
        3: ("orphanDependents", "bool?"), 4: ("propagationPolicy", "str?"),
        5: ("dryRun", "[]str"),
    },
    "Preconditions": {1: ("uid", "str?"), 2: ("resourceVersion", "str?")},
    # k8s.io/api/core/v1/generated.proto
    "Namespace": {_META[0]: _META[1:], 2: ("spec", "NamespaceSpec"),
                  3: ("status", "NamespaceStatus")},
    "NamespaceSpec": {1: ("finalizers", "[]str")},
    "NamespaceStatus": {1: ("phase", "str")},
    "ConfigMap": {_META[0]: _META[1:], 4: ("immutable", "bool?"), 2: ("data", "map"),
                  3: ("binaryData", "bytesmap")},
    "Secret": {_META[0]: _META[1:], 5: ("immutable", "bool?"), 2: ("data", "bytesmap"),
               4: ("stringData", "map"), 3: ("type", "str")},
    "ServiceAccount": {
        _META[0]: _META[1:], 2: ("secrets", "[]ObjectReference"),
        3: ("imagePullSecrets", "[]LocalObjectReference"),
        4: ("automountServiceAccountToken", "bool?"),
    },
    "ObjectReference": {
        1: ("kind", "str"), 2: ("namespace", "str"), 3: ("name", "str"), 4: ("uid", "str"),
        5: ("apiVersion", "str"), 6: ("resourceVersion", "str"), 7: ("fieldPath", "str"),
    },
    "LocalObjectReference": {1: ("name", "str")},
    "Service": {_META[0]: _META[1:], 2: ("spec", "ServiceSpec")},
    "ServiceSpec": {
        1: ("ports", "[]ServicePort"), 2: ("selector", "map"), 3: ("clusterIP", "str"),
        18: ("clusterIPs", "[]str"), 4: ("type", "str"), 5: ("externalIPs", "[]str"),
        7: ("sessionAffinity", "str"), 8: ("loadBalancerIP", "str"),
        9: ("loadBalancerSourceRanges", "[]str"), 10: ("externalName", "str"),
        11: ("externalTrafficPolicy", "str"), 12: ("healthCheckNodePort", "int32"),
        13: ("publishNotReadyAddresses", "bool"),
        14: ("sessionAffinityConfig", "SessionAffinityConfig"), 19: ("ipFamilies", "[]str"),
        17: ("ipFamilyPolicy", "str?"), 20: ("allocateLoadBalancerNodePorts", "bool?"),
        21: ("loadBalancerClass", "str?"), 22: ("internalTrafficPolicy", "str?"),
    },
    "ServicePort": {
        1: ("name", "str"), 2: ("protocol", "str"), 6: ("appProtocol", "str?"),
        3: ("port", "int32"), 4: ("targetPort", "IntOrString"), 5: ("nodePort", "int32"),
    },
    "SessionAffinityConfig": {1: ("clientIP", "ClientIPConfig")},
    "ClientIPConfig": {1: ("timeoutSeconds", "int32?")},
    "PodTemplateSpec": {_META[0]: _META[1:], 2: ("spec", "PodSpec")},
    "PodSpec": {
        20: ("initContainers", "[]Container"), 2: ("containers", "[]Container"),
        3: ("restartPolicy", "str"), 4: ("terminationGracePeriodSeconds", "int64?"),
        5: ("activeDeadlineSeconds", "int64?"), 6: ("dnsPolicy", "str"),
        7: ("nodeSelector", "map"), 8: ("serviceAccountName", "str"),
        9: ("serviceAccount", "str"), 21: ("automountServiceAccountToken", "bool?"),
        10: ("nodeName", "str"), 11: ("hostNetwork", "bool"), 16: ("hostname", "str"),
        17: ("subdomain", "str"), 19: ("schedulerName", "str"),
        15: ("imagePullSecrets", "[]LocalObjectReference"),
        30: ("enableServiceLinks", "bool?"),
    },
    "Container": {
        1: ("name", "str"), 2: ("image", "str"), 3: ("command", "[]str"), 4: ("args", "[]str"),
        5: ("workingDir", "str"), 6: ("ports", "[]ContainerPort"), 7: ("env", "[]EnvVar"),
        24: ("restartPolicy", "str?"), 13: ("terminationMessagePath", "str"),
        20: ("terminationMessagePolicy", "str"), 14: ("imagePullPolicy", "str"),
        16: ("stdin", "bool"), 17: ("stdinOnce", "bool"), 18: ("tty", "bool"),
    },
    "ContainerPort": {1: ("name", "str"), 2: ("hostPort", "int32"), 3: ("containerPort", "int32"),
                      4: ("protocol", "str"), 5: ("hostIP", "str")},
    "EnvVar": {1: ("name", "str"), 2: ("value", "str")},
    # k8s.io/api/apps/v1/generated.proto
    "Deployment": {_META[0]: _META[1:], 2: ("spec", "DeploymentSpec")},
    "DeploymentSpec": {
        1: ("replicas", "int32?"), 2: ("selector", "LabelSelector"),
        3: ("template", "PodTemplateSpec"), 4: ("strategy", "DeploymentStrategy"),
        5: ("minReadySeconds", "int32"), 6: ("revisionHistoryLimit", "int32?"),
        7: ("paused", "bool"), 9: ("progressDeadlineSeconds", "int32?"),
    },
    "DeploymentStrategy": {1: ("type", "str"), 2: ("rollingUpdate", "RollingUpdateDeployment")},
    "RollingUpdateDeployment": {1: ("maxUnavailable", "IntOrString"),
                                2: ("maxSurge", "IntOrString")},
    # k8s.io/api/policy/v1/generated.proto
    "PodDisruptionBudget": {_META[0]: _META[1:], 2: ("spec", "PodDisruptionBudgetSpec")},
    "PodDisruptionBudgetSpec": {1: ("minAvailable", "IntOrString"),
                                2: ("selector", "LabelSelector"),
                                3: ("maxUnavailable", "IntOrString"),
                                4: ("unhealthyPodEvictionPolicy", "str")},
    # k8s.io/api/batch/v1/generated.proto
    "Job": {_META[0]: _META[1:], 2: ("spec", "JobSpec")},
    "JobSpec": {
        1: ("parallelism", "int32?"), 2: ("completions", "int32?"),
        3: ("activeDeadlineSeconds", "int64?"), 7: ("backoffLimit", "int32?"),
        4: ("selector", "LabelSelector"), 5: ("manualSelector", "bool?"),
        6: ("template", "PodTemplateSpec"), 8: ("ttlSecondsAfterFinished", "int32?"),
        9: ("completionMode", "str?"), 10: ("suspend", "bool?"),
        14: ("podReplacementPolicy", "str?"),
    },
    # k8s.io/api/authentication/v1/generated.proto
    "TokenRequest": {_META[0]: _META[1:], 2: ("spec", "TokenRequestSpec")},
    "TokenRequestSpec": {1: ("audiences", "[]str"), 4: ("expirationSeconds", "int64?"),
                         3: ("boundObjectRef", "BoundObjectReference")},
    "BoundObjectReference": {1: ("kind", "str"), 2: ("apiVersion", "str"), 3: ("name", "str"),
                             4: ("uid", "str")},
    "TokenReview": {_META[0]: _META[1:], 2: ("spec", "TokenReviewSpec")},
    "SelfSubjectReview": {_META[0]: _META[1:]},
    "TokenReviewSpec": {1: ("token", "str"), 2: ("audiences", "[]str")},
    # k8s.io/api/authorization/v1/generated.proto
    "SubjectAccessReview": {_META[0]: _META[1:], 2: ("spec", "SubjectAccessReviewSpec")},
    "SelfSubjectAccessReview": {_META[0]: _META[1:],
                                2: ("spec", "SelfSubjectAccessReviewSpec")},
    "SelfSubjectRulesReview": {_META[0]: _META[1:], 2: ("spec", "SelfSubjectRulesReviewSpec")},
    "SubjectAccessReviewSpec": {
        1: ("resourceAttributes", "ResourceAttributes"),
        2: ("nonResourceAttributes", "NonResourceAttributes"), 3: ("user", "str"),
        4: ("groups", "[]str"), 5: ("extra", "extramap"), 6: ("uid", "str"),
    },
    "SelfSubjectAccessReviewSpec": {1: ("resourceAttributes", "ResourceAttributes"),
                                    2: ("nonResourceAttributes", "NonResourceAttributes")},
    "SelfSubjectRulesReviewSpec": {1: ("namespace", "str")},
    "ResourceAttributes": {
        1: ("namespace", "str"), 2: ("verb", "str"), 3: ("group", "str"),
        4: ("version", "str"), 5: ("resource", "str"), 6: ("subresource", "str"),
        7: ("name", "str"),
    },
    "NonResourceAttributes": {1: ("path", "str"), 2: ("verb", "str")},
    # k8s.io/api/rbac/v1/generated.proto
    "Role": {_META[0]: _META[1:], 2: ("rules", "[]PolicyRule")},
    "ClusterRole": {_META[0]: _META[1:], 2: ("rules", "[]PolicyRule"),
                    3: ("aggregationRule", "AggregationRule")},
    "PolicyRule": {1: ("verbs", "[]str"), 2: ("apiGroups", "[]str"), 3: ("resources", "[]str"),
                   4: ("resourceNames", "[]str"), 5: ("nonResourceURLs", "[]str")},
    "AggregationRule": {1: ("clusterRoleSelectors", "[]LabelSelector")},
    "RoleBinding": {_META[0]: _META[1:], 2: ("subjects", "[]Subject"),
                    3: ("roleRef", "RoleRef")},
    "ClusterRoleBinding": {_META[0]: _META[1:], 2: ("subjects", "[]Subject"),
                           3: ("roleRef", "RoleRef")},
    "Subject": {1: ("kind", "str"), 2: ("apiGroup", "str"), 3: ("name", "str"),
                4: ("namespace", "str")},
    "RoleRef": {1: ("apiGroup", "str"), 2: ("kind", "str"), 3: ("name", "str")},
}

# (apiVersion, kind) of the envelope -> message of `raw`. DeleteOptions is
# registered in every group version, so it is accepted under any apiVersion.
SUPPORTED: dict[tuple[str, str], str] = {
    **{("v1", k): k for k in ("Namespace", "ConfigMap", "Secret", "ServiceAccount", "Service")},
    **{(_AUTHN, k): k for k in ("TokenRequest", "TokenReview", "SelfSubjectReview")},
    **{(_AUTHZ, k): k for k in ("SubjectAccessReview", "SelfSubjectAccessReview",
                                "SelfSubjectRulesReview")},
    (_AUTHZ, "LocalSubjectAccessReview"): "SubjectAccessReview",
    **{(_RBAC, k): k for k in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")},
    ("apps/v1", "Deployment"): "Deployment",
    ("batch/v1", "Job"): "Job",
    ("policy/v1", "PodDisruptionBudget"): "PodDisruptionBudget",
}
ANY_VERSION: frozenset[str] = frozenset({"DeleteOptions"})

_SCALARS = frozenset({"str", "bytes", "int64", "int32", "bool"})
_MAPS = frozenset({"map", "bytesmap", "extramap"})


class _Field(NamedTuple):
    name: str
    kind: str
    repeated: bool
    keep_zero: bool


def _compile(table: dict[str, dict[int, tuple[str, str]]]) -> dict[str, dict[int, _Field]]:
    compiled: dict[str, dict[int, _Field]] = {}
    for message, fields in table.items():
        compiled[message] = {}
        for number, (name, spec) in fields.items():
            repeated, kind = spec.startswith("[]"), spec.removeprefix("[]")
            keep, kind = kind.endswith("?"), kind.removesuffix("?")
            if kind not in _SCALARS and kind not in _MAPS and kind not in table:
                raise AssertionError(f"{message}.{name}: unknown kind {kind!r}")
            compiled[message][number] = _Field(name, kind, repeated, keep)
    return compiled


_MESSAGES = _compile(SCHEMA)

# ---------------------------------------------------------------- wire format

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_WIRE_NAMES = {0: "varint", 1: "64-bit", 2: "length-delimited", 3: "start-group",
               4: "end-group", 5: "32-bit"}


class _Malformed(Exception):
    """Bytes that are not protobuf, or not this schema's protobuf."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & 0xFFFF_FFFF_FFFF_FFFF, pos
        shift += 7
        if shift >= 70:
            raise _Malformed("varint longer than 10 bytes")


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield (field number, wire type, value) of each field in one message."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0 or number > 0x1FFF_FFFF:
            raise _Malformed(f"invalid field number {number}")
        value: int | bytes
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            if pos + size > end:
                raise _Malformed(f"truncated {size * 8}-bit field {number}")
            value, pos = int.from_bytes(buf[pos:pos + size], "little"), pos + size
        elif wire == _LEN:
            length, pos = _varint(buf, pos)
            if length > end - pos:
                raise _Malformed(f"field {number} is {length} bytes long but only "
                                 f"{end - pos} remain")
            value, pos = buf[pos:pos + length], pos + length
        else:
            raise _Malformed(f"unsupported wire type {_WIRE_NAMES.get(wire, wire)} "
                             f"of field {number}")
        yield number, wire, value


def _parse(message: str, buf: bytes, into: dict[int, Any] | None = None) -> dict[int, Any]:
    """One message as {field number: raw value}: bytes for length-delimited
    scalars, ints for varints, dicts for sub-messages and maps, lists for
    repeated fields. A sub-message seen twice merges, as protobuf requires."""
    out: dict[int, Any] = {} if into is None else into
    schema = _MESSAGES[message]
    for number, wire, value in _fields(buf):
        field = schema.get(number)
        if field is None:
            continue  # a field newer than this table: skip it
        expected = _VARINT if field.kind in ("int64", "int32", "bool") else _LEN
        if wire != expected:
            raise _Malformed(f"{message}.{field.name} has wire type {_WIRE_NAMES[wire]}, "
                             f"expected {_WIRE_NAMES[expected]}")
        if field.kind in _MAPS:
            assert isinstance(value, bytes)
            key, item = _map_entry(message, field, value)
            out.setdefault(number, {})[key] = item
        elif field.kind in _SCALARS:
            if field.repeated:
                out.setdefault(number, []).append(value)
            else:
                out[number] = value
        else:
            assert isinstance(value, bytes)
            if field.repeated:
                out.setdefault(number, []).append(_parse(field.kind, value))
            else:
                out[number] = _parse(field.kind, value, out.get(number))
    return out


def _map_entry(message: str, field: _Field, buf: bytes) -> tuple[str, Any]:
    key = b""
    value: Any = [] if field.kind == "extramap" else b""
    for number, wire, item in _fields(buf):
        if number not in (1, 2):
            continue
        if wire != _LEN:
            raise _Malformed(f"{message}.{field.name} map entry has wire type "
                             f"{_WIRE_NAMES[wire]}, expected length-delimited")
        assert isinstance(item, bytes)
        if number == 1:
            key = item
        elif field.kind == "extramap":  # ExtraValue: repeated string items = 1
            value = [s for n, w, s in _fields(item) if n == 1 and _is_len(w, message, field)]
        else:
            value = item
    return _text(key), value


def _is_len(wire: int, message: str, field: _Field) -> bool:
    if wire != _LEN:
        raise _Malformed(f"{message}.{field.name} value has wire type {_WIRE_NAMES[wire]}, "
                         "expected length-delimited")
    return True

# ---------------------------------------------------------------- to JSON shape


def _text(raw: bytes) -> str:
    # Go's encoding/json turns invalid UTF-8 into U+FFFD, so the JSON body of the
    # same object would carry exactly this.
    return raw.decode("utf-8", "replace")


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _time(raw: dict[int, Any]) -> str | None:
    seconds = _signed(raw.get(1, 0), 64)
    nanos = _signed(raw.get(2, 0), 32)
    if seconds == 0 and nanos == 0:
        return None  # metav1.Time's zero value: `null` in JSON
    try:
        moment = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=seconds)
    except OverflowError:
        raise _Malformed(f"timestamp {seconds} is out of range") from None
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _int_or_string(raw: dict[int, Any]) -> int | str:
    kind = _signed(raw.get(1, 0), 64)
    if kind == 0:
        return _signed(raw.get(2, 0), 32)
    if kind == 1:
        return _text(raw.get(3, b""))
    raise _Malformed(f"IntOrString has unknown type {kind}")


def _value(kind: str, raw: Any) -> Any:
    if kind == "str":
        return _text(raw)
    if kind == "bytes":
        return base64.b64encode(raw).decode("ascii")
    if kind == "int64":
        return _signed(raw, 64)
    if kind == "int32":
        return _signed(raw, 32)
    if kind == "bool":
        return raw != 0
    if kind == "map":
        return {k: _text(v) for k, v in raw.items()}
    if kind == "bytesmap":
        return {k: base64.b64encode(v).decode("ascii") for k, v in raw.items()}
    if kind == "extramap":
        return {k: [_text(s) for s in v] for k, v in raw.items()}
    if kind == "Time":
        return _time(raw)
    if kind == "IntOrString":
        return _int_or_string(raw)
    return _finish(kind, raw)


def _finish(message: str, raw: dict[int, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for number, field in _MESSAGES[message].items():
        if number not in raw:
            continue
        if field.repeated:
            value = [_value(field.kind, item) for item in raw[number]]
        else:
            value = _value(field.kind, raw[number])
        if value or (field.keep_zero and value is not None):
            out[field.name] = value
    return out

# ---------------------------------------------------------------- entry point


def supported_kinds() -> list[str]:
    """"apiVersion/Kind" of every object `decode` accepts, for messages."""
    kinds = [f"{version}/{kind}" for version, kind in SUPPORTED]
    return kinds + [f"*/{kind}" for kind in sorted(ANY_VERSION)]


def decode(body: bytes) -> dict[str, Any]:
    """A protobuf-encoded Kubernetes object (magic + runtime.Unknown) as the
    dict its JSON form would be. Raises `ApiError`: 415 for a kind this module
    has no schema for, 400 for bytes that are not valid protobuf."""
    if not body.startswith(MAGIC):
        raise ApiError.bad_request("unable to decode protobuf request body: it does not start "
                                   "with the Kubernetes protobuf magic number 'k8s\\x00'")
    try:
        envelope = _parse("runtime.Unknown", bytes(body[len(MAGIC):]))
        type_meta = envelope.get(1, {})
        api_version, kind = _text(type_meta.get(1, b"")), _text(type_meta.get(2, b""))
        encoding = _text(envelope.get(3, b""))
        if encoding:
            raise _Malformed(f"content encoding {encoding!r} is not supported")
        if not kind:
            raise _Malformed("the envelope names no kind")
        message = "DeleteOptions" if kind in ANY_VERSION else SUPPORTED.get((api_version, kind))
        if message is None:
            err = ApiError.unsupported_media_type(CONTENT_TYPE)
            raise dataclasses.replace(err, message=(
                f"protobuf request bodies are only accepted for {', '.join(supported_kinds())}; "
                f"got {api_version or '<no apiVersion>'} {kind}: send it as application/json "
                "instead"))
        obj = _finish(message, _parse(message, envelope.get(2, b"")))
    except _Malformed as e:
        raise ApiError.bad_request(f"unable to decode protobuf request body: {e}") from None
    return {"apiVersion": api_version, "kind": kind, **obj}
