"""``/openapi/v2``: the Swagger 2.0 models of every kind served, as JSON or as the
protobuf kubectl asks for.

kubectl validates a manifest against these models when the OpenAPI v3
document of its group-version does not take ``fieldValidation`` — a kind the
server does not serve — and skips kinds the models do not name, so that the
request fails as kube's does (``no matches for kind``); ``kubectl apply`` reads
the ``x-kubernetes-patch-*`` extensions here when it does not use v3.

The models are the component schemas of the ``/openapi/v3`` documents, with
their ``$ref``s pointing to ``#/definitions/``; what Swagger 2.0 cannot say
(``oneOf``, ``anyOf``, ``nullable``) is left out, as kube-apiserver leaves it
out. Paths are not listed: kubectl reads none from v2.

The protobuf encoding is gnostic's ``openapi.v2.Document`` (field numbers from
google/gnostic ``openapiv2/OpenAPIv2.proto``); extension values are YAML text
in an ``Any``, as kube-openapi writes them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

PROTOBUF_TYPES = ("application/com.github.proto-openapi.spec.v2@v1.0+protobuf",
                  "application/com.github.proto-openapi.spec.v2.v1.0+protobuf")
# What kube-openapi answers with: the same type spelled without the "@", which
# Go's media-type parser refuses.
PROTOBUF_ANSWER = PROTOBUF_TYPES[1]
JSON_TYPE = "application/json"

_V3_REF = "#/components/schemas/"
_V2_REF = "#/definitions/"
_DROPPED = frozenset({"oneOf", "anyOf", "not", "nullable"})


def document(v3_documents: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The Swagger 2.0 document whose definitions are those of `v3_documents`."""
    definitions: dict[str, Any] = {}
    for doc in v3_documents:
        for name, schema in ((doc.get("components") or {}).get("schemas") or {}).items():
            definitions.setdefault(name, _schema(schema))
    return {"swagger": "2.0", "info": {"title": "Kubernetes", "version": "unversioned"},
            "paths": {}, "definitions": dict(sorted(definitions.items()))}


def _schema(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_schema(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROPPED:
            continue
        if key == "$ref" and isinstance(value, str):
            out[key] = _V2_REF + value.removeprefix(_V3_REF)
        elif key in ("properties", "definitions") and isinstance(value, Mapping):
            out[key] = {k: _schema(v) for k, v in value.items()}
        elif key.startswith("x-"):
            out[key] = value
        else:
            out[key] = _schema(value)
    if schema.get("x-kubernetes-int-or-string"):
        out.setdefault("type", "string")
        out.setdefault("format", "int-or-string")
    return out


def negotiate(accept: str) -> str | None:
    """The media type to answer `accept` with; None when neither is acceptable (406)."""
    if not accept.strip():
        return JSON_TYPE
    for clause in accept.split(","):
        media = clause.split(";", 1)[0].strip().lower()
        if media in PROTOBUF_TYPES:
            return PROTOBUF_ANSWER
        if media in (JSON_TYPE, "application/*", "*/*"):
            return JSON_TYPE
    return None


# ---------------------------------------------------------------- protobuf


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _tag(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _bytes(number: int, data: bytes) -> bytes:
    return _tag(number, 2) + _varint(len(data)) + data


def _text(number: int, value: str) -> bytes:
    return _bytes(number, value.encode()) if value else b""


def _int(number: int, value: Any) -> bytes:
    return _tag(number, 0) + _varint(int(value)) if isinstance(value, int) and value else b""


def _bool(number: int, value: Any) -> bytes:
    return _tag(number, 0) + b"\x01" if value is True else b""


def _double(number: int, value: Any) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return b""
    return _tag(number, 1) + struct.pack("<d", float(value))


def _any(number: int, value: Any) -> bytes:
    """gnostic's Any: the value as YAML text (field 2)."""
    text = yaml.safe_dump(value, default_flow_style=False, sort_keys=False) \
        if isinstance(value, dict | list) else json.dumps(value)
    return _bytes(number, _text(2, text))


def _named_any(number: int, name: str, value: Any) -> bytes:
    return _bytes(number, _text(1, name) + _any(2, value))


# Schema message field numbers.
_S_REF, _S_FORMAT, _S_TITLE, _S_DESCRIPTION, _S_DEFAULT = 1, 2, 3, 4, 5
_S_MULTIPLE_OF, _S_MAXIMUM, _S_EXCL_MAX, _S_MINIMUM, _S_EXCL_MIN = 6, 7, 8, 9, 10
_S_MAX_LENGTH, _S_MIN_LENGTH, _S_PATTERN, _S_MAX_ITEMS, _S_MIN_ITEMS = 11, 12, 13, 14, 15
_S_UNIQUE, _S_MAX_PROPS, _S_MIN_PROPS, _S_REQUIRED, _S_ENUM = 16, 17, 18, 19, 20
_S_ADDITIONAL, _S_TYPE, _S_ITEMS, _S_ALL_OF, _S_PROPERTIES = 21, 22, 23, 24, 25
_S_READ_ONLY, _S_EXAMPLE, _S_EXTENSION = 27, 30, 31


def encode_schema(s: Mapping[str, Any]) -> bytes:
    """One gnostic ``Schema`` message."""
    out = bytearray()
    out += _text(_S_REF, s.get("$ref", ""))
    out += _text(_S_FORMAT, s.get("format", ""))
    out += _text(_S_TITLE, s.get("title", ""))
    out += _text(_S_DESCRIPTION, s.get("description", ""))
    if "default" in s:
        out += _any(_S_DEFAULT, s["default"])
    out += _double(_S_MULTIPLE_OF, s.get("multipleOf"))
    out += _double(_S_MAXIMUM, s.get("maximum"))
    out += _bool(_S_EXCL_MAX, s.get("exclusiveMaximum"))
    out += _double(_S_MINIMUM, s.get("minimum"))
    out += _bool(_S_EXCL_MIN, s.get("exclusiveMinimum"))
    out += _int(_S_MAX_LENGTH, s.get("maxLength"))
    out += _int(_S_MIN_LENGTH, s.get("minLength"))
    out += _text(_S_PATTERN, s.get("pattern", ""))
    out += _int(_S_MAX_ITEMS, s.get("maxItems"))
    out += _int(_S_MIN_ITEMS, s.get("minItems"))
    out += _bool(_S_UNIQUE, s.get("uniqueItems"))
    out += _int(_S_MAX_PROPS, s.get("maxProperties"))
    out += _int(_S_MIN_PROPS, s.get("minProperties"))
    for name in s.get("required") or ():
        out += _text(_S_REQUIRED, str(name))
    for value in s.get("enum") or ():
        out += _any(_S_ENUM, value)
    extra = s.get("additionalProperties")
    if isinstance(extra, Mapping):
        out += _bytes(_S_ADDITIONAL, _bytes(1, encode_schema(extra)))
    elif isinstance(extra, bool):
        out += _bytes(_S_ADDITIONAL, _tag(2, 0) + _varint(int(extra)))
    kind = s.get("type")
    if kind:
        kinds = kind if isinstance(kind, list) else [kind]
        out += _bytes(_S_TYPE, b"".join(_text(1, str(k)) for k in kinds))
    items = s.get("items")
    if isinstance(items, Mapping):
        out += _bytes(_S_ITEMS, _bytes(1, encode_schema(items)))
    for part in s.get("allOf") or ():
        if isinstance(part, Mapping):
            out += _bytes(_S_ALL_OF, encode_schema(part))
    props = s.get("properties")
    if isinstance(props, Mapping):
        named = b"".join(_bytes(1, _text(1, k) + _bytes(2, encode_schema(v)))
                         for k, v in props.items() if isinstance(v, Mapping))
        out += _bytes(_S_PROPERTIES, named)
    out += _bool(_S_READ_ONLY, s.get("readOnly"))
    if "example" in s:
        out += _any(_S_EXAMPLE, s["example"])
    for key, value in s.items():
        if key.startswith("x-"):
            out += _named_any(_S_EXTENSION, key, value)
    return bytes(out)


def encode_document(doc: Mapping[str, Any]) -> bytes:
    """A gnostic ``Document``: swagger (1), info (2), paths (8), definitions (9)."""
    info = doc.get("info") or {}
    out = bytearray()
    out += _text(1, doc.get("swagger", "2.0"))
    out += _bytes(2, _text(1, info.get("title", "")) + _text(2, info.get("version", "")))
    out += _bytes(8, b"")
    named = b"".join(_bytes(1, _text(1, name) + _bytes(2, encode_schema(schema)))
                     for name, schema in (doc.get("definitions") or {}).items())
    out += _bytes(9, named)
    return bytes(out)
