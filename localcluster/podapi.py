"""The Pod subresources beyond ``status``: ``binding`` (localcluster.kubelet.binding),
``log`` (served from the kubelet's files, localcluster.kubelet.logs), and the
streaming ones (``exec``, ``attach``, ``portforward``), which this server refuses
with a 400 that says what is missing."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from localcluster.errors import ApiError
from localcluster.registry import Registry

if TYPE_CHECKING:
    from localcluster.kubelet.worker import PodWorker

STREAMING = frozenset({"exec", "attach", "portforward"})
REFUSED = frozenset({"attach", "portforward"})
SUBRESOURCES = frozenset({"binding", "log", *STREAMING})


class KubeletView(Protocol):
    @property
    def logs_root(self) -> Path: ...

    def worker(self, namespace: str, name: str) -> PodWorker | None: ...


def streaming_refused(subresource: str) -> ApiError:
    return ApiError.bad_request(
        f"pods/{subresource} is not served: this embedded cluster's kubelet streams only "
        "pods/exec, over WebSocket (v5.channel.k8s.io); to reach a pod's port, use "
        "`ip netns exec` with the pod's namespace from `ip netns list`")


async def serve_exec(request: web.Request, pod: Mapping[str, Any],
                     kubelet: KubeletView | None) -> web.StreamResponse:
    from localcluster.kubelet import execstream, logs

    meta = pod["metadata"]
    container = logs.choose_container(pod, request.query.get("container", ""))
    command = request.query.getall("command", [])
    if not command:
        raise ApiError.bad_request("you must specify at least 1 command")
    if kubelet is None:
        raise ApiError.bad_request(
            "pods/exec is not served: this server runs no kubelet (start the cluster with "
            "`meshgate cluster up` for one)")
    worker = kubelet.worker(meta["namespace"], meta["name"])
    found = worker.exec_command(container, command) if worker is not None else None
    if found is None:
        raise ApiError.bad_request(
            f'unable to upgrade connection: container not found ("{container}")')
    argv, env = found
    return await execstream.serve(request, argv, command, env)


def grace_query(query: Mapping[str, str]) -> int:
    text = query.get("gracePeriodSeconds", "")
    try:
        return int(text)
    except ValueError:
        raise ApiError.bad_request(f"gracePeriodSeconds must be an integer, got {text!r}"
                                   ) from None


async def bind(registry: Registry, namespace: str, name: str, body: Any, *,
               dry_run: bool) -> dict[str, Any]:
    """A Binding posted to pods/NAME/binding, or to bindings (`name` empty: the Pod the
    Binding names)."""
    from localcluster.kubelet.binding import bind as assign

    if not name and isinstance(body, dict):
        name = str((body.get("metadata") or {}).get("name") or "")
    if not name:
        raise ApiError.bad_request("a Binding must name the Pod in metadata.name")
    return await assign(registry, namespace, name, body, dry_run=dry_run)


async def serve_log(request: web.Request, pod: Mapping[str, Any],
                    kubelet: KubeletView | None) -> web.StreamResponse:
    from localcluster.kubelet import logs

    if kubelet is None:
        container = logs.choose_container(pod, request.query.get("container", ""))
        raise ApiError.bad_request(f'container "{container}" in pod '
                                   f'"{pod["metadata"]["name"]}" is not running on a node of '
                                   "this server: it was started without a kubelet")
    meta = pod["metadata"]
    return await logs.serve(request, pod, kubelet.logs_root,
                            kubelet.worker(meta["namespace"], meta["name"]))
