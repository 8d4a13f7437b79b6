"""The three PATCH body types kube-apiserver accepts, applied to plain JSON values.

* `json_merge_patch` — application/merge-patch+json (RFC 7386);
* `json_patch` — application/json-patch+json (RFC 6902), via the `jsonpatch` library;
* `strategic_merge_patch` — application/strategic-merge-patch+json, what
  `kubectl apply` and `kubectl patch` send, guided by a structural schema that
  carries kube's `x-kubernetes-patch-strategy` / `x-kubernetes-patch-merge-key`.

Pure logic: inputs are never mutated, and every failure is an `ApiError` whose
code and reason are the ones kube-apiserver gives for the same patch.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any

import jsonpatch

from localcluster.errors import ApiError
from localcluster.fieldpath import schema_node

# kube-apiserver refuses longer JSON patches (maxJSONPatchOperations).
MAX_JSON_PATCH_OPERATIONS = 10000

# ---------------------------------------------------------------- JSON merge patch


def json_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge member by member, `null` removes, anything else replaces."""
    return _merge_owned(copy.deepcopy(target), patch)


def _merge_owned(target: Any, patch: Any) -> Any:
    # `target` is already a private copy here, so it may be changed in place.
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    merged: dict[str, Any] = target if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = _merge_owned(merged.get(name), value)
    return merged


# ---------------------------------------------------------------- JSON patch

# The members each operation needs besides "path" (RFC 6902, section 4).
_JSON_PATCH_MEMBERS: dict[str, tuple[str, ...]] = {
    "add": ("value",), "remove": (), "replace": ("value",),
    "move": ("from",), "copy": ("from",), "test": ("value",),
}


def json_patch(target: Any, operations: Any) -> Any:
    """RFC 6902. A malformed patch is a 400; an operation that does not apply to
    this document (missing path, failed test) is a 422 naming the operation."""
    if not isinstance(operations, list):
        raise ApiError.bad_request(
            f"a json patch must be a list of operations, not {_json_type(operations)}"
        )
    if len(operations) > MAX_JSON_PATCH_OPERATIONS:
        raise ApiError(
            413, "RequestEntityTooLarge",
            f"The allowed maximum operations in a JSON patch is {MAX_JSON_PATCH_OPERATIONS}, "
            f"got {len(operations)}",
        )
    steps = [_json_patch_step(i, op) for i, op in enumerate(operations)]
    document = copy.deepcopy(target)
    for i, (op, step) in enumerate(zip(operations, steps, strict=True)):
        try:
            # `add`/`replace`/`copy` copy their values, so the patch stays untouched.
            document = step.apply(document, in_place=True)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise ApiError(
                422, "Invalid",
                f"json patch operation {i} ({op['op']} {op['path']!r}) cannot be applied: {exc}",
            ) from None
    return document


def _json_patch_step(index: int, op: Any) -> Any:
    where = f"json patch operation {index}"
    if not isinstance(op, Mapping):
        raise ApiError.bad_request(f"{where} must be an object, not {_json_type(op)}")
    name = op.get("op")
    if not isinstance(name, str) or name not in _JSON_PATCH_MEMBERS:
        raise ApiError.bad_request(
            f'{where} has an unknown "op" {name!r}: expected one of '
            + ", ".join(_JSON_PATCH_MEMBERS)
        )
    for member in ("path", *_JSON_PATCH_MEMBERS[name]):
        if member not in op:
            raise ApiError.bad_request(f'{where} ({name}) has no "{member}" member')
        if member != "value" and not isinstance(op[member], str):
            raise ApiError.bad_request(f'{where} ({name}): "{member}" must be a string')
    try:
        return jsonpatch.JsonPatch([dict(op)])
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
        raise ApiError.bad_request(f"{where} ({name} {op['path']!r}): {exc}") from None


def _json_type(value: Any) -> str:
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return "null" if value is None else f"a {type(value).__name__}"


# ---------------------------------------------------------------- strategic merge patch

_PATCH = "$patch"
_RETAIN_KEYS = "$retainKeys"
_SET_ORDER = "$setElementOrder/"
_DELETE_FROM = "$deleteFromPrimitiveList/"


class _Deleted(Enum):
    """What merging a `{"$patch": "delete"}` map yields: the key goes away."""

    TOKEN = "deleted"


_DELETED = _Deleted.TOKEN


def strategic_merge_patch(
    original: Mapping[str, Any], patch: Mapping[str, Any], schema: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Apply a strategic merge patch as kube-apiserver does for `kubectl apply`.

    `schema` is the object's structural schema; lists are merged by key only
    where it says `x-kubernetes-patch-strategy: merge`, and replaced otherwise,
    as are lists under fields the schema does not know (or with no schema).
    """
    if not isinstance(patch, Mapping):
        raise ApiError.bad_request(
            f"a strategic merge patch must be a JSON object, not {_json_type(patch)}"
        )
    base = _own(original) if isinstance(original, Mapping) else {}
    merged = _merge_map(base, patch, schema_node(schema), "")
    # kube answers a top-level {"$patch": "delete"} with an empty object.
    return {} if merged is _DELETED else merged


def _merge_map(
    original: dict[str, Any], patch: Mapping[str, Any], schema: Mapping[str, Any] | None,
    path: str,
) -> dict[str, Any] | _Deleted:
    """Merge `patch` into `original` (a private copy, changed in place)."""
    if _PATCH in patch:
        return _map_directive(patch, schema, path)
    fields: dict[str, Any] = {}
    orders: dict[str, Any] = {}
    deletions: dict[str, Any] = {}
    for key, value in patch.items():
        if key.startswith(_SET_ORDER):
            orders[key[len(_SET_ORDER):]] = value
        elif key.startswith(_DELETE_FROM):
            deletions[key[len(_DELETE_FROM):]] = value
        elif key.startswith("$") and key != _RETAIN_KEYS:
            raise ApiError.bad_request(
                f'unknown strategic merge patch directive "{key}" in {_where(path)}'
            )
        elif key != _RETAIN_KEYS:
            fields[key] = value
    if _RETAIN_KEYS in patch:
        _retain_keys(original, patch[_RETAIN_KEYS], fields, path)
    # $setElementOrder lists are merged together with their field, so that the
    # order is decided once over the merged items; the field is then done.
    for name, order in orders.items():
        sub = _field_schema(schema, name)
        _order_list(original, fields, name, order, sub, _child(path, name))
    for key, value in fields.items():
        if key not in orders:
            _merge_field(original, key, value, _field_schema(schema, key), _child(path, key))
    for name, values in deletions.items():
        _delete_from_primitive_list(original, name, values, _child(path, name))
    return original


def _map_directive(
    patch: Mapping[str, Any], schema: Mapping[str, Any] | None, path: str
) -> dict[str, Any] | _Deleted:
    directive = patch[_PATCH]
    if directive == "replace":
        rest = {k: v for k, v in patch.items() if k != _PATCH}
        return _merge_map({}, rest, schema, path)
    if directive == "delete":
        return _DELETED
    raise ApiError.bad_request(f"unknown patch type: {directive!r} in map {_where(path)}")


def _merge_field(
    original: dict[str, Any], key: str, value: Any, schema: Mapping[str, Any] | None, path: str
) -> None:
    if value is None:
        original.pop(key, None)
        return
    current = original.get(key)
    merged: Any
    if isinstance(current, dict) and isinstance(value, Mapping):
        into = {} if "replace" in _strategies(schema) else current
        merged = _merge_map(into, value, schema, path)
    elif isinstance(current, list) and isinstance(value, list):
        merged = _merge_list(current, value, schema, path)
    else:
        merged = _fresh(value, schema, path)
    if merged is _DELETED:
        original.pop(key, None)
    else:
        original[key] = merged


def _fresh(value: Any, schema: Mapping[str, Any] | None, path: str) -> Any:
    """A patch value with nothing under it: nulls and directives resolved against
    an empty map or list, so that no `$` key and no patch object reach the result."""
    if isinstance(value, Mapping):
        return _merge_map({}, value, schema, path)
    if isinstance(value, list):
        return _merge_list([], value, schema, path)
    return value


def _merge_list(
    original: list[Any], patch: list[Any], schema: Mapping[str, Any] | None, path: str
) -> list[Any]:
    items = schema_node(schema.get("items")) if schema is not None else None
    if "merge" in _strategies(schema):
        return _merge_slice(original, patch, items, _merge_key(schema), path)
    replaced: list[Any] = []
    for i, item in enumerate(patch):
        if isinstance(item, Mapping) and dict(item) == {_PATCH: "replace"}:
            continue  # a no-op here: the whole list is replaced anyway
        value = _fresh(item, items, f"{path}[{i}]")
        if value is not _DELETED:
            replaced.append(value)
    return replaced


def _merge_slice(
    original: list[Any], patch: list[Any], items: Mapping[str, Any] | None,
    merge_key: str | None, path: str,
) -> list[Any]:
    """A `patchStrategy: merge` list: primitives form a set, maps merge by key."""
    original, patch = _list_directives(original, patch, items, merge_key, path)
    if not original and not patch:
        return original
    merged: list[Any]
    if _element_kind([*original, *patch], path) == "scalar":
        merged = _dedupe([*original, *patch])
    elif not merge_key:
        raise ApiError.bad_request(f"cannot merge lists without merge key for {_where(path)}")
    else:
        merged = list(original)
        positions = _positions(merged, merge_key)
        for i, item in enumerate(patch):
            if merge_key not in item:
                raise ApiError.bad_request(
                    f"{_where(path)}: map {json.dumps(item)} does not contain declared "
                    f"merge key: {merge_key}"
                )
            at = positions.get(_identity(item, merge_key))
            if at is None:
                positions[_identity(item, merge_key)] = len(merged)
                merged.append(_fresh(item, items, f"{path}[{i}]"))
            else:
                merged[at] = _merge_map(merged[at], item, items, f"{path}[{i}]")
    return _enforce_order(merged, patch, original, merge_key)


def _list_directives(
    original: list[Any], patch: list[Any], items: Mapping[str, Any] | None,
    merge_key: str | None, path: str,
) -> tuple[list[Any], list[Any]]:
    """Apply `{"$patch": ...}` elements; returns the remaining original and patch items."""
    remaining: list[Any] = []
    replace = False
    for item in patch:
        if not isinstance(item, Mapping) or _PATCH not in item:
            remaining.append(item)
            continue
        directive = item[_PATCH]
        if directive == "replace":
            replace = True
        elif directive == "delete":
            if not merge_key or merge_key not in item:
                raise ApiError.bad_request(
                    f"{_where(path)}: delete directive {json.dumps(item)} does not contain "
                    f"declared merge key: {merge_key or '(none)'}"
                )
            gone = _identity(item, merge_key)
            original = [o for o in original if _identity(o, merge_key) != gone]
        elif directive == "merge":
            raise ApiError.bad_request("merging lists cannot yet be specified in the patch")
        else:
            raise ApiError.bad_request(
                f"unknown patch type: {directive!r} in list {_where(path)}"
            )
    if replace:
        fresh = (_fresh(v, items, f"{path}[{i}]") for i, v in enumerate(remaining))
        return [v for v in fresh if v is not _DELETED], []
    return original, remaining


def _order_list(
    original: dict[str, Any], fields: Mapping[str, Any], name: str, order: Any,
    schema: Mapping[str, Any] | None, path: str,
) -> None:
    """`$setElementOrder/<name>`: merge the field's list, then order it as kube does."""
    if not isinstance(order, list):
        raise ApiError.bad_request(f"invalid patch format of setElementOrder list {path}")
    merge_key = _merge_key(schema)
    current = original.get(name)
    present = current if isinstance(current, list) else None
    listed = fields.get(name)
    if name in fields and not isinstance(listed, list):
        raise ApiError.bad_request(
            f"{path}: the value of a field with $setElementOrder must be a list"
        )
    _check_order(listed or [], order, merge_key, path)
    if listed is None and present is None:
        return
    live = present or []
    merged = live if listed is None else _merge_list(live, listed, schema, path)
    original[name] = _enforce_order(merged, order, live, merge_key)


def _check_order(patch: list[Any], order: list[Any], merge_key: str | None, path: str) -> None:
    """The patch's items must appear in $setElementOrder, in the same relative order."""
    if merge_key and any(isinstance(o, Mapping) and merge_key not in o for o in order):
        raise ApiError.bad_request(
            f"invalid patch format of setElementOrder list {path}: every item needs the "
            f"merge key {merge_key}"
        )
    wanted = [_identity(o, merge_key) for o in order]
    at = 0
    for item in patch:
        if isinstance(item, Mapping) and _PATCH in item:
            continue
        key = _identity(item, merge_key)
        while at < len(wanted) and wanted[at] != key:
            at += 1
        if at == len(wanted):
            raise ApiError.bad_request(
                f"the order in patch list {path} doesn't match its $setElementOrder list"
            )
        at += 1


def _enforce_order(
    merged: list[Any], order: list[Any], server_order: list[Any], merge_key: str | None
) -> list[Any]:
    """kube's normalizeElementOrder: items named in `order` take that order; the
    server-only items keep the live order and are interleaved where the live
    list had them, so a patch never shuffles what it did not mention."""
    wanted = _positions(order, merge_key)
    live = _positions(server_order, merge_key)
    patched = [m for m in merged if _identity(m, merge_key) in wanted]
    patched.sort(key=lambda m: wanted[_identity(m, merge_key)])
    server_only = [m for m in merged if _identity(m, merge_key) not in wanted]
    server_only.sort(key=lambda m: live.get(_identity(m, merge_key), len(live)))
    result: list[Any] = []
    i = j = 0
    while i < len(server_only) or j < len(patched):
        if j >= len(patched):
            take_left = True
        elif i >= len(server_only):
            take_left = False
        else:
            left = live.get(_identity(server_only[i], merge_key))
            right = live.get(_identity(patched[j], merge_key))
            take_left = left is not None and right is not None and left < right
        if take_left:
            result.append(server_only[i])
            i += 1
        else:
            result.append(patched[j])
            j += 1
    return result


def _retain_keys(
    original: dict[str, Any], retain: Any, fields: Mapping[str, Any], path: str
) -> None:
    if not isinstance(retain, list):
        raise ApiError.bad_request(f"invalid patch format of retainKeys in {_where(path)}")
    keep = {k for k in retain if isinstance(k, str)}
    for key, value in fields.items():
        if value is not None and key not in keep:
            raise ApiError.bad_request(
                f"invalid patch format of retainKeys: {_child(path, key)} is set by the "
                "patch but not listed in $retainKeys"
            )
    for key in [k for k in original if k not in keep]:
        del original[key]


def _delete_from_primitive_list(
    original: dict[str, Any], name: str, values: Any, path: str
) -> None:
    current = original.get(name)
    if not isinstance(values, list):
        raise ApiError.bad_request(f"invalid patch format of primitive list {path}")
    if not isinstance(current, list):
        return  # nothing to delete from, as in kube
    if _element_kind([*current, *values], path) != "scalar":
        raise ApiError.bad_request(
            f"invalid patch format of primitive list {path}: "
            "$deleteFromPrimitiveList applies to lists of strings, numbers or booleans"
        )
    gone = {_identity(v, None) for v in values}
    original[name] = [v for v in current if _identity(v, None) not in gone]


def _element_kind(values: Iterable[Any], path: str) -> str:
    kinds = {
        "map" if isinstance(v, Mapping) else "list" if isinstance(v, list) else "scalar"
        for v in values
    }
    if "list" in kinds:
        raise ApiError(422, "Invalid", f"lists of lists are not supported: {_where(path)}")
    if len(kinds) > 1:
        raise ApiError.bad_request(f"list element types are not identical in {_where(path)}")
    return kinds.pop() if kinds else "scalar"


def _dedupe(values: list[Any]) -> list[Any]:
    seen: set[tuple[str, Any]] = set()
    unique: list[Any] = []
    for v in values:
        key = _identity(v, None)
        if key not in seen:
            seen.add(key)
            unique.append(v)
    return unique


def _identity(item: Any, merge_key: str | None) -> tuple[str, Any]:
    """What two list items are compared by: the merge key's value for maps of a keyed
    list, the item itself otherwise. Hashable, and `true` never equals `1` (as in JSON)."""
    value = item.get(merge_key) if merge_key and isinstance(item, Mapping) else item
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", value)
    if isinstance(value, str):
        return ("string", value)
    return ("json", json.dumps(value, sort_keys=True))


def _positions(items: list[Any], merge_key: str | None) -> dict[tuple[str, Any], int]:
    positions: dict[tuple[str, Any], int] = {}
    for i, item in enumerate(items):
        positions.setdefault(_identity(item, merge_key), i)
    return positions


def _own(value: Any) -> Any:
    """A deep copy made of plain dicts and lists, safe to change in place."""
    if isinstance(value, Mapping):
        return {k: _own(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_own(v) for v in value]
    return value


# -- schema lookups: OpenAPI v3 structural schema nodes with kube's patch extensions


def _field_schema(schema: Mapping[str, Any] | None, key: str) -> Mapping[str, Any] | None:
    if schema is None:
        return None
    properties = schema.get("properties")
    if isinstance(properties, Mapping) and key in properties:
        return schema_node(properties[key])
    return schema_node(schema.get("additionalProperties"))


def _strategies(schema: Mapping[str, Any] | None) -> frozenset[str]:
    raw = schema.get("x-kubernetes-patch-strategy") if schema is not None else None
    if not isinstance(raw, str):
        return frozenset()
    return frozenset(part.strip() for part in raw.split(","))


def _merge_key(schema: Mapping[str, Any] | None) -> str | None:
    key = schema.get("x-kubernetes-patch-merge-key") if schema is not None else None
    return key if isinstance(key, str) and key else None


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _where(path: str) -> str:
    return path or "the patch's top level"
