"""CRD validation as kube-apiserver does it, and the resource types an accepted CRD adds."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from localcluster.crd import (
    crd_with_defaults,
    resource_types,
    storage_version,
    structural_causes,
    validate_crd,
)
from localcluster.resources import STANDARD_VERBS

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "required": ["targetClusterName"],
            "properties": {
                "targetClusterName": {"type": "string", "pattern": "^[a-z0-9-]+$"},
                "gatewayPort": {"x-kubernetes-int-or-string": True,
                                "anyOf": [{"type": "integer"}, {"type": "string"}]},
                "probe": {"type": "object", "properties": {
                    "period": {"type": "integer", "minimum": 1},
                    "paths": {"type": "array", "items": {"type": "string"}}}},
                "selector": {"type": "object", "additionalProperties": {"type": "string"}},
                "config": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "anything": {"x-kubernetes-preserve-unknown-fields": True},
                "template": {"type": "object", "x-kubernetes-embedded-resource": True,
                             "x-kubernetes-preserve-unknown-fields": True},
                "mode": {"type": "string", "enum": ["a", "b"],
                         "anyOf": [{"pattern": "^a"}, {"pattern": "^b"}]},
            },
        },
        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    },
}


def make_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "links.multicluster.meshgate.io"},
        "spec": {
            "group": "multicluster.meshgate.io",
            "scope": "Namespaced",
            "names": {"plural": "links", "singular": "link", "kind": "Link",
                      "listKind": "LinkList", "shortNames": ["lk"], "categories": ["mesh"]},
            "versions": [
                {"name": "v1alpha1", "served": True, "storage": True,
                 "subresources": {"status": {}},
                 "selectableFields": [{"jsonPath": ".spec.targetClusterName"}],
                 "additionalPrinterColumns": [{"name": "Target", "type": "string",
                                               "jsonPath": ".spec.targetClusterName"}],
                 "schema": {"openAPIV3Schema": copy.deepcopy(SCHEMA)}},
                {"name": "v1alpha0", "served": False, "storage": False,
                 "schema": {"openAPIV3Schema": copy.deepcopy(SCHEMA)}},
                {"name": "v1beta1", "served": True, "storage": False,
                 "subresources": {"scale": {"specReplicasPath": ".spec.replicas",
                                            "statusReplicasPath": ".status.replicas"}},
                 "schema": {"openAPIV3Schema": copy.deepcopy(SCHEMA)}},
            ],
        },
    }


def test_a_good_crd_has_no_causes() -> None:
    assert validate_crd(make_crd()) == []


def test_defaults_fill_singular_and_list_kind() -> None:
    crd = make_crd()
    del crd["spec"]["names"]["singular"]
    del crd["spec"]["names"]["listKind"]
    assert validate_crd(crd) == []
    names = crd_with_defaults(crd)["spec"]["names"]
    assert (names["singular"], names["listKind"]) == ("link", "LinkList")
    assert crd_with_defaults(crd)["spec"]["conversion"] == {"strategy": "None"}
    assert "singular" not in crd["spec"]["names"]  # the input is left alone
    assert resource_types(crd)[0].singular == "link"


def test_resource_types_one_per_served_version() -> None:
    types = resource_types(make_crd())
    assert [t.version for t in types] == ["v1alpha1", "v1beta1"]
    link = types[0]
    assert (link.group, link.kind, link.plural, link.singular) == (
        "multicluster.meshgate.io", "Link", "links", "link")
    assert link.namespaced is True
    assert link.short_names == ("lk",) and link.categories == ("mesh",)
    assert link.status_subresource is True and types[1].status_subresource is False
    assert link.schema == SCHEMA
    assert link.crd_name == "links.multicluster.meshgate.io"
    assert link.model is None
    assert link.field_labels == ("spec.targetClusterName",)
    assert link.verbs == STANDARD_VERBS
    assert link.extra["storage"] is True and types[1].extra["storage"] is False
    assert link.extra["additionalPrinterColumns"][0]["name"] == "Target"
    assert types[1].extra["scale"]["specReplicasPath"] == ".spec.replicas"
    assert link.api_version == "multicluster.meshgate.io/v1alpha1"


def test_cluster_scope() -> None:
    crd = make_crd()
    crd["spec"]["scope"] = "Cluster"
    assert all(not t.namespaced for t in resource_types(crd))


def test_storage_version() -> None:
    assert storage_version(make_crd()) == "v1alpha1"
    crd = make_crd()
    crd["spec"]["versions"][0]["storage"] = False
    with pytest.raises(ValueError, match="storage"):
        storage_version(crd)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets (or, with value ..., deletes) a dotted path in the CRD."""

    def mutate(crd: dict[str, Any]) -> None:
        node: Any = crd
        parts = path.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node[part]
        last = parts[-1]
        if value is ...:
            del node[last]
        elif last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


_S = "spec.versions.0.schema.openAPIV3Schema"
_F = "spec.versions[0].schema.openAPIV3Schema"

BAD_CASES: list[tuple[str, Callable[[dict[str, Any]], None], str, str, str]] = [
    ("name", _set("metadata.name", "links"), "metadata.name", "FieldValueInvalid",
     'must be spec.names.plural+"."+spec.group'),
    ("group without dot", _set("spec.group", "meshgate"), "spec.group", "FieldValueInvalid",
     "should be a domain with at least one dot"),
    ("group missing", _set("spec.group", ...), "spec.group", "FieldValueRequired", ""),
    ("group not dns", _set("spec.group", "Mesh_gate.io"), "spec.group", "FieldValueInvalid",
     "RFC 1123 subdomain"),
    ("plural missing", _set("spec.names.plural", ...), "spec.names.plural",
     "FieldValueRequired", ""),
    ("plural upper", _set("spec.names.plural", "Links"), "spec.names.plural",
     "FieldValueInvalid", "DNS-1035"),
    ("singular bad", _set("spec.names.singular", "1link"), "spec.names.singular",
     "FieldValueInvalid", "DNS-1035"),
    ("kind missing", _set("spec.names.kind", ...), "spec.names.kind", "FieldValueRequired", ""),
    ("kind bad", _set("spec.names.kind", "Li_nk"), "spec.names.kind", "FieldValueInvalid",
     "may have mixed case"),
    ("listKind same", _set("spec.names.listKind", "Link"), "spec.names.listKind",
     "FieldValueInvalid", "kind and listKind may not be the same"),
    ("shortName bad", _set("spec.names.shortNames", ["ok", "No"]), "spec.names.shortNames[1]",
     "FieldValueInvalid", "DNS-1035"),
    ("scope missing", _set("spec.scope", ...), "spec.scope", "FieldValueRequired", ""),
    ("scope bad", _set("spec.scope", "Global"), "spec.scope", "FieldValueNotSupported",
     'supported values: "Cluster", "Namespaced"'),
    ("no versions", _set("spec.versions", []), "spec.versions", "FieldValueRequired",
     "exactly one version marked as storage"),
    ("two storage", _set("spec.versions.2.storage", True), "spec.versions",
     "FieldValueInvalid", "must have exactly one version marked as storage version"),
    ("no storage", _set("spec.versions.0.storage", False), "spec.versions",
     "FieldValueInvalid", "must have exactly one version marked as storage version"),
    ("duplicate version", _set("spec.versions.1.name", "v1alpha1"), "spec.versions[1].name",
     "FieldValueDuplicate", 'Duplicate value: "v1alpha1"'),
    ("version name", _set("spec.versions.1.name", "V1"), "spec.versions[1].name",
     "FieldValueInvalid", "DNS-1035"),
    ("no schema", _set("spec.versions.0.schema", ...), _F, "FieldValueRequired",
     "schemas are required"),
    ("root not object", _set(f"{_S}.type", "array"), f"{_F}.type", "FieldValueInvalid",
     "must be object at the root"),
    ("root untyped", _set(f"{_S}.type", ...), f"{_F}.type", "FieldValueRequired",
     "must not be empty at the root"),
    ("property untyped", _set(f"{_S}.properties.spec.properties.probe.properties.period",
                              {"minimum": 1}),
     f"{_F}.properties[spec].properties[probe].properties[period].type", "FieldValueRequired",
     "must not be empty for specified object fields"),
    ("items untyped", _set(f"{_S}.properties.spec.properties.probe.properties.paths.items", {}),
     f"{_F}.properties[spec].properties[probe].properties[paths].items.type",
     "FieldValueRequired", "must not be empty for specified array items"),
    ("array without items",
     _set(f"{_S}.properties.spec.properties.probe.properties.paths", {"type": "array"}),
     f"{_F}.properties[spec].properties[probe].properties[paths].items", "FieldValueRequired",
     "must be specified"),
    ("unknown type", _set(f"{_S}.properties.status.type", "map"), f"{_F}.properties[status].type",
     "FieldValueNotSupported", '"map": supported values: "array", "boolean"'),
    ("props and additional", _set(f"{_S}.properties.spec.additionalProperties",
                                  {"type": "string"}),
     f"{_F}.properties[spec].additionalProperties", "FieldValueForbidden",
     "additionalProperties and properties are mutual exclusive"),
    ("additional false", _set(f"{_S}.properties.spec.properties.selector.additionalProperties",
                              False),
     f"{_F}.properties[spec].properties[selector].additionalProperties", "FieldValueForbidden",
     "additionalProperties cannot be set to false"),
    ("ref", _set(f"{_S}.properties.spec.properties.probe.$ref", "#/definitions/x"),
     f"{_F}.properties[spec].properties[probe].$ref", "FieldValueForbidden",
     "$ref is not supported"),
    ("unique items", _set(f"{_S}.properties.spec.properties.probe.properties.paths.uniqueItems",
                          True),
     f"{_F}.properties[spec].properties[probe].properties[paths].uniqueItems",
     "FieldValueForbidden", "runtime complexity becomes quadratic"),
    ("type in anyOf", _set(f"{_S}.properties.spec.properties.mode.anyOf",
                           [{"type": "string"}]),
     f"{_F}.properties[spec].properties[mode].anyOf[0].type", "FieldValueForbidden",
     "must be empty to be structural"),
    ("default in not", _set(f"{_S}.properties.spec.properties.mode.not", {"default": "a"}),
     f"{_F}.properties[spec].properties[mode].not.default", "FieldValueForbidden",
     "must be empty to be structural"),
    ("int-or-string typed", _set(f"{_S}.properties.spec.properties.gatewayPort.type", "string"),
     f"{_F}.properties[spec].properties[gatewayPort].type", "FieldValueInvalid",
     "must be empty for x-kubernetes-int-or-string"),
    ("preserve false", _set(f"{_S}.properties.status.x-kubernetes-preserve-unknown-fields",
                            False),
     f"{_F}.properties[status].x-kubernetes-preserve-unknown-fields", "FieldValueInvalid",
     "must be true or undefined"),
    ("embedded not object", _set(f"{_S}.properties.spec.properties.template.type", "string"),
     f"{_F}.properties[spec].properties[template].type", "FieldValueInvalid",
     "must be object if x-kubernetes-embedded-resource is true"),
    ("bad pattern", _set(f"{_S}.properties.spec.properties.targetClusterName.pattern", "(a"),
     f"{_F}.properties[spec].properties[targetClusterName].pattern", "FieldValueInvalid",
     "must be a valid regular expression"),
    ("minimum not a number", _set(f"{_S}.properties.spec.properties.probe.properties.period"
                                  ".minimum", "one"),
     f"{_F}.properties[spec].properties[probe].properties[period].minimum", "FieldValueInvalid",
     "must be of type number"),
    ("required not a list", _set(f"{_S}.properties.spec.required", "targetClusterName"),
     f"{_F}.properties[spec].required", "FieldValueInvalid", "must be of type array"),
    ("preserveUnknownFields", _set("spec.preserveUnknownFields", True),
     "spec.preserveUnknownFields", "FieldValueInvalid", "cannot set to true"),
    ("conversion strategy", _set("spec.conversion", {"strategy": "Magic"}),
     "spec.conversion.strategy", "FieldValueNotSupported", '"None", "Webhook"'),
]


@pytest.mark.parametrize(("mutate", "field", "reason", "text"),
                         [case[1:] for case in BAD_CASES], ids=[case[0] for case in BAD_CASES])
def test_bad_crd_cause(mutate: Callable[[dict[str, Any]], None], field: str, reason: str,
                       text: str) -> None:
    crd = make_crd()
    mutate(crd)
    causes = validate_crd(crd)
    matching = [c for c in causes if c.field == field and c.reason == reason]
    assert matching, causes
    assert text in matching[0].message


def test_int_or_string_may_spell_itself_with_any_of() -> None:
    schema = {"type": "object", "properties": {"p": {
        "x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}}}
    assert structural_causes(schema, "s") == []


def test_validate_crd_survives_garbage() -> None:
    garbage: dict[str, Any]
    for garbage in ({}, {"spec": []}, {"spec": {"versions": [None, 3, {"schema": []}]}},
                    {"spec": {"names": "x", "versions": "v1"}, "metadata": 5}):
        causes = validate_crd(garbage)
        assert causes and all(c.field for c in causes)
        assert resource_types(garbage) == []
