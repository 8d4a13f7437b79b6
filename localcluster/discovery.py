"""Discovery documents: /version, /api, /apis, the per-group-version resource
lists and the OpenAPI v3 documents kubectl reads before create and apply."""

from __future__ import annotations

import functools
from typing import Any

from localcluster import openapi, openapiv2
from localcluster.catalog import Catalog
from localcluster.resources import ResourceType

KUBE_VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.0-meshgate",
                "gitCommit": "meshgate", "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23",
                "compiler": "gc", "platform": "linux/amd64"}


def api_versions(server_address: str) -> dict[str, Any]:
    return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
        {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]}


def _group(name: str, versions: list[str]) -> dict[str, Any]:
    vs = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": vs, "preferredVersion": vs[0]}


def api_group_list(catalog: Catalog) -> dict[str, Any]:
    return {"kind": "APIGroupList", "apiVersion": "v1",
            "groups": [_group(g, vs) for g, vs in sorted(catalog.groups().items())]}


def api_group(catalog: Catalog, group: str) -> dict[str, Any] | None:
    versions = catalog.groups().get(group)
    if not versions:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(group, versions)}


def _resource_entries(rt: ResourceType) -> list[dict[str, Any]]:
    entry: dict[str, Any] = {
        "name": rt.plural, "singularName": rt.singular_name, "namespaced": rt.namespaced,
        "kind": rt.kind, "verbs": list(rt.verbs),
    }
    if rt.short_names:
        entry["shortNames"] = list(rt.short_names)
    if rt.categories:
        entry["categories"] = list(rt.categories)
    out = [entry]
    if rt.status_subresource:
        out.append({"name": f"{rt.plural}/status", "singularName": "", "namespaced": rt.namespaced,
                    "kind": rt.kind, "verbs": ["get", "patch", "update"]})
    if rt.scale_subresource:
        out.append({"name": f"{rt.plural}/scale", "singularName": "", "namespaced": rt.namespaced,
                    "group": "autoscaling", "version": "v1", "kind": "Scale",
                    "verbs": ["get", "patch", "update"]})
    if rt.key == ("", "serviceaccounts"):
        out.append({"name": "serviceaccounts/token", "singularName": "", "namespaced": True,
                    "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest",
                    "verbs": ["create"]})
    return out


def api_resource_list(catalog: Catalog, group_version: str) -> dict[str, Any] | None:
    types = catalog.group_versions().get(group_version)
    if not types:
        return None
    resources = [e for rt in types for e in _resource_entries(rt)]
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": resources}


def _url_path(group_version: str) -> str:
    return f"api/{group_version}" if "/" not in group_version else f"apis/{group_version}"


@functools.lru_cache(maxsize=256)
def _document(group_version: str, types: tuple[ResourceType, ...]) -> tuple[dict[str, Any], str]:
    doc = openapi.openapi_document(group_version, list(types))
    return doc, openapi.document_hash(doc)


def openapi_v3_index(catalog: Catalog) -> dict[str, Any]:
    hashes = {}
    for gv, types in catalog.group_versions().items():
        hashes[gv] = _document(gv, tuple(types))[1]
    return openapi.openapi_index(list(hashes), hashes)


def openapi_v3_document(catalog: Catalog, url_path: str) -> dict[str, Any] | None:
    for gv, types in catalog.group_versions().items():
        if _url_path(gv) == url_path:
            return _document(gv, tuple(types))[0]
    return None


def openapi_v2(catalog: Catalog) -> tuple[dict[str, Any], bytes]:
    """The ``/openapi/v2`` document built from the v3 documents: as JSON, and as protobuf."""
    docs = tuple(_document(gv, tuple(types)) for gv, types in
                 sorted(catalog.group_versions().items()))
    return _v2(tuple(h for _, h in docs), tuple(doc for doc, _ in docs))


_v2_cache: dict[tuple[str, ...], tuple[dict[str, Any], bytes]] = {}


def _v2(hashes: tuple[str, ...], docs: tuple[dict[str, Any], ...]
        ) -> tuple[dict[str, Any], bytes]:
    cached = _v2_cache.get(hashes)
    if cached is None:
        doc = openapiv2.document(docs)
        cached = (doc, openapiv2.encode_document(doc))
        _v2_cache.clear()  # only the current set of kinds is ever asked for
        _v2_cache[hashes] = cached
    return cached
