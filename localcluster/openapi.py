"""The /openapi/v3 discovery documents kubectl reads before create, apply and explain.

kubectl asks the index (`openapi_index`) for one document per group-version
(`openapi_document`). From a document it needs, for each kind, a ``patch``
operation tagged with ``x-kubernetes-group-version-kind`` that takes a
``fieldValidation`` query parameter (then it leaves validation to the server),
the patch content types (strategic merge only for built-in kinds), and a
component schema tagged with the kind's group-version-kind, whose
``x-kubernetes-patch-*`` extensions drive client-side ``apply``. The shape
follows kube-apiserver's own v3 documents; descriptions and the watch,
proxy and most subresource paths are left out.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from localcluster.resources import ResourceType
from localcluster.schema import builtin_schema

_META = "io.k8s.apimachinery.pkg.apis.meta.v1"
STATUS_SCHEMA = f"{_META}.Status"
PATCH_SCHEMA = f"{_META}.Patch"
DELETE_OPTIONS_SCHEMA = f"{_META}.DeleteOptions"
SCALE_SCHEMA = "io.k8s.api.autoscaling.v1.Scale"
_SCALE_GVK = {"group": "autoscaling", "version": "v1", "kind": "Scale"}

_PATCH_TYPES_CUSTOM = ("application/apply-patch+yaml", "application/json-patch+json",
                       "application/merge-patch+json")
_PATCH_TYPES_BUILTIN = (*_PATCH_TYPES_CUSTOM, "application/strategic-merge-patch+json")
_RESPONSE_TYPES = ("application/json", "application/yaml")


def openapi_path(group_version: str) -> str:
    """The index key of a group-version: ``api/v1``, ``apis/discovery.k8s.io/v1``."""
    return "api/v1" if group_version == "v1" else f"apis/{group_version}"


def group_version_of(path: str) -> str | None:
    """The group-version an index key (or ``/openapi/v3/...`` URL path) names, or None."""
    path = path.strip("/").removeprefix("openapi/v3/")
    if path == "api/v1":
        return "v1"
    parts = path.split("/")
    if len(parts) == 3 and parts[0] == "apis" and parts[1] and parts[2]:
        return f"{parts[1]}/{parts[2]}"
    return None


def openapi_index(group_versions: Iterable[str], hashes: Mapping[str, str]) -> dict[str, Any]:
    """The ``/openapi/v3`` index; `hashes` maps a group-version to its `document_hash`."""
    paths: dict[str, Any] = {}
    for group_version in group_versions:
        key = openapi_path(group_version)
        url = f"/openapi/v3/{key}"
        digest = hashes.get(group_version)
        paths[key] = {"serverRelativeURL": f"{url}?hash={digest}" if digest else url}
    return {"paths": paths}


def document_hash(doc: Mapping[str, Any]) -> str:
    """A stable digest of a document (SHA-512 of its canonical JSON, upper-case hex like kube)."""
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha512(canonical.encode()).hexdigest().upper()


def schema_name(resource: ResourceType) -> str:
    """The component key of a kind, as kube names it.

    ``io.k8s.api.core.v1.Service`` for built-ins, the reversed group for
    custom resources: ``io.meshgate.multicluster.v1alpha1.Link``.
    """
    if resource.model is None:
        prefix = ".".join(reversed(resource.group.split(".")))
    elif not resource.group:
        prefix = "io.k8s.api.core"
    elif resource.group == "apiextensions.k8s.io":
        prefix = "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions"
    else:
        prefix = f"io.k8s.api.{resource.group.split('.')[0]}"
    return f"{prefix}.{resource.version}.{resource.kind}"


def openapi_document(group_version: str, resources: Sequence[ResourceType]) -> dict[str, Any]:
    """The OpenAPI 3.0 document of one group-version (resources of others are ignored)."""
    served = [r for r in resources if r.group_version == group_version]
    schemas: dict[str, Any] = {
        STATUS_SCHEMA: _with_gvk(builtin_schema("V1Status"), "", "v1", "Status"),
        PATCH_SCHEMA: {
            "description": "Patch is provided to give a concrete name and type to the "
                           "Kubernetes PATCH request body.",
            "type": "object",
        },
        DELETE_OPTIONS_SCHEMA: builtin_schema("V1DeleteOptions"),
    }
    paths: dict[str, Any] = {}
    for resource in served:
        name = schema_name(resource)
        schemas[name] = _kind_schema(resource)
        if "list" in resource.verbs:
            schemas[f"{name}List"] = _list_schema(resource, name)
        paths.update(_paths(resource, name))
        if resource.scale_subresource:
            schemas[SCALE_SCHEMA] = _with_gvk(builtin_schema("V1Scale"), **_SCALE_GVK)
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "unversioned"},
        "paths": paths,
        "components": {"schemas": schemas},
    }


# ---------------------------------------------------------------- schemas


def _gvk(resource: ResourceType, kind: str | None = None) -> dict[str, str]:
    return {"group": resource.group, "version": resource.version, "kind": kind or resource.kind}


def _with_gvk(schema: Mapping[str, Any], group: str, version: str, kind: str) -> dict[str, Any]:
    out = dict(schema)  # builtin schemas are shared: copy the top level only
    out["x-kubernetes-group-version-kind"] = [{"group": group, "version": version, "kind": kind}]
    return out


_API_VERSION = {
    "description": "APIVersion defines the versioned schema of this representation of an object.",
    "type": "string",
}
_KIND = {
    "description": "Kind is a string value representing the REST resource this object "
                   "represents.",
    "type": "string",
}


def _kind_schema(resource: ResourceType) -> dict[str, Any]:
    if resource.model is not None:
        schema: Mapping[str, Any] = builtin_schema(resource.model)
    else:
        declared = resource.schema or {"type": "object"}
        properties = dict(declared.get("properties") or {})
        meta = builtin_schema("V1ObjectMeta")
        narrowed = properties.get("metadata")
        if isinstance(narrowed, Mapping) and isinstance(narrowed.get("properties"), Mapping):
            meta = {**meta, "properties": {**meta["properties"], **narrowed["properties"]}}
        properties = {"apiVersion": _API_VERSION, "kind": _KIND, **properties, "metadata": meta}
        schema = {**declared, "properties": properties}
    return _with_gvk(schema, resource.group, resource.version, resource.kind)


def _list_schema(resource: ResourceType, item_name: str) -> dict[str, Any]:
    return _with_gvk({
        "description": f"{resource.list_kind} is a list of {resource.kind}",
        "type": "object",
        "required": ["items"],
        "properties": {
            "apiVersion": _API_VERSION,
            "items": {"type": "array", "items": _ref(item_name)},
            "kind": _KIND,
            "metadata": builtin_schema("V1ListMeta"),
        },
    }, resource.group, resource.version, resource.list_kind)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


# ---------------------------------------------------------------- paths


def _query(name: str, description: str, kind: str = "string") -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description,
            "schema": {"type": kind, "uniqueItems": True}}


_DRY_RUN = _query("dryRun", "When present, indicates that modifications should not be "
                  "persisted. Valid values are: - All: all dry run stages will be processed")
_FIELD_MANAGER = _query("fieldManager", "fieldManager is a name associated with the actor or "
                        "entity that is making these changes.")
_FIELD_VALIDATION = _query(
    "fieldValidation",
    "fieldValidation instructs the server on how to handle objects in the request "
    "(POST/PUT/PATCH) containing unknown or duplicate fields. Valid values are: - Ignore - Warn "
    "(the default) - Strict",
)
_FORCE = _query("force", "Force is going to \"force\" Apply requests.", "boolean")
_PRETTY = _query("pretty", "If 'true', then the output is pretty printed.")
_LIST_PARAMS = [
    _query("allowWatchBookmarks", "requests watch events with type \"BOOKMARK\".", "boolean"),
    _query("continue", "The continue option should be set when retrieving more results."),
    _query("fieldSelector", "A selector to restrict the list of returned objects by their "
           "fields."),
    _query("labelSelector", "A selector to restrict the list of returned objects by their "
           "labels."),
    _query("limit", "limit is a maximum number of responses to return for a list call.",
           "integer"),
    _query("resourceVersion", "resourceVersion sets a constraint on what resource versions a "
           "request may be served from."),
    _query("resourceVersionMatch", "resourceVersionMatch determines how resourceVersion is "
           "applied to list calls."),
    _query("sendInitialEvents", "`sendInitialEvents=true` may be set together with "
           "`watch=true`.", "boolean"),
    _query("timeoutSeconds", "Timeout for the list/watch call.", "integer"),
    _query("watch", "Watch for changes to the described resources.", "boolean"),
]
_DELETE_PARAMS = [
    _DRY_RUN,
    _query("gracePeriodSeconds", "The duration in seconds before the object should be deleted.",
           "integer"),
    _query("propagationPolicy", "Whether and how garbage collection will be performed."),
]


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string", "uniqueItems": True}}


def _content(schema: Mapping[str, Any], types: Iterable[str] = _RESPONSE_TYPES) -> dict[str, Any]:
    return {content_type: {"schema": dict(schema)} for content_type in types}


def _responses(schema: Mapping[str, Any], *codes: str) -> dict[str, Any]:
    described = {"200": "OK", "201": "Created", "202": "Accepted"}
    out: dict[str, Any] = {code: {"description": described[code], "content": _content(schema)}
                           for code in codes}
    out["401"] = {"description": "Unauthorized"}
    return out


def _operation_prefix(resource: ResourceType) -> str:
    """kube's operationId infix and tag: ``CoreV1``/``core_v1``, ``RbacAuthorizationV1``."""
    group = resource.group.removesuffix(".k8s.io") if resource.model else resource.group
    words = [w for w in re.split(r"[.\-]", group or "core") if w]
    return "".join(w[:1].upper() + w[1:] for w in words) + resource.version.capitalize()


def _tag(resource: ResourceType) -> str:
    prefix = _operation_prefix(resource)
    head = prefix.removesuffix(resource.version.capitalize())
    return f"{head[:1].lower()}{head[1:]}_{resource.version}"


def _operation(
    resource: ResourceType, action: str, operation_id: str, *, kind: str | None = None,
    parameters: Sequence[Mapping[str, Any]] = (), body: Mapping[str, Any] | None = None,
    responses: Mapping[str, Any],
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "tags": [_tag(resource)],
        "description": f"{action} {kind or resource.kind}",
        "operationId": operation_id,
    }
    if parameters:
        op["parameters"] = [dict(p) for p in parameters]
    if body is not None:
        op["requestBody"] = dict(body)
    op["responses"] = dict(responses)
    op["x-kubernetes-action"] = action
    op["x-kubernetes-group-version-kind"] = _gvk(resource)
    return op


def _paths(resource: ResourceType, name: str) -> dict[str, Any]:
    root = f"/apis/{resource.group}/{resource.version}" if resource.group else "/api/v1"
    scope = "Namespaced" if resource.namespaced else ""
    stem = f"{_operation_prefix(resource)}{scope}{resource.kind}"
    namespace = _path_param("namespace", "object name and auth scope, such as for teams and "
                            "projects")
    collection = f"{root}/namespaces/{{namespace}}/{resource.plural}" if resource.namespaced \
        else f"{root}/{resource.plural}"
    scope_params = [namespace] if resource.namespaced else []
    item_params = [_path_param("name", f"name of the {resource.kind}"), *scope_params]
    kind_schema, list_schema = _ref(name), _ref(f"{name}List")
    verbs = set(resource.verbs)
    paths: dict[str, Any] = {}

    ops: dict[str, Any] = {}
    if "list" in verbs:
        ops["get"] = _operation(resource, "list", f"list{stem}", parameters=_LIST_PARAMS,
                                responses=_responses(list_schema, "200"))
    if "create" in verbs:
        ops["post"] = _operation(
            resource, "post", f"create{stem}",
            parameters=[_DRY_RUN, _FIELD_MANAGER, _FIELD_VALIDATION],
            body={"content": {"*/*": {"schema": kind_schema}}, "required": True},
            responses=_responses(kind_schema, "200", "201", "202"))
    if "deletecollection" in verbs:
        ops["delete"] = _operation(
            resource, "deletecollection", f"delete{_operation_prefix(resource)}Collection"
            f"{scope}{resource.kind}", parameters=[*_DELETE_PARAMS, *_LIST_PARAMS],
            body={"content": {"*/*": {"schema": _ref(DELETE_OPTIONS_SCHEMA)}}},
            responses=_responses(_ref(STATUS_SCHEMA), "200"))
    if ops:
        paths[collection] = {**ops, "parameters": [*scope_params, _PRETTY]}

    item = _item_operations(resource, stem, kind_schema, verbs)
    if item:
        paths[f"{collection}/{{name}}"] = {**item, "parameters": [*item_params, _PRETTY]}
    if resource.status_subresource:
        status = _item_operations(resource, f"{stem}Status", kind_schema,
                                  verbs & {"get", "update", "patch"})
        paths[f"{collection}/{{name}}/status"] = {**status,
                                                  "parameters": [*item_params, _PRETTY]}
    if resource.scale_subresource:
        scale = _item_operations(resource, f"{stem}Scale", _ref(SCALE_SCHEMA),
                                 verbs & {"get", "update", "patch"})
        for op in scale.values():
            op["x-kubernetes-group-version-kind"] = dict(_SCALE_GVK)
        paths[f"{collection}/{{name}}/scale"] = {**scale, "parameters": [*item_params, _PRETTY]}
    if resource.namespaced and "list" in verbs:
        every = f"{root}/{resource.plural}"
        paths[every] = {
            "get": _operation(resource, "list",
                              f"list{_operation_prefix(resource)}{resource.kind}ForAllNamespaces",
                              parameters=_LIST_PARAMS, responses=_responses(list_schema, "200")),
            "parameters": [_PRETTY],
        }
    return paths


def _item_operations(
    resource: ResourceType, stem: str, kind_schema: Mapping[str, Any], verbs: set[str]
) -> dict[str, Any]:
    patch_types = _PATCH_TYPES_BUILTIN if resource.model else _PATCH_TYPES_CUSTOM
    ops: dict[str, Any] = {}
    if "get" in verbs:
        ops["get"] = _operation(resource, "get", f"read{stem}",
                                responses=_responses(kind_schema, "200"))
    if "update" in verbs:
        ops["put"] = _operation(
            resource, "put", f"replace{stem}",
            parameters=[_DRY_RUN, _FIELD_MANAGER, _FIELD_VALIDATION],
            body={"content": {"*/*": {"schema": kind_schema}}, "required": True},
            responses=_responses(kind_schema, "200", "201"))
    if "delete" in verbs:
        ops["delete"] = _operation(
            resource, "delete", f"delete{stem}", parameters=_DELETE_PARAMS,
            body={"content": {"*/*": {"schema": _ref(DELETE_OPTIONS_SCHEMA)}}},
            responses=_responses(_ref(STATUS_SCHEMA), "200", "202"))
    if "patch" in verbs:
        ops["patch"] = _operation(
            resource, "patch", f"patch{stem}",
            parameters=[_DRY_RUN, _FIELD_MANAGER, _FIELD_VALIDATION, _FORCE],
            body={"content": _content(_ref(PATCH_SCHEMA), patch_types), "required": True},
            responses=_responses(kind_schema, "200", "201"))
    return ops


__all__ = ["DELETE_OPTIONS_SCHEMA", "PATCH_SCHEMA", "STATUS_SCHEMA", "document_hash",
           "group_version_of", "openapi_document", "openapi_index", "openapi_path",
           "schema_name"]
