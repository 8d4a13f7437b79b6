"""JSON merge patch, JSON patch and strategic merge patch, as kube-apiserver applies them."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localcluster.errors import ApiError
from localcluster.patch import (
    MAX_JSON_PATCH_OPERATIONS,
    json_merge_patch,
    json_patch,
    strategic_merge_patch,
)

# ---------------------------------------------------------------- JSON merge patch


@pytest.mark.parametrize(
    ("target", "patch", "expected"),
    [  # RFC 7386, appendix A
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"a": "foo"}, "bar", "bar"),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_merge_patch_rfc7386_examples(target: Any, patch: Any, expected: Any) -> None:
    assert json_merge_patch(target, patch) == expected


def test_merge_patch_keeps_nulls_inside_lists_and_does_not_alias_the_patch() -> None:
    target = {"metadata": {"labels": {"app": "web"}}}
    patch = {"metadata": {"labels": {"tier": "fe"}}, "spec": {"items": [{"a": None}]}}
    result = json_merge_patch(target, patch)
    assert result == {
        "metadata": {"labels": {"app": "web", "tier": "fe"}},
        "spec": {"items": [{"a": None}]},
    }
    result["spec"]["items"].append(1)
    result["metadata"]["labels"]["x"] = "y"
    assert patch == {"metadata": {"labels": {"tier": "fe"}}, "spec": {"items": [{"a": None}]}}
    assert target == {"metadata": {"labels": {"app": "web"}}}


# ---------------------------------------------------------------- JSON patch

DEPLOYMENT = {
    "metadata": {"name": "web", "labels": {"app": "web"}},
    "spec": {"replicas": 1,
             "template": {"spec": {"containers": [{"name": "app", "image": "a:1"}]}}},
}


def test_json_patch_applies_operations_in_order() -> None:
    before = copy.deepcopy(DEPLOYMENT)
    operations = [
        {"op": "test", "path": "/spec/replicas", "value": 1},
        {"op": "replace", "path": "/spec/replicas", "value": 3},
        {"op": "add", "path": "/metadata/labels/tier", "value": "fe"},
        {"op": "add", "path": "/spec/template/spec/containers/-",
         "value": {"name": "proxy", "image": "p:1"}},
        {"op": "copy", "from": "/metadata/labels", "path": "/metadata/annotations"},
        {"op": "move", "from": "/metadata/annotations/tier", "path": "/metadata/annotations/t"},
        {"op": "remove", "path": "/metadata/labels/app"},
        {"op": "add", "path": "/spec/template/spec/containers/1/args", "value": ["-v"]},
    ]
    ops_before = copy.deepcopy(operations)
    result = json_patch(DEPLOYMENT, operations)
    assert result == {
        "metadata": {
            "name": "web",
            "labels": {"tier": "fe"},
            "annotations": {"app": "web", "t": "fe"},
        },
        "spec": {"replicas": 3, "template": {"spec": {"containers": [
            {"name": "app", "image": "a:1"},
            {"name": "proxy", "image": "p:1", "args": ["-v"]},
        ]}}},
    }
    assert before == DEPLOYMENT
    assert operations == ops_before


@pytest.mark.parametrize(
    ("operations", "message"),
    [
        ({"op": "add", "path": "/a", "value": 1}, "must be a list of operations, not an object"),
        ("[]", "must be a list of operations, not a str"),
        ([1], "json patch operation 0 must be an object, not a int"),
        ([{"path": "/a"}], 'json patch operation 0 has an unknown "op" None'),
        ([{"op": "upsert", "path": "/a"}], "unknown \"op\" 'upsert'"),
        ([{"op": "add", "value": 1}], 'json patch operation 0 (add) has no "path" member'),
        ([{"op": "remove", "path": "/a"}, {"op": "add", "path": "/a"}],
         'json patch operation 1 (add) has no "value" member'),
        ([{"op": "move", "path": "/a"}], 'has no "from" member'),
        ([{"op": "remove", "path": 5}], '"path" must be a string'),
        ([{"op": "remove", "path": "a"}], "Location must start with /"),
    ],
)
def test_json_patch_rejects_malformed_patches(operations: Any, message: str) -> None:
    with pytest.raises(ApiError) as caught:
        json_patch({"a": 1}, operations)
    assert caught.value.code == 400
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("operations", "message"),
    [
        ([{"op": "remove", "path": "/spec/paused"}],
         "json patch operation 0 (remove '/spec/paused') cannot be applied"),
        ([{"op": "replace", "path": "/status/phase", "value": "x"}],
         "(replace '/status/phase')"),
        ([{"op": "add", "path": "/spec/replicas", "value": 2},
          {"op": "test", "path": "/spec/replicas", "value": 3}],
         "json patch operation 1 (test '/spec/replicas') cannot be applied"),
        ([{"op": "test", "path": "/spec/replicas", "value": True}], "(test '/spec/replicas')"),
        ([{"op": "add", "path": "/metadata/name/x", "value": 1}], "(add '/metadata/name/x')"),
        ([{"op": "add", "path": "/spec/template/spec/containers/5", "value": {}}],
         "(add '/spec/template/spec/containers/5')"),
    ],
)
def test_json_patch_operation_that_does_not_apply_is_invalid(
    operations: list[dict[str, Any]], message: str
) -> None:
    before = copy.deepcopy(DEPLOYMENT)
    with pytest.raises(ApiError) as caught:
        json_patch(DEPLOYMENT, operations)
    assert (caught.value.code, caught.value.reason) == (422, "Invalid")
    assert message in caught.value.message
    assert before == DEPLOYMENT


def test_json_patch_limits_the_number_of_operations() -> None:
    operations = [{"op": "test", "path": "", "value": {}}] * (MAX_JSON_PATCH_OPERATIONS + 1)
    with pytest.raises(ApiError) as caught:
        json_patch({}, operations)
    assert caught.value.code == 413
    assert caught.value.reason == "RequestEntityTooLarge"


# ---------------------------------------------------------------- strategic merge patch

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "finalizers": {
            "type": "array", "items": {"type": "string"}, "x-kubernetes-patch-strategy": "merge",
        },
    },
}
SERVICE_SCHEMA = {
    "type": "object",
    "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": METADATA_SCHEMA,
        "spec": {
            "type": "object",
            "properties": {
                "ports": {
                    "type": "array",
                    "x-kubernetes-patch-strategy": "merge",
                    "x-kubernetes-patch-merge-key": "port",
                    "items": {"type": "object", "properties": {
                        "name": {"type": "string"},
                        "port": {"type": "integer"},
                        "protocol": {"type": "string"},
                        "targetPort": {"x-kubernetes-int-or-string": True},
                    }},
                },
                "selector": _STRING_MAP,
                "externalIPs": {"type": "array", "items": {"type": "string"}},
                "type": {"type": "string"},
            },
        },
    },
}


def _applied(ports: list[dict[str, Any]]) -> str:
    config = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"annotations": {}, "name": "web", "namespace": "default"},
        "spec": {"ports": ports, "selector": {"app": "web"}},
    }
    return json.dumps(config, separators=(",", ":")) + "\n"


def _live_service() -> dict[str, Any]:
    """The Service after a first `kubectl apply` and the server's defaulting."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "web", "namespace": "default", "resourceVersion": "41",
            "uid": "6c1b1a5e-5f0b-4b8e-9d62-3a1f0c2b7d10",
            "annotations": {LAST_APPLIED: _applied([
                {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "metrics", "port": 9090},
            ])},
        },
        "spec": {
            "clusterIP": "10.96.0.17", "type": "ClusterIP", "sessionAffinity": "None",
            "selector": {"app": "web"},
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                {"name": "metrics", "port": 9090, "protocol": "TCP", "targetPort": 9090},
            ],
        },
    }


def test_kubectl_second_apply_updates_one_port_and_deletes_the_other() -> None:
    live = _live_service()
    new_applied = _applied([{"name": "http", "port": 80, "targetPort": 8081}])
    # What kubectl's three-way diff sends when the metrics port is dropped from
    # the config and the http port's targetPort changes.
    patch = {
        "metadata": {"annotations": {LAST_APPLIED: new_applied}},
        "spec": {
            "$setElementOrder/ports": [{"port": 80}],
            "ports": [{"port": 80, "targetPort": 8081}, {"$patch": "delete", "port": 9090}],
        },
    }
    live_before, patch_before = copy.deepcopy(live), copy.deepcopy(patch)

    result = strategic_merge_patch(live, patch, SERVICE_SCHEMA)

    expected = _live_service()
    expected["metadata"]["annotations"][LAST_APPLIED] = new_applied
    expected["spec"]["ports"] = [
        {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8081},
    ]
    assert result == expected
    assert live == live_before
    assert patch == patch_before


def test_kubectl_apply_adding_a_port_follows_set_element_order() -> None:
    live = _live_service()
    live["spec"]["ports"] = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
    patch = {"spec": {
        "$setElementOrder/ports": [{"port": 443}, {"port": 80}],
        "ports": [{"name": "https", "port": 443, "targetPort": 8443}],
    }}
    result = strategic_merge_patch(live, patch, SERVICE_SCHEMA)
    assert result["spec"]["ports"] == [
        {"name": "https", "port": 443, "targetPort": 8443},
        {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
    ]


def test_set_element_order_alone_reorders_and_keeps_server_only_items_in_place() -> None:
    live = {"spec": {"ports": [{"port": 1}, {"port": 2}, {"port": 3}]}}
    patch = {"spec": {"$setElementOrder/ports": [{"port": 3}, {"port": 1}]}}
    result = strategic_merge_patch(live, patch, SERVICE_SCHEMA)
    assert result == {"spec": {"ports": [{"port": 2}, {"port": 3}, {"port": 1}]}}


def test_keyed_merge_without_order_keeps_patch_order_and_live_order() -> None:
    live = {"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 81, "name": "alt"}]}}
    patch = {"spec": {"ports": [{"port": 81, "name": "alt2"}, {"port": 90, "name": "new"}]}}
    result = strategic_merge_patch(live, patch, SERVICE_SCHEMA)
    assert result["spec"]["ports"] == [
        {"port": 80, "name": "http"}, {"port": 81, "name": "alt2"}, {"port": 90, "name": "new"},
    ]
    # With nothing to place it after, kube puts an item the live list lacks
    # ahead of the server-only items (kustomize calls this "prepend").
    alone = strategic_merge_patch(live, {"spec": {"ports": [{"port": 90}]}}, SERVICE_SCHEMA)
    assert alone["spec"]["ports"] == [
        {"port": 90}, {"port": 80, "name": "http"}, {"port": 81, "name": "alt"},
    ]


def test_replace_directive_in_a_list_replaces_it() -> None:
    live = _live_service()
    patch = {"spec": {"ports": [{"port": 8080, "name": None}, {"$patch": "replace"}]}}
    result = strategic_merge_patch(live, patch, SERVICE_SCHEMA)
    assert result["spec"]["ports"] == [{"port": 8080}]


def test_primitive_merge_list_is_a_set_union_with_deletions_and_order() -> None:
    live = {"metadata": {"finalizers": ["a", "b", "c"]}}
    union = strategic_merge_patch(live, {"metadata": {"finalizers": ["b", "d"]}}, SERVICE_SCHEMA)
    # Patch items keep the patch's order and are interleaved with the live ones
    # by their live positions; "d" has none, so it follows "b" at once.
    assert union["metadata"]["finalizers"] == ["a", "b", "d", "c"]
    deleted = strategic_merge_patch(
        live, {"metadata": {"$deleteFromPrimitiveList/finalizers": ["b", "zz"]}}, SERVICE_SCHEMA
    )
    assert deleted == {"metadata": {"finalizers": ["a", "c"]}}
    # kubectl apply after the config went from [a, b] to [d, a]; "c" is server-only.
    patch = {"metadata": {
        "$setElementOrder/finalizers": ["d", "a"],
        "finalizers": ["d"],
        "$deleteFromPrimitiveList/finalizers": ["b"],
    }}
    assert strategic_merge_patch(live, patch, SERVICE_SCHEMA) == {
        "metadata": {"finalizers": ["d", "a", "c"]},
    }


def test_lists_without_merge_strategy_are_replaced() -> None:
    live = {"spec": {"externalIPs": ["1.1.1.1", "2.2.2.2"], "ports": [{"port": 80}]}}
    patch = {"spec": {"externalIPs": ["3.3.3.3"]}}
    assert strategic_merge_patch(live, patch, SERVICE_SCHEMA)["spec"]["externalIPs"] == [
        "3.3.3.3",
    ]
    # Without a schema nothing is known to merge: every list is replaced.
    without_schema = strategic_merge_patch(live, {"spec": {"ports": [{"port": 81}]}}, None)
    assert without_schema == {"spec": {"externalIPs": ["1.1.1.1", "2.2.2.2"],
                                       "ports": [{"port": 81}]}}
    unknown_field = strategic_merge_patch(
        {"spec": {"extra": [1, 2]}}, {"spec": {"extra": [3]}}, SERVICE_SCHEMA
    )
    assert unknown_field == {"spec": {"extra": [3]}}


def test_maps_merge_and_null_deletes() -> None:
    live = _live_service()
    patch = {"metadata": {"labels": {"app": "web"}, "annotations": {LAST_APPLIED: None}},
             "spec": {"sessionAffinity": None, "missing": None, "selector": {"tier": "fe"}}}
    result = strategic_merge_patch(live, patch, SERVICE_SCHEMA)
    assert result["metadata"]["labels"] == {"app": "web"}
    assert result["metadata"]["annotations"] == {}
    assert "sessionAffinity" not in result["spec"]
    assert "missing" not in result["spec"]
    assert result["spec"]["selector"] == {"app": "web", "tier": "fe"}


def test_map_directives_replace_and_delete() -> None:
    live = _live_service()
    replaced = strategic_merge_patch(
        live, {"spec": {"selector": {"$patch": "replace", "app": "api"}}}, SERVICE_SCHEMA
    )
    assert replaced["spec"]["selector"] == {"app": "api"}
    deleted = strategic_merge_patch(live, {"spec": {"selector": {"$patch": "delete"}}},
                                    SERVICE_SCHEMA)
    assert "selector" not in deleted["spec"]
    assert deleted["spec"]["clusterIP"] == "10.96.0.17"
    assert strategic_merge_patch(live, {"$patch": "delete"}, SERVICE_SCHEMA) == {}
    assert strategic_merge_patch(live, {"$patch": "replace", "kind": "Service"}, None) == {
        "kind": "Service",
    }


def test_replace_strategy_on_a_map_field_replaces_it() -> None:
    schema = {"properties": {"data": {"type": "object", "x-kubernetes-patch-strategy": "replace"}}}
    result = strategic_merge_patch({"data": {"a": 1, "b": 2}}, {"data": {"c": 3}}, schema)
    assert result == {"data": {"c": 3}}


def test_new_values_lose_their_nulls_and_directives() -> None:
    patch = {
        "metadata": {"labels": {"a": "1", "b": None}},
        "spec": {
            "$setElementOrder/ports": [{"port": 80}],
            "ports": [{"port": 80, "name": None}, {"$patch": "delete", "port": 81}],
            "selector": {"$patch": "replace", "app": "x"},
            "gone": {"$patch": "delete"},
        },
    }
    result = strategic_merge_patch({}, patch, SERVICE_SCHEMA)
    assert result == {
        "metadata": {"labels": {"a": "1"}},
        "spec": {"ports": [{"port": 80}], "selector": {"app": "x"}},
    }


def test_type_change_replaces_the_value() -> None:
    result = strategic_merge_patch(
        {"spec": {"selector": "odd", "ports": {"not": "a list"}}},
        {"spec": {"selector": {"a": "b", "c": None}, "ports": [{"port": 1}]}},
        SERVICE_SCHEMA,
    )
    assert result == {"spec": {"selector": {"a": "b"}, "ports": [{"port": 1}]}}


# A Deployment-like schema: retainKeys on a map and on a keyed list, nested keyed
# lists, and the `allOf` wrapping OpenAPI v3 puts around references.
POD_SPEC_SCHEMA = {
    "type": "object",
    "properties": {
        "containers": {
            "type": "array",
            "x-kubernetes-patch-strategy": "merge",
            "x-kubernetes-patch-merge-key": "name",
            "items": {"type": "object", "properties": {
                "name": {"type": "string"},
                "image": {"type": "string"},
                "args": {"type": "array", "items": {"type": "string"}},
                "env": {
                    "type": "array",
                    "x-kubernetes-patch-strategy": "merge",
                    "x-kubernetes-patch-merge-key": "name",
                    "items": {"type": "object"},
                },
            }},
        },
        "volumes": {
            "type": "array",
            "x-kubernetes-patch-strategy": "merge,retainKeys",
            "x-kubernetes-patch-merge-key": "name",
            "items": {"type": "object"},
        },
    },
}
DEPLOYMENT_SCHEMA = {
    "type": "object",
    "properties": {"spec": {"type": "object", "properties": {
        "replicas": {"type": "integer"},
        "strategy": {"type": "object", "x-kubernetes-patch-strategy": "retainKeys"},
        "template": {"type": "object", "properties": {
            "spec": {"allOf": [POD_SPEC_SCHEMA], "description": "the pod's spec"},
        }},
    }}},
}


def _deployment() -> dict[str, Any]:
    return {"spec": {
        "replicas": 2,
        "strategy": {"type": "RollingUpdate",
                     "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
        "template": {"spec": {
            "containers": [
                {"name": "app", "image": "app:1", "args": ["--x"],
                 "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                {"name": "sidecar", "image": "proxy:1"},
            ],
            "volumes": [{"name": "data", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
        }},
    }}


def test_retain_keys_switches_the_deployment_strategy() -> None:
    patch = {"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate",
                                   "rollingUpdate": None}}}
    result = strategic_merge_patch(_deployment(), patch, DEPLOYMENT_SCHEMA)
    assert result["spec"]["strategy"] == {"type": "Recreate"}


def test_retain_keys_in_a_keyed_list_item_switches_the_volume_source() -> None:
    patch = {"spec": {"template": {"spec": {"volumes": [
        {"name": "data", "$retainKeys": ["configMap", "name"], "configMap": {"name": "cfg"}},
    ]}}}}
    result = strategic_merge_patch(_deployment(), patch, DEPLOYMENT_SCHEMA)
    assert result["spec"]["template"]["spec"]["volumes"] == [
        {"name": "data", "configMap": {"name": "cfg"}},
        {"name": "tmp", "emptyDir": {}},
    ]


def test_nested_keyed_lists_merge_through_an_allof_schema() -> None:
    patch = {"spec": {"template": {"spec": {"containers": [
        {"name": "app", "image": "app:2", "args": ["--y"], "env": [{"name": "B", "value": "3"}]},
    ]}}}}
    result = strategic_merge_patch(_deployment(), patch, DEPLOYMENT_SCHEMA)
    assert result["spec"]["template"]["spec"]["containers"] == [
        {"name": "app", "image": "app:2", "args": ["--y"],
         "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "3"}]},
        {"name": "sidecar", "image": "proxy:1"},
    ]


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"spec": {"$foo": 1}}, 'unknown strategic merge patch directive "$foo" in spec'),
        ({"spec": {"selector": {"$patch": "nuke"}}}, "unknown patch type: 'nuke' in map"),
        ({"spec": {"ports": [{"$patch": "nuke"}]}}, "unknown patch type: 'nuke' in list"),
        ({"spec": {"ports": [{"$patch": "merge"}]}}, "merging lists cannot yet be specified"),
        ({"spec": {"ports": [{"$patch": "delete", "name": "x"}]}},
         "does not contain declared merge key: port"),
        ({"spec": {"ports": [{"name": "x"}]}}, "does not contain declared merge key: port"),
        ({"spec": {"ports": ["80"]}}, "list element types are not identical in spec.ports"),
        ({"spec": {"$setElementOrder/ports": [{"port": 80}, {"port": 9090}],
                   "ports": [{"port": 9090}, {"port": 80}]}},
         "doesn't match its $setElementOrder list"),
        ({"spec": {"$setElementOrder/ports": [{"name": "http"}]}},
         "invalid patch format of setElementOrder list spec.ports"),
        ({"spec": {"$setElementOrder/ports": "80"}}, "invalid patch format of setElementOrder"),
        ({"metadata": {"$deleteFromPrimitiveList/finalizers": "a"}},
         "invalid patch format of primitive list metadata.finalizers"),
        ({"spec": {"$retainKeys": "type"}}, "invalid patch format of retainKeys in spec"),
        ({"spec": {"$retainKeys": ["type"], "clusterIP": "None"}},
         "spec.clusterIP is set by the patch but not listed in $retainKeys"),
    ],
)
def test_malformed_strategic_patches_are_bad_requests(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(ApiError) as caught:
        strategic_merge_patch(_live_service(), patch, SERVICE_SCHEMA)
    assert caught.value.code == 400
    assert message in caught.value.message


def test_strategic_patch_must_be_an_object() -> None:
    not_objects: list[Any] = [[], "x", None]
    for patch in not_objects:
        with pytest.raises(ApiError) as caught:
            strategic_merge_patch({}, patch, None)
        assert caught.value.code == 400


def test_lists_of_lists_cannot_be_merged() -> None:
    schema = {"properties": {"m": {"type": "array", "x-kubernetes-patch-strategy": "merge"}}}
    with pytest.raises(ApiError) as caught:
        strategic_merge_patch({"m": [[1]]}, {"m": [[2]]}, schema)
    assert (caught.value.code, caught.value.reason) == (422, "Invalid")


# ---------------------------------------------------------------- properties

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text("xyz", max_size=2))
_keys = st.sampled_from(["a", "b", "c", "d"])
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(_keys, inner, max_size=4)
    ),
    max_leaves=12,
)
_objects = st.dictionaries(_keys, _json, max_size=4)
_list_free_objects = st.recursive(
    st.dictionaries(_keys, _scalars, max_size=3),
    lambda inner: st.dictionaries(_keys, st.one_of(_scalars, inner), max_size=4),
    max_leaves=12,
)


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    return value


def _replace_everything(target: Any, desired: Any) -> Any:
    """The merge patch that turns `target` into `desired` (which holds no nulls)."""
    if not isinstance(target, dict) or not isinstance(desired, dict):
        return desired
    patch: dict[str, Any] = {k: None for k in target if k not in desired}
    for key, value in desired.items():
        patch[key] = _replace_everything(target.get(key), value)
    return patch


@given(_json, _json)
def test_merge_patch_is_idempotent_and_pure(target: Any, patch: Any) -> None:
    target_before, patch_before = copy.deepcopy(target), copy.deepcopy(patch)
    once = json_merge_patch(target, patch)
    assert json_merge_patch(once, patch) == once
    assert (target, patch) == (target_before, patch_before)


@given(_objects)
def test_merge_patch_onto_nothing_is_the_patch_minus_nulls(patch: dict[str, Any]) -> None:
    assert json_merge_patch({}, patch) == _strip_nulls(patch)


@given(_objects, _objects)
def test_replace_everything_patch_yields_the_desired_document(
    target: dict[str, Any], desired: dict[str, Any]
) -> None:
    desired = _strip_nulls(desired)
    assert json_merge_patch(target, _replace_everything(target, desired)) == desired


@given(_objects, _list_free_objects)
def test_schemaless_strategic_patch_equals_merge_patch_without_lists_or_directives(
    target: dict[str, Any], patch: dict[str, Any]
) -> None:
    assert strategic_merge_patch(target, patch, None) == json_merge_patch(target, patch)


_smp_keys = st.sampled_from([
    "metadata", "spec", "ports", "finalizers", "port", "name", "selector", "a",
    "$patch", "$retainKeys", "$setElementOrder/ports", "$setElementOrder/finalizers",
    "$deleteFromPrimitiveList/finalizers",
])
_smp_scalars = st.one_of(
    st.none(), st.integers(79, 81), st.sampled_from(["delete", "replace", "merge", "port", "x"])
)
_smp_json = st.recursive(
    _smp_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(_smp_keys, inner, max_size=4)
    ),
    max_leaves=16,
)


def _directive_keys(value: Any) -> list[str]:
    if isinstance(value, dict):
        own = [k for k in value if k.startswith("$")]
        return own + [k for v in value.values() for k in _directive_keys(v)]
    if isinstance(value, list):
        return [k for v in value for k in _directive_keys(v)]
    return []


@settings(max_examples=300)
@given(st.dictionaries(_smp_keys, _smp_json, max_size=4))
def test_strategic_patch_fails_cleanly_and_never_leaks_directives(patch: dict[str, Any]) -> None:
    live = _live_service()
    live["metadata"]["finalizers"] = ["x", "port"]
    live_before, patch_before = copy.deepcopy(live), copy.deepcopy(patch)
    try:
        result = strategic_merge_patch(live, patch, SERVICE_SCHEMA)
    except ApiError as exc:
        assert exc.code in (400, 422)
    else:
        assert _directive_keys(result) == []
    assert (live, patch) == (live_before, patch_before)


_pointer = st.lists(st.sampled_from(["a", "b", "0", "1", "-", "~1", "x"]), max_size=3).map(
    lambda parts: "".join("/" + p for p in parts)
)
_operation = st.fixed_dictionaries(
    {"op": st.sampled_from(["add", "remove", "replace", "move", "copy", "test"]),
     "path": _pointer},
    optional={"value": _json, "from": _pointer},
)


@given(_json, st.lists(_operation, max_size=4))
def test_json_patch_fails_only_with_api_errors_and_is_pure(
    target: Any, operations: list[dict[str, Any]]
) -> None:
    target_before, ops_before = copy.deepcopy(target), copy.deepcopy(operations)
    try:
        json_patch(target, operations)
    except ApiError as exc:
        assert exc.code in (400, 422)
    assert (target, operations) == (target_before, ops_before)


@given(_json, _json)
def test_json_patch_reproduces_a_diff(source: Any, desired: Any) -> None:
    operations = jsonpatch.make_patch(source, desired).patch
    assert json_patch(source, operations) == desired
