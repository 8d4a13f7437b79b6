"""Field sets of objects, as sigs.k8s.io/structured-merge-diff computes them.

A path is a tuple of path elements; an element is a `PE`: a field name (``f:``),
the key of an item of an associative list (``k:``), a value of a set (``v:``) or
an index (``i:``). What kind of node a value is — struct, map, list and how its
items are identified, or a leaf — comes from the OpenAPI v3 structural schema
of the kind (``properties`` make a struct, ``additionalProperties`` a map,
``x-kubernetes-list-type``/``x-kubernetes-list-map-keys`` or, failing those,
``x-kubernetes-patch-strategy: merge``/``x-kubernetes-patch-merge-key`` make a
list associative, any other list is atomic), and from the value itself where
the schema says nothing (maps are granular, lists atomic), as structured-merge-
diff does for untyped fields.

Pure functions over JSON values:

* `field_set` — the paths an applied configuration sets (``ToFieldSet``);
* `compare` — what was added, modified and removed between two objects;
* `merge` — the configuration merged into the live object (``Merge``);
* `remove` — the object without the given items;
* `encode`/`decode` — ``fieldsV1`` of ``metadata.managedFields``;
* `path_text` — a path as structured-merge-diff prints it (``.spec.ports[port=80,protocol="TCP"]``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

Path = tuple["PE", ...]


class PE(NamedTuple):
    """One path element: ``kind`` is ``f``, ``k``, ``v`` or ``i``; ``text`` what follows
    the colon in ``fieldsV1`` (a name, compact JSON or an index)."""

    kind: str
    text: str

    def __str__(self) -> str:
        if self.kind == "f":
            return "." + self.text
        if self.kind == "k":
            fields = json.loads(self.text)
            return "[" + ",".join(f"{k}={_show(v)}" for k, v in fields.items()) + "]"
        if self.kind == "v":
            return f"[={_show(json.loads(self.text))}]"
        return f"[{self.text}]"


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else _compact(value)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def path_text(path: Path) -> str:
    return "".join(str(pe) for pe in path)


def fld(name: str) -> PE:
    return PE("f", name)


# ---------------------------------------------------------------- schema nodes

STRUCT, MAP, LIST, LEAF = "struct", "map", "list", "leaf"


@dataclass(frozen=True)
class Node:
    """What a schema says of one value: its shape and how its children are found."""

    shape: str
    atomic: bool = False
    schema: Mapping[str, Any] | None = None
    keys: tuple[str, ...] = ()
    """For a list: the item fields that identify an item; () with `is_set` for a set."""
    is_set: bool = False
    key_defaults: Mapping[str, Any] = field(default_factory=dict)


def schema_node(schema: Any) -> Mapping[str, Any] | None:
    """A schema node with a single-level ``allOf`` (how OpenAPI v3 wraps ``$ref``) folded in."""
    if not isinstance(schema, Mapping):
        return None
    parts = schema.get("allOf")
    if not isinstance(parts, list):
        return schema
    folded: dict[str, Any] = {}
    for part in parts:
        resolved = schema_node(part)
        if resolved is not None:
            folded.update(resolved)
    folded.update((k, v) for k, v in schema.items() if k != "allOf")
    return folded


def node_of(schema: Mapping[str, Any] | None, value: Any) -> Node:
    """The node for `value` under `schema` (None: untyped, deduced from the value)."""
    s = schema_node(schema)
    if s is None or not _typed(s):
        if isinstance(value, Mapping):
            return Node(MAP, schema=None)
        return Node(LEAF, atomic=True)
    if isinstance(s.get("properties"), Mapping) and s["properties"]:
        return Node(STRUCT, atomic=s.get("x-kubernetes-map-type") == "atomic", schema=s)
    if s.get("type") == "array":
        return _list_node(s)
    if s.get("type") == "object" or isinstance(s.get("additionalProperties"), Mapping):
        if s.get("x-kubernetes-map-type") == "atomic":
            return Node(LEAF, atomic=True)
        return Node(MAP, schema=s)
    return Node(LEAF)


def _typed(s: Mapping[str, Any]) -> bool:
    if s.get("x-kubernetes-int-or-string") or "oneOf" in s or "anyOf" in s:
        return True
    if s.get("x-kubernetes-preserve-unknown-fields") and not s.get("properties") and not \
            isinstance(s.get("additionalProperties"), Mapping):
        return False
    return bool(s.get("type") or s.get("properties") or s.get("additionalProperties"))


def _list_node(s: Mapping[str, Any]) -> Node:
    items = schema_node(s.get("items"))
    list_type = s.get("x-kubernetes-list-type")
    keys: tuple[str, ...] = ()
    builtin_defaults: Mapping[str, Any] = {}
    if list_type == "map":
        keys = tuple(s.get("x-kubernetes-list-map-keys") or ())
    elif list_type is None:
        strategy = str(s.get("x-kubernetes-patch-strategy") or "")
        if "merge" in strategy.split(","):
            merge_key = s.get("x-kubernetes-patch-merge-key")
            keys = tuple(LIST_MAP_KEYS.get(merge_key, (merge_key,))) if merge_key else ()
            list_type = "map" if keys else "set"
            builtin_defaults = KEY_DEFAULTS
    if list_type == "set":
        return Node(LIST, schema=items, is_set=True)
    if list_type == "map" and keys:
        props = (items or {}).get("properties") or {}
        defaults = {k: (props.get(k) or {}).get("default", builtin_defaults.get(k))
                    for k in keys}
        return Node(LIST, schema=items, keys=keys,
                    key_defaults={k: v for k, v in defaults.items() if v is not None})
    return Node(LEAF, atomic=True)


# Built-in lists whose ``+listMapKey`` tags name more keys than the patch merge key.
LIST_MAP_KEYS: dict[str, tuple[str, ...]] = {
    "containerPort": ("containerPort", "protocol"),
    "port": ("port", "protocol"),
    "topologyKey": ("topologyKey", "whenUnsatisfiable"),
}
# Defaults kube's built-in schemas give key fields (``protocol: TCP``).
KEY_DEFAULTS: dict[str, Any] = {"protocol": "TCP"}


def child_schema(node: Node, name: str) -> Mapping[str, Any] | None:
    if node.schema is None:
        return None
    props = node.schema.get("properties")
    if isinstance(props, Mapping) and name in props:
        return schema_node(props[name])
    extra = node.schema.get("additionalProperties")
    return schema_node(extra) if isinstance(extra, Mapping) else None


def is_declared(node: Node, name: str) -> bool:
    props = node.schema.get("properties") if node.schema is not None else None
    return node.shape == STRUCT and isinstance(props, Mapping) and name in props


def item_element(node: Node, item: Any, index: int) -> PE:
    """The path element naming a list item: by its keys, as a set value, or by index."""
    if node.keys:
        if not isinstance(item, Mapping):
            raise FieldPathError(f"associative list with keys has an element that is not a "
                                 f"map: {_compact(item)}")
        fields: dict[str, Any] = {}
        for k in sorted(node.keys):
            if k in item:
                fields[k] = item[k]
            elif k in node.key_defaults:
                fields[k] = node.key_defaults[k]
            # a key field left out is left out of the key: another item, as in kube
        if not fields:
            listed = "[" + " ".join(json.dumps(k) for k in node.keys) + "]"
            raise FieldPathError(f"associative list with keys has an element that omits all "
                                 f"key fields {listed} (and doesn't have default values for "
                                 "any key fields)")
        return PE("k", _compact(fields))
    if node.is_set:
        return PE("v", _compact(item))
    return PE("i", str(index))


class FieldPathError(ValueError):
    """An object that cannot be described by field paths (a list item without its key)."""


def _children(node: Node, value: Any) -> list[tuple[PE, Any, Mapping[str, Any] | None]]:
    if node.shape in (STRUCT, MAP) and isinstance(value, Mapping):
        return [(fld(k), v, child_schema(node, k)) for k, v in value.items()]
    if node.shape == LIST and isinstance(value, list):
        out: list[tuple[PE, Any, Mapping[str, Any] | None]] = []
        seen: set[PE] = set()
        for i, item in enumerate(value):
            pe = item_element(node, item, i)
            if pe in seen:
                raise FieldPathError(f"duplicate entries for key {pe}")
            seen.add(pe)
            out.append((pe, item, node.schema))
        return out
    return []


def _granular(node: Node, value: Any) -> bool:
    """Whether `value` is walked into (rather than owned as one leaf)."""
    if node.atomic or node.shape == LEAF:
        return False
    if node.shape == LIST:
        return isinstance(value, list)
    return isinstance(value, Mapping)


# ---------------------------------------------------------------- field sets


def field_set(obj: Any, schema: Mapping[str, Any] | None) -> set[Path]:
    """The paths `obj` sets: leaves, list items, map entries, and null or empty maps."""
    out: set[Path] = set()
    _collect(obj, node_of(schema, obj), (), out)
    return out


def _collect(value: Any, node: Node, path: Path, out: set[Path]) -> None:
    if not _granular(node, value):
        out.add(path)
        return
    for pe, child, sub in _children(node, value):
        cnode = node_of(sub, child)
        cpath = (*path, pe)
        _collect(child, cnode, cpath, out)
        if node.shape == LIST or child is None or child == {} or not is_declared(node, pe.text):
            out.add(cpath)


@dataclass
class Comparison:
    added: set[Path] = field(default_factory=set)
    modified: set[Path] = field(default_factory=set)
    removed: set[Path] = field(default_factory=set)


def compare(old: Any, new: Any, schema: Mapping[str, Any] | None) -> Comparison:
    """What changed from `old` to `new` (both whole objects)."""
    out = Comparison()
    _compare(old, new, schema, (), out)
    return out


_MISSING: Any = object()


def _compare(lhs: Any, rhs: Any, schema: Mapping[str, Any] | None, path: Path,
             out: Comparison) -> None:
    node = node_of(schema, rhs if rhs is not _MISSING else lhs)
    both_granular = all(v is _MISSING or _granular(node, v) for v in (lhs, rhs))
    if not both_granular:
        if lhs is _MISSING:
            out.added.add(path)
        elif rhs is _MISSING:
            out.removed.add(path)
        elif lhs != rhs or type(lhs) is not type(rhs):
            out.modified.add(path)
        return
    left = dict((pe, (v, s)) for pe, v, s in _children(node, lhs)) if lhs is not _MISSING else {}
    right = dict((pe, (v, s)) for pe, v, s in _children(node, rhs)) if rhs is not _MISSING \
        else {}
    for pe in left.keys() | right.keys():
        lv, ls = left.get(pe, (_MISSING, None))
        rv, rs = right.get(pe, (_MISSING, None))
        _compare(lv, rv, rs if rv is not _MISSING else ls, (*path, pe), out)
    if lhs is _MISSING:
        out.added.add(path)
    elif rhs is _MISSING:
        out.removed.add(path)


# ---------------------------------------------------------------- merge and removal


def merge(live: Any, config: Any, schema: Mapping[str, Any] | None) -> Any:
    """`config` merged into `live`: config's leaves win, granular nodes merge item by item."""
    node = node_of(schema, config)
    if not (_granular(node, live) and _granular(node, config)):
        return config
    if node.shape == LIST:
        return _merge_list(live, config, node)
    merged = dict(live)
    for key, value in config.items():
        sub = child_schema(node, key)
        if value is None:
            merged.pop(key, None)
        elif key in merged:
            merged[key] = merge(merged[key], value, sub)
        else:
            merged[key] = value
    return merged


def _merge_list(live: list[Any], config: list[Any], node: Node) -> list[Any]:
    """structured-merge-diff's list merge: items in both follow the config's order, items
    only live stay where they were, the config's new items come where it has them."""
    lhs = [(item_element(node, v, i), v) for i, v in enumerate(live)]
    rhs = [(item_element(node, v, i), v) for i, v in enumerate(config)]
    left, right = dict(lhs), dict(rhs)
    shared = iter([pe for pe, _ in rhs if pe in left])
    next_shared = next(shared, None)
    merged: set[PE] = set()
    out: list[Any] = []
    li = ri = 0
    while li < len(lhs) or ri < len(rhs):
        if li < len(lhs) and ri < len(rhs):
            pe = lhs[li][0]
            if pe == rhs[ri][0]:
                merged.add(pe)
                out.append(merge(left[pe], right[pe], node.schema))
                li, ri = li + 1, ri + 1
                next_shared = next(shared, None)
                continue
            if pe in right and next_shared is not None and next_shared != pe:
                li += 1  # shared, but its turn comes later
                continue
        if li < len(lhs):
            pe = lhs[li][0]
            if pe not in right:
                out.append(lhs[li][1])
                li += 1
                continue
            if pe in merged:
                li += 1
        if ri < len(rhs):
            pe = rhs[ri][0]
            merged.add(pe)
            out.append(merge(left[pe], right[pe], node.schema) if pe in left else right[pe])
            ri += 1
            if next_shared is not None and next_shared == pe:
                next_shared = next(shared, None)
    return out


def remove(obj: Any, paths: set[Path], schema: Mapping[str, Any] | None) -> Any:
    """`obj` without the items at `paths` (each with everything under it)."""
    if not paths:
        return obj
    prefixes = {p[:i] for p in paths for i in range(1, len(p) + 1)}
    return _remove(obj, node_of(schema, obj), (), paths, prefixes)


def _remove(value: Any, node: Node, path: Path, paths: set[Path], prefixes: set[Path]) -> Any:
    if not _granular(node, value):
        return value
    kept: list[tuple[PE, Any]] = []
    for pe, child, sub in _children(node, value):
        cpath = (*path, pe)
        if cpath in paths:
            continue
        if cpath in prefixes:
            child = _remove(child, node_of(sub, child), cpath, paths, prefixes)
        kept.append((pe, child))
    if node.shape == LIST:
        return [v for _, v in kept]
    return {pe.text: v for pe, v in kept}


def struct_prefixes(obj: Any, schema: Mapping[str, Any] | None, paths: Iterable[Path]
                    ) -> set[Path]:
    """The declared struct fields on the way to `paths` in `obj` (structured-merge-diff's
    EnsureNamedFieldsAreMembers): a struct field is kept while anything under it is owned."""
    wanted = {p[:i] for p in paths for i in range(1, len(p))}
    out: set[Path] = set()
    _struct_walk(obj, node_of(schema, obj), (), wanted, out)
    return out


def _struct_walk(value: Any, node: Node, path: Path, wanted: set[Path], out: set[Path]) -> None:
    if not _granular(node, value):
        return
    for pe, child, sub in _children(node, value):
        cpath = (*path, pe)
        if cpath in wanted:
            if node.shape == STRUCT and is_declared(node, pe.text):
                out.add(cpath)
            _struct_walk(child, node_of(sub, child), cpath, wanted, out)


# ---------------------------------------------------------------- fieldsV1


def encode(paths: Iterable[Path]) -> dict[str, Any]:
    """``fieldsV1``: a tree keyed ``f:``/``k:``/``v:``/``i:``; ``.`` marks a member that
    also has children."""
    root: dict[str, Any] = {}
    members: set[Path] = set(paths)
    for path in sorted(members, key=_sort_key):
        at = root
        for pe in path:
            at = at.setdefault(f"{pe.kind}:{pe.text}", {})
    _mark(root, (), members)
    return root


def _mark(tree: dict[str, Any], path: Path, members: set[Path]) -> None:
    for key, sub in tree.items():
        if key == ".":
            continue
        kind, _, text = key.partition(":")
        cpath = (*path, PE(kind, text))
        if sub and cpath in members:
            sub["."] = {}
        if sub:
            _mark(sub, cpath, members)
    ordered = dict(sorted(tree.items(), key=lambda kv: (kv[0] != ".", kv[0])))
    tree.clear()
    tree.update(ordered)


def decode(fields: Any) -> set[Path]:
    """The paths of a ``fieldsV1`` tree; ValueError for one that is not."""
    if not isinstance(fields, Mapping):
        raise ValueError("fieldsV1 must be an object")
    out: set[Path] = set()
    _decode(fields, (), out)
    return out


def _decode(tree: Mapping[str, Any], path: Path, out: set[Path]) -> None:
    for key, sub in tree.items():
        if key == ".":
            out.add(path)
            continue
        kind, sep, text = key.partition(":")
        if not sep or kind not in ("f", "k", "v", "i") or not isinstance(sub, Mapping):
            raise ValueError(f"invalid fieldsV1 key {key!r}")
        if kind in ("k", "v"):
            text = _compact(json.loads(text))
        cpath = (*path, PE(kind, text))
        if sub:
            _decode(sub, cpath, out)
        else:
            out.add(cpath)


def _sort_key(path: Path) -> tuple[tuple[str, str], ...]:
    order = {"f": "0", "k": "1", "v": "2", "i": "3"}
    return tuple((order[pe.kind], pe.text) for pe in path)


def sorted_paths(paths: Iterable[Path]) -> list[Path]:
    return sorted(paths, key=_sort_key)
