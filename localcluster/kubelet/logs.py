"""``pods/log``: a container's output, read from the files the kubelet writes per
container instance (CRI format), with kube's ``container``, ``follow``,
``previous``, ``tailLines``, ``timestamps`` and ``limitBytes``, and its 400s."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from localcluster.errors import ApiError
from localcluster.kubelet.worker import PodWorker, pod_dir

FOLLOW_POLL = 0.1


def _flag(query: Mapping[str, str], name: str) -> bool:
    return query.get(name, "false").lower() in ("true", "1")


def _int(query: Mapping[str, str], name: str) -> int | None:
    text = query.get(name)
    if text in (None, ""):
        return None
    try:
        value = int(text)
    except ValueError:
        raise ApiError.bad_request(f"{name} must be an integer, got {text!r}") from None
    if value < 0:
        raise ApiError.bad_request(f"{name} must be greater than or equal to 0")
    return value


def choose_container(pod: Mapping[str, Any], asked: str) -> str:
    spec = pod.get("spec") or {}
    name = pod["metadata"]["name"]
    mains = [c["name"] for c in spec.get("containers") or []]
    inits = [c["name"] for c in spec.get("initContainers") or []]
    if not asked:
        if len(mains) == 1:
            return mains[0]
        text = (f"a container name must be specified for pod {name}, choose one of: "
                f"[{' '.join(mains)}]")
        if inits:
            text += f" or one of the init containers: [{' '.join(inits)}]"
        raise ApiError.bad_request(text)
    if asked not in mains + inits:
        raise ApiError.bad_request(f"container {asked} is not valid for pod {name}")
    return asked


def _status_of(pod: Mapping[str, Any], container: str) -> Mapping[str, Any]:
    status = pod.get("status") or {}
    for key in ("containerStatuses", "initContainerStatuses"):
        for cs in status.get(key) or []:
            if cs.get("name") == container:
                return dict(cs)
    return {}


def _line(raw: str, timestamps: bool) -> str:
    """One CRI log line as kubectl shows it."""
    stamp, _, rest = raw.partition(" ")
    _stream, _, rest = rest.partition(" ")
    tag, _, text = rest.partition(" ")
    end = "\n" if tag == "F" else ""
    return f"{stamp} {text}{end}" if timestamps else f"{text}{end}"


async def serve(request: web.Request, pod: Mapping[str, Any], root: Path,
                worker: PodWorker | None) -> web.StreamResponse:
    q = request.query
    meta = pod["metadata"]
    container = choose_container(pod, q.get("container", ""))
    if not (pod.get("spec") or {}).get("nodeName"):
        raise ApiError.bad_request(f"pod {meta['name']} does not have a host assigned")
    status = _status_of(pod, container)
    restarts = int(status.get("restartCount", 0))
    previous = _flag(q, "previous")
    state = status.get("state") or {}
    if previous:
        if not (status.get("lastState") or {}).get("terminated"):
            raise ApiError.bad_request(f'previous terminated container "{container}" in pod '
                                       f'"{meta["name"]}" not found')
        restart = restarts - 1
    else:
        restart = restarts
        waiting = state.get("waiting")
        if waiting and not status.get("containerID"):
            raise ApiError.bad_request(f'container "{container}" in pod "{meta["name"]}" is '
                                       f'waiting to start: {waiting.get("reason", "")}')
        if waiting:  # back-off: kube shows the last instance
            restart = restarts - 1
    path = pod_dir(root, meta["namespace"], meta["name"], meta["uid"]) / container / (
        f"{restart}.log")
    timestamps = _flag(q, "timestamps")
    tail = _int(q, "tailLines")
    limit = _int(q, "limitBytes")
    follow = _flag(q, "follow") and not previous
    resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await resp.prepare(request)
    sent = 0
    try:
        f = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
    except FileNotFoundError:
        await resp.write_eof()
        return resp
    with f:
        lines = f.readlines()
        if tail is not None:
            lines = lines[-tail:] if tail else []
        pending = ""
        for raw in lines:
            if not raw.endswith("\n"):
                pending = raw
                break
            out = _line(raw.rstrip("\n"), timestamps).encode()
            if limit is not None and sent + len(out) > limit:
                out = out[:limit - sent]
            await resp.write(out)
            sent += len(out)
            if limit is not None and sent >= limit:
                return resp
        while follow and worker is not None:
            chunk = f.readline()
            if chunk:
                pending += chunk
                if pending.endswith("\n"):
                    await resp.write(_line(pending.rstrip("\n"), timestamps).encode())
                    pending = ""
                continue
            if worker.running_log(container) != path:
                # This instance has exited: what it wrote last, then the end.
                for rest in f.readlines():
                    pending += rest
                    if pending.endswith("\n"):
                        await resp.write(_line(pending.rstrip("\n"), timestamps).encode())
                        pending = ""
                break
            await asyncio.sleep(FOLLOW_POLL)
    await resp.write_eof()
    return resp
