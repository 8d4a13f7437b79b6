"""The controller's writes to the local cluster, each idempotent: creates that
find the object there and deletes that find it gone count as success.

Calls go through the (blocking) kubernetes client in a thread. Its exceptions
are translated here: a write the server refuses as invalid is a
`PermanentError`, anything else a `TemporaryError` with the server's own
message, so the work queue retries with backoff and logs one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException

from mesh.kube import MERGE_PATCH
from mesh.workqueue import PermanentError, TemporaryError
from mirror.link import GROUP, PLURAL, VERSION
from mirror.mirrors import owned, slice_patch, slice_up_to_date

Obj = dict[str, Any]


class NotFound(Exception):
    """The object (or its namespace) does not exist."""


class Conflict(Exception):
    """The object already exists, or changed since it was read."""


def _message(e: ApiException) -> str:
    try:
        return str(json.loads(e.body or "{}").get("message") or e.reason)
    except (ValueError, AttributeError):
        return str(e.reason)


class LocalApi:
    """The local cluster, as the mirror controller writes to it."""

    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    async def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any
                    ) -> Obj:
        try:
            resp = await asyncio.to_thread(fn, *args, _preload_content=False, **kwargs)
        except ApiException as e:
            if e.status == 404:
                raise NotFound(what) from e
            if e.status == 409:
                raise Conflict(what) from e
            text = f"cannot {what}: {e.status} {e.reason}: {_message(e)}"
            if e.status in (400, 422):
                raise PermanentError(text) from e
            raise TemporaryError(text) from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise TemporaryError(f"cannot {what}: the local API cannot be reached: "
                                 f"{type(e).__name__}") from e
        body: Obj = json.loads(resp.data or b"{}")
        return body

    # -- Services ------------------------------------------------------------------

    async def create_service(self, body: Obj) -> Obj:
        meta = body["metadata"]
        return await self._call(f"create Service {meta['namespace']}/{meta['name']}",
                                self.core.create_namespaced_service, meta["namespace"], body)

    async def read_service(self, namespace: str, name: str) -> Obj:
        return await self._call(f"read Service {namespace}/{name}",
                                self.core.read_namespaced_service, name, namespace)

    async def patch_service(self, namespace: str, name: str, patch: Obj) -> Obj:
        return await self._call(f"patch Service {namespace}/{name}",
                                self.core.patch_namespaced_service, name, namespace, patch,
                                _content_type=MERGE_PATCH)

    async def delete_service(self, namespace: str, name: str) -> bool:
        """Whether it was there to delete."""
        try:
            await self._call(f"delete Service {namespace}/{name}",
                             self.core.delete_namespaced_service, name, namespace)
        except NotFound:
            return False
        return True

    async def list_services(self, label_selector: str) -> list[Obj]:
        body = await self._call("list Services", self.core.list_service_for_all_namespaces,
                                label_selector=label_selector)
        items: list[Obj] = body.get("items") or []
        return items

    # -- EndpointSlices ------------------------------------------------------------

    async def create_slice(self, body: Obj) -> Obj:
        meta = body["metadata"]
        return await self._call(f"create EndpointSlice {meta['namespace']}/{meta['name']}",
                                self.discovery.create_namespaced_endpoint_slice,
                                meta["namespace"], body)

    async def read_slice(self, namespace: str, name: str) -> Obj:
        return await self._call(f"read EndpointSlice {namespace}/{name}",
                                self.discovery.read_namespaced_endpoint_slice, name, namespace)

    async def patch_slice(self, namespace: str, name: str, patch: Obj) -> Obj:
        return await self._call(f"patch EndpointSlice {namespace}/{name}",
                                self.discovery.patch_namespaced_endpoint_slice, name,
                                namespace, patch, _content_type=MERGE_PATCH)

    async def delete_slice(self, namespace: str, name: str) -> bool:
        try:
            await self._call(f"delete EndpointSlice {namespace}/{name}",
                             self.discovery.delete_namespaced_endpoint_slice, name, namespace)
        except NotFound:
            return False
        return True

    async def list_slices(self, label_selector: str) -> list[Obj]:
        body = await self._call("list EndpointSlices",
                                self.discovery.list_endpoint_slice_for_all_namespaces,
                                label_selector=label_selector)
        items: list[Obj] = body.get("items") or []
        return items

    async def apply_slices(self, namespace: str, desired: dict[str, Obj],
                           existing: dict[str, Obj], *, cluster: str) -> None:
        """Make a mirror's slices in `namespace` those `desired` names: create,
        patch or replace (a slice's addressType cannot change) each, and delete
        the `existing` ones it does not name."""
        for name, want in desired.items():
            current = existing.get(name)
            if current is None:
                try:
                    await self.create_slice(want)
                    continue
                except Conflict:
                    current = await self.read_slice(namespace, name)
                    if not owned(current, cluster):
                        raise PermanentError(f"EndpointSlice {namespace}/{name} exists and is "
                                             f"not a slice of a mirror of {cluster}") from None
            if current.get("addressType") != want["addressType"]:
                await self.delete_slice(namespace, name)
                await self.create_slice(want)
            elif not slice_up_to_date(current, want):
                await self.patch_slice(namespace, name, slice_patch(current, want))
        for name in set(existing) - set(desired):
            await self.delete_slice(namespace, name)

    # -- Namespaces ----------------------------------------------------------------

    async def ensure_namespace(self, name: str, labels: dict[str, str]) -> None:
        with contextlib.suppress(Conflict):  # there already
            await self._call(f"create Namespace {name}", self.core.create_namespace,
                             {"metadata": {"name": name, "labels": labels}})

    # -- the Link ------------------------------------------------------------------

    async def patch_link(self, namespace: str, name: str, patch: Obj) -> Obj:
        return await self._call(f"patch Link {namespace}/{name}",
                                self.custom.patch_namespaced_custom_object, GROUP, VERSION,
                                namespace, PLURAL, name, patch, _content_type=MERGE_PATCH)

    async def patch_link_status(self, namespace: str, name: str, status: Obj) -> Obj:
        return await self._call(f"write the status of Link {namespace}/{name}",
                                self.custom.patch_namespaced_custom_object_status, GROUP,
                                VERSION, namespace, PLURAL, name, {"status": status},
                                _content_type=MERGE_PATCH)
