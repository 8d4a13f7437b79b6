"""The /openapi/v2 document: built from the v3 documents, negotiated, and encoded as
gnostic's protobuf (read back here with a minimal wire-format reader)."""

from __future__ import annotations

import struct
from typing import Any

import yaml

from localcluster import discovery, openapiv2
from localcluster.catalog import Catalog


def _read(buf: bytes) -> list[tuple[int, Any]]:
    """(field number, value) pairs of one message: varints as int, fixed64 as bytes."""
    out: list[tuple[int, Any]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            out.append((number, value))
        elif wire == 1:
            out.append((number, buf[pos:pos + 8]))
            pos += 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            out.append((number, buf[pos:pos + size]))
            pos += size
        else:
            raise AssertionError(f"unexpected wire type {wire}")
    assert pos == len(buf)
    return out


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _named(buf: bytes) -> dict[str, bytes]:
    """A repeated Named* message list (name = 1, value = 2) as a dict."""
    out = {}
    for _, entry in _read(buf):
        fields = dict(_read(entry))
        out[fields[1].decode()] = fields[2]
    return out


def test_document_rewrites_refs_and_drops_what_swagger_2_cannot_say() -> None:
    v3 = {"components": {"schemas": {
        "a.List": {"type": "object", "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/a.Item"}}}},
        "a.Item": {"type": "object", "properties": {
            "size": {"oneOf": [{"type": "string"}, {"type": "number"}]},
            "port": {"x-kubernetes-int-or-string": True},
            "note": {"type": "string", "nullable": True}}},
    }}}
    doc = openapiv2.document([v3])
    assert doc["swagger"] == "2.0" and list(doc["definitions"]) == ["a.Item", "a.List"]
    items = doc["definitions"]["a.List"]["properties"]["items"]["items"]
    assert items == {"$ref": "#/definitions/a.Item"}
    props = doc["definitions"]["a.Item"]["properties"]
    assert props["size"] == {}
    assert props["port"] == {"x-kubernetes-int-or-string": True, "type": "string",
                             "format": "int-or-string"}
    assert props["note"] == {"type": "string"}


def test_negotiation() -> None:
    proto = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf"
    assert openapiv2.negotiate(proto) == openapiv2.PROTOBUF_ANSWER
    assert openapiv2.negotiate(f"{proto}, application/json") == openapiv2.PROTOBUF_ANSWER
    assert openapiv2.negotiate("application/json") == "application/json"
    assert openapiv2.negotiate("") == "application/json"
    assert openapiv2.negotiate("*/*") == "application/json"
    assert openapiv2.negotiate("text/html") is None


def test_protobuf_carries_the_models_kubectl_reads() -> None:
    doc, encoded = discovery.openapi_v2(Catalog())
    top = dict(_read(encoded))
    assert top[1] == b"2.0"
    definitions = _named(top[9])
    assert set(definitions) == set(doc["definitions"])
    service_fields = _read(definitions["io.k8s.api.core.v1.Service"])
    service = dict(service_fields)
    assert _extensions(service_fields)["x-kubernetes-group-version-kind"] == [
        {"group": "", "version": "v1", "kind": "Service"}]
    assert dict(_read(service[22])) == {1: b"object"}
    spec = dict(_read(_named(service[25])["spec"]))
    ports = _read(_named(spec[25])["ports"])
    assert dict(ports)[22] == b"\n\x05array"
    assert _extensions(ports)["x-kubernetes-patch-merge-key"] == "port"


def _extensions(fields: list[tuple[int, Any]]) -> dict[str, Any]:
    """A Schema's vendor extensions (repeated NamedAny, field 31), values read as YAML."""
    out = {}
    for number, value in fields:
        if number == 31:
            entry = dict(_read(value))
            out[entry[1].decode()] = yaml.safe_load(dict(_read(entry[2]))[2])
    return out


def test_doubles_and_booleans_use_their_wire_types() -> None:
    fields = _read(openapiv2.encode_schema({"type": "integer", "minimum": 1,
                                            "exclusiveMinimum": True, "maxLength": 3}))
    by_number = dict(fields)
    assert struct.unpack("<d", by_number[9]) == (1.0,)
    assert by_number[10] == 1 and by_number[11] == 3
