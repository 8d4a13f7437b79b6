"""Field sets and server-side apply without a server: what structured-merge-diff and
kube's field manager compute for the same objects."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from localcluster import fieldpath, managedfields
from localcluster.errors import ApiError
from localcluster.fieldpath import PE, fld
from localcluster.managedfields import APPLY, UPDATE, ManagerKey, Managers, Scope
from localcluster.schema import builtin_schema

NOW = "2026-12-06T00:00:00Z"
LATER = "2026-12-06T00:01:00Z"


def scope(model: str = "V1ConfigMap", *, status: bool = False, sub: str = "") -> Scope:
    return Scope(managedfields.object_schema(builtin_schema(model)), "v1", sub, status)


def cm(data: dict[str, str], **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "namespace": "default", **meta}, "data": data}


def fields_of(managers: Managers, manager: str, operation: str = APPLY) -> dict[str, Any]:
    for item in managers.encode():
        if item["manager"] == manager and item["operation"] == operation:
            return dict(item["fieldsV1"])
    raise AssertionError(f"no {operation} entry for {manager}: {managers.encode()}")


def test_update_on_create_marks_added_maps_as_members() -> None:
    # What kube records for `kubectl create configmap` / a client-side apply.
    obj = cm({"key": "a"}, annotations={"note": "x"})
    out = managedfields.update(scope(), None, obj, Managers(), "kubectl-create", NOW)
    assert out.encode() == [{
        "manager": "kubectl-create", "operation": "Update", "apiVersion": "v1", "time": NOW,
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:data": {".": {}, "f:key": {}},
                     "f:metadata": {"f:annotations": {".": {}, "f:note": {}}}},
    }]


def test_apply_owns_leaves_and_keyed_list_items() -> None:
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"selector": {"app": "web"},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}
    out = managedfields.apply(scope("V1Service", status=True), None, svc, Managers(),
                              "kubectl", force=False, now=NOW)
    assert fields_of(out.managers, "kubectl") == {"f:spec": {
        "f:ports": {'k:{"port":80,"protocol":"TCP"}': {
            ".": {}, "f:name": {}, "f:port": {}, "f:targetPort": {}}},
        "f:selector": {"f:app": {}},
    }}


def test_apply_removes_what_the_manager_stopped_applying() -> None:
    first = managedfields.apply(scope(), None, cm({"a": "1", "b": "2"}), Managers(), "kubectl",
                                force=False, now=NOW)
    second = managedfields.apply(scope(), first.obj, cm({"a": "1"}), first.managers, "kubectl",
                                 force=False, now=LATER)
    assert second.obj["data"] == {"a": "1"}
    assert fields_of(second.managers, "kubectl") == {"f:data": {"f:a": {}}}


def test_a_field_another_manager_owns_is_kept_when_the_applier_drops_it() -> None:
    first = managedfields.apply(scope(), None, cm({"a": "1", "b": "2"}), Managers(), "one",
                                force=False, now=NOW)
    shared = managedfields.apply(scope(), first.obj, cm({"b": "2"}), first.managers, "two",
                                 force=False, now=NOW)
    dropped = managedfields.apply(scope(), shared.obj, cm({"a": "1"}), shared.managers, "one",
                                  force=False, now=LATER)
    assert dropped.obj["data"] == {"a": "1", "b": "2"}
    assert fields_of(dropped.managers, "two") == {"f:data": {"f:b": {}}}


def test_conflict_names_the_manager_and_field_and_force_takes_them_over() -> None:
    created = managedfields.update(scope(), None, cm({"key": "a"}), Managers(),
                                   "kubectl-client-side-apply", NOW)
    live = cm({"key": "a"}, managedFields=created.encode())
    with pytest.raises(ApiError) as err:
        managedfields.apply(scope(), live, cm({"key": "b"}), created, "other", force=False,
                            now=LATER)
    assert err.value.code == 409 and err.value.reason == "Conflict"
    assert err.value.message == ('Apply failed with 1 conflict: conflict with '
                                 '"kubectl-client-side-apply" using v1: .data.key')
    assert err.value.status()["details"]["causes"] == [{
        "reason": "FieldManagerConflict", "field": ".data.key",
        "message": 'conflict with "kubectl-client-side-apply" using v1'}]
    forced = managedfields.apply(scope(), live, cm({"key": "b"}), created, "other", force=True,
                                 now=LATER)
    assert forced.obj["data"] == {"key": "b"}
    assert fields_of(forced.managers, "other") == {"f:data": {"f:key": {}}}
    # it keeps the map it created, as kube's `f:data: {}`
    assert fields_of(forced.managers, "kubectl-client-side-apply", UPDATE) == {"f:data": {}}


def test_conflicts_with_several_managers_are_listed_by_manager() -> None:
    one = managedfields.apply(scope(), None, cm({"a": "1"}), Managers(), "one", force=False,
                              now=NOW)
    two = managedfields.apply(scope(), one.obj, cm({"b": "2"}), one.managers, "two",
                              force=False, now=NOW)
    with pytest.raises(ApiError) as err:
        managedfields.apply(scope(), two.obj, cm({"a": "x", "b": "y"}), two.managers, "three",
                            force=False, now=NOW)
    assert err.value.message == ('Apply failed with 2 conflicts: conflicts with "one":\n'
                                 '- .data.a\nconflicts with "two":\n- .data.b')


def test_same_value_is_shared_not_a_conflict() -> None:
    one = managedfields.apply(scope(), None, cm({"a": "1"}), Managers(), "one", force=False,
                              now=NOW)
    two = managedfields.apply(scope(), one.obj, cm({"a": "1"}), one.managers, "two",
                              force=False, now=NOW)
    assert fields_of(two.managers, "one") == fields_of(two.managers, "two")


def test_kubectl_takes_over_its_client_side_fields() -> None:
    # kube lets the "kubectl" applier take fields whose live values are still those
    # of the last client-side apply, and keeps the annotation up to date.
    last = json.dumps(cm({"key": "a"}))
    live = cm({"key": "a"}, annotations={managedfields.LAST_APPLIED: last})
    managers = managedfields.update(scope(), None, live, Managers(),
                                    "kubectl-client-side-apply", NOW)
    out = managedfields.apply(scope(), live, cm({"key": "b"}), managers, "kubectl",
                              force=False, now=LATER)
    assert out.obj["data"] == {"key": "b"}
    annotation = json.loads(out.obj["metadata"]["annotations"][managedfields.LAST_APPLIED])
    assert annotation["data"] == {"key": "b"}
    # another manager gets the conflict
    with pytest.raises(ApiError):
        managedfields.apply(scope(), live, cm({"key": "b"}), managers, "other", force=False,
                            now=LATER)


def test_an_object_without_managed_fields_is_owned_before_first_apply() -> None:
    live = cm({"key": "a"})
    with pytest.raises(ApiError) as err:
        managedfields.apply(scope(), live, cm({"key": "b"}), Managers(), "other", force=False,
                            now=NOW)
    assert '"before-first-apply" using v1: .data.key' in err.value.message


def test_update_takes_changed_fields_and_drops_removed_ones() -> None:
    applied = managedfields.apply(scope(), None, cm({"a": "1", "b": "2"}), Managers(),
                                  "kubectl", force=False, now=NOW)
    edited = cm({"a": "changed"})
    out = managedfields.update(scope(), applied.obj, edited, applied.managers, "kubectl-edit",
                               LATER)
    assert "kubectl" not in {e["manager"] for e in out.encode()}
    assert fields_of(out, "kubectl-edit", UPDATE) == {"f:data": {"f:a": {}}}


def test_status_is_not_owned_through_the_main_resource() -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "c", "image": "i"}]},
           "status": {"phase": "Running"}}
    out = managedfields.update(scope("V1Pod", status=True), None, pod, Managers(), "m", NOW)
    assert "f:status" not in fields_of(out, "m", UPDATE)
    status = managedfields.update(scope("V1Pod", status=True, sub="status"), None, pod,
                                  Managers(), "kubelet", NOW)
    [entry] = status.encode()
    assert entry["subresource"] == "status" and list(entry["fieldsV1"]) == ["f:status"]


def test_containers_merge_by_name_and_finalizers_as_a_set() -> None:
    schema = managedfields.object_schema(builtin_schema("V1Pod"))
    live = {"metadata": {"finalizers": ["a"]},
            "spec": {"containers": [{"name": "x", "image": "1"}, {"name": "y", "image": "2"}]}}
    config = {"metadata": {"finalizers": ["b"]},
              "spec": {"containers": [{"name": "y", "image": "3"}]}}
    merged = fieldpath.merge(live, config, schema)
    assert merged["spec"]["containers"] == [{"name": "x", "image": "1"},
                                            {"name": "y", "image": "3"}]
    assert merged["metadata"]["finalizers"] == ["a", "b"]
    assert fieldpath.encode(fieldpath.field_set(config, schema)) == {
        "f:metadata": {"f:finalizers": {'v:"b"': {}}},
        "f:spec": {"f:containers": {'k:{"name":"y"}': {".": {}, "f:image": {}, "f:name": {}}}},
    }


def test_a_keyed_item_without_its_key_is_refused() -> None:
    schema = managedfields.object_schema(builtin_schema("V1Pod"))
    with pytest.raises(fieldpath.FieldPathError, match="omits all key fields \\[\"name\"\\]"):
        fieldpath.field_set({"spec": {"containers": [{"image": "i"}]}}, schema)


def test_path_text_as_structured_merge_diff_prints_it() -> None:
    path = (fld("spec"), fld("ports"), PE("k", '{"port":80,"protocol":"TCP"}'), fld("name"))
    assert fieldpath.path_text(path) == '.spec.ports[port=80,protocol="TCP"].name'
    assert fieldpath.path_text((fld("f"), PE("v", '"a"'))) == '.f[="a"]'


def test_manager_identity_and_description() -> None:
    assert ManagerKey("kubectl-edit", UPDATE, "v1").describe() == '"kubectl-edit" using v1'
    assert ManagerKey("k", APPLY, "", "status").describe() == '"k" with subresource "status"'
    assert managedfields.default_manager("kubectl/v1.37.1 (linux/amd64)") == "kubectl"
    assert managedfields.default_manager("OpenAPI-Generator/31.0.0/python") == \
        "OpenAPI-Generator"


def test_apply_options_as_kube_validates_them() -> None:
    with pytest.raises(ApiError) as err:
        managedfields.apply_options("", None)
    assert err.value.code == 422
    assert err.value.message == ('PatchOptions.meta.k8s.io "" is invalid: fieldManager: '
                                 'Required value: is required for apply patch')
    assert managedfields.apply_options("m", "true") is True
    assert managedfields.apply_options("m", "false") is False
    with pytest.raises(ApiError):
        managedfields.check_manager("x" * 129)


_names = st.sampled_from(["a", "b", "c.d", "f:e", "/x"])
_json_leaf = st.one_of(st.sampled_from(["", "s", "t"]), st.integers(-2, 2), st.booleans(),
                       st.lists(st.integers(0, 2), max_size=2))
_tree: st.SearchStrategy[Any] = st.recursive(
    st.dictionaries(_names, _json_leaf, max_size=3),
    lambda inner: st.dictionaries(_names, inner, min_size=1, max_size=3),
    max_leaves=8)


@given(_tree)
def test_fields_v1_round_trips(obj: dict[str, Any]) -> None:
    paths = fieldpath.field_set(obj, None)
    assert fieldpath.decode(json.loads(json.dumps(fieldpath.encode(paths)))) == paths


@given(_tree, _tree)
def test_merge_then_compare_only_touches_applied_paths(live: dict[str, Any],
                                                       config: dict[str, Any]) -> None:
    merged = fieldpath.merge(live, config, None)
    diff = fieldpath.compare(live, merged, None)
    applied = fieldpath.field_set(config, None)
    prefixes = {p[:i] for p in applied for i in range(len(p) + 1)}
    for path in diff.added | diff.modified | diff.removed:
        assert path in prefixes or any(path[:len(a)] == a for a in applied)


def test_atomic_structs_are_owned_whole() -> None:
    schema = managedfields.object_schema(builtin_schema("V1Pod"))
    pod = {"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "x",
                                             "uid": "u1"}]},
           "spec": {"containers": [{"name": "c", "env": [
               {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}]}}
    assert fieldpath.encode(fieldpath.field_set(pod, schema)) == {
        "f:metadata": {"f:ownerReferences": {'k:{"uid":"u1"}': {}}},
        "f:spec": {"f:containers": {'k:{"name":"c"}': {
            ".": {}, "f:env": {'k:{"name":"N"}': {
                ".": {}, "f:name": {}, "f:valueFrom": {"f:fieldRef": {}}}},
            "f:name": {}}}},
    }
    changed = {"fieldRef": {"fieldPath": "metadata.namespace"}}
    merged = fieldpath.merge(pod, {"spec": {"containers": [{"name": "c", "env": [
        {"name": "N", "valueFrom": changed}]}]}}, schema)
    assert merged["spec"]["containers"][0]["env"][0]["valueFrom"] == changed


def test_list_merge_order_follows_structured_merge_diff() -> None:
    schema = managedfields.object_schema(builtin_schema("V1Pod"))

    def names(live: list[str], config: list[str]) -> list[str]:
        merged = fieldpath.merge(
            {"spec": {"containers": [{"name": n} for n in live]}},
            {"spec": {"containers": [{"name": n} for n in config]}}, schema)
        return [c["name"] for c in merged["spec"]["containers"]]

    assert names(["a", "x"], ["b", "a"]) == ["b", "a", "x"]
    assert names(["a", "b"], ["b", "a"]) == ["b", "a"]
    assert names(["x", "a", "y"], ["a", "n"]) == ["x", "a", "y", "n"]


def test_update_managers_are_capped_into_ancient_changes() -> None:
    managers = Managers()
    obj: dict[str, Any] = cm({})
    for i in range(12):
        new = cm({**obj["data"], f"k{i}": "v"})
        managers = managedfields.update(scope(), obj, new, managers, f"m{i:02}",
                                        f"2026-12-06T00:00:{i:02}Z")
        obj = new
    capped = managedfields.cap_updaters(managers)
    names = [e["manager"] for e in capped.encode()]
    assert len(names) == 10 and names[0] == "ancient-changes"
    assert names[1:] == [f"m{i:02}" for i in range(3, 12)]
    assert fields_of(capped, "ancient-changes", UPDATE) == {
        "f:data": {"f:k0": {}, "f:k1": {}, "f:k2": {}}}


def test_one_empty_entry_resets_managed_fields() -> None:
    live = cm({"a": "1"}, managedFields=managedfields.update(
        scope(), None, cm({"a": "1"}), Managers(), "m", NOW).encode())
    new = cm({"a": "2"}, managedFields=[{}])
    managedfields.record(scope(), live, new, [{}], manager="n", now=NOW)
    assert "managedFields" not in new["metadata"]


def test_update_managers_at_the_same_second_are_kept_apart() -> None:
    managers = Managers()
    obj = cm({})
    for i in range(3):
        new = cm({**obj["data"], f"k{i}": "v"})
        managers = managedfields.update(scope(), obj, new, managers, f"m{i}", NOW)
        obj = new
    out = managedfields.cap_updaters(managers, limit=2)
    assert [e["manager"] for e in out.encode()] == ["ancient-changes", "m2"]


def test_a_config_fields_cannot_describe_is_kubes_500() -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"image": "i"}]}}
    with pytest.raises(ApiError) as err:
        managedfields.apply(scope("V1Pod", status=True), None, pod, Managers(), "m",
                            force=False, now=NOW)
    assert err.value.code == 500 and err.value.message.startswith(
        "Internal error occurred: failed to create typed patch object (/v1, Kind=Pod): "
        "associative list with keys has an element that omits all key fields")
