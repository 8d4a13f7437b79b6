"""One container instance as a process: its environment (with ``valueFrom``
resolved as kube's kubelet resolves it), its start inside the Pod's network
namespace and a private mount namespace, its output written to a log file in
the CRI format (``<RFC3339Nano> <stream> F <line>``), and its stop."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import os
import signal
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.errors import MeshError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DRAIN_AFTER_EXIT = 1.0
"""Seconds to keep reading output after the process exits (a child may hold the pipe)."""


class ConfigError(MeshError):
    """The container's configuration names what does not exist (CreateContainerConfigError)."""


Lookup = Callable[[tuple[str, str], str, str], Mapping[str, Any] | None]
"""(group, plural), namespace, name -> the stored object, or None."""


def rfc3339_nano(ts: float) -> str:
    t = dt.datetime.fromtimestamp(ts, dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond:06d}000Z"


def rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(int(ts), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def field_value(pod: Mapping[str, Any], path: str, host_ip: str) -> str:
    """The value a fieldRef names, as the downward API gives it."""
    meta = pod.get("metadata") or {}
    for prefix, mapping in (("metadata.labels", meta.get("labels")),
                            ("metadata.annotations", meta.get("annotations"))):
        if path.startswith(prefix + "['") and path.endswith("']"):
            return str((mapping or {}).get(path[len(prefix) + 2:-2], ""))
    status = pod.get("status") or {}
    values = {
        "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"), "spec.nodeName": (pod.get("spec") or {}).get(
            "nodeName"),
        "spec.serviceAccountName": (pod.get("spec") or {}).get("serviceAccountName"),
        "status.podIP": status.get("podIP"), "status.hostIP": host_ip,
        "status.podIPs": ",".join(i["ip"] for i in status.get("podIPs") or []),
        "status.hostIPs": host_ip,
    }
    if path not in values:
        raise ConfigError(f"unsupported fieldRef {path!r}")
    return str(values[path] or "")


def _key_ref(lookup: Lookup, kind: str, namespace: str, ref: Mapping[str, Any]
             ) -> str | None:
    plural = "secrets" if kind == "Secret" else "configmaps"
    obj = lookup(("", plural), namespace, str(ref.get("name", "")))
    key = str(ref.get("key", ""))
    if obj is None:
        if ref.get("optional"):
            return None
        raise ConfigError(f'{kind.lower()} "{ref.get("name", "")}" not found')
    if kind == "Secret":
        data = obj.get("data") or {}
        if key in data:
            return base64.b64decode(data[key]).decode(errors="replace")
    else:
        for section in ("data", "binaryData"):
            if key in (obj.get(section) or {}):
                return str(obj[section][key])
    if ref.get("optional"):
        return None
    raise ConfigError(f"couldn't find key {key} in {kind} {namespace}/{ref.get('name', '')}")


def environment(pod: Mapping[str, Any], container: Mapping[str, Any], *, lookup: Lookup,
                host_ip: str, service_env: Mapping[str, str]) -> dict[str, str]:
    """The container's environment, in kube's order: service links, envFrom, env."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {"PATH": DEFAULT_PATH, "HOSTNAME": pod["metadata"]["name"],
                           "HOME": "/root", **service_env}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, ref in (("ConfigMap", source.get("configMapRef")),
                          ("Secret", source.get("secretRef"))):
            if not ref:
                continue
            plural = "secrets" if kind == "Secret" else "configmaps"
            obj = lookup(("", plural), namespace, ref.get("name", ""))
            if obj is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'{kind.lower()} "{ref.get("name", "")}" not found')
            for k, v in (obj.get("data") or {}).items():
                env[prefix + k] = (base64.b64decode(v).decode(errors="replace")
                                   if kind == "Secret" else str(v))
    from localcluster.kubelet.images import expand

    for item in container.get("env") or []:
        name = item["name"]
        source = item.get("valueFrom")
        if source is None:
            env[name] = expand(str(item.get("value", "")), env)
            continue
        value: str | None
        if "fieldRef" in source:
            value = field_value(pod, source["fieldRef"].get("fieldPath", ""), host_ip)
        elif "secretKeyRef" in source:
            value = _key_ref(lookup, "Secret", namespace, source["secretKeyRef"])
        elif "configMapKeyRef" in source:
            value = _key_ref(lookup, "ConfigMap", namespace, source["configMapKeyRef"])
        else:
            raise ConfigError(f"env {name}: only fieldRef, secretKeyRef and configMapKeyRef "
                              "are supported in valueFrom")
        if value is not None:
            env[name] = value
    return env


@dataclass
class Instance:
    """One run of a container: a process whose output goes to `log_path`."""

    process: asyncio.subprocess.Process
    log_path: Path
    started: float
    container_id: str
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait(self) -> int:
        """The exit code as kube reports it (128 + signal for a killed process)."""
        code = await self.process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # what it left behind in its group
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self.pumps, return_exceptions=True),
                                   DRAIN_AFTER_EXIT)
        for p in self.pumps[:-1]:
            p.cancel()
        await self.pumps[-1]  # closes the log file
        return code if code >= 0 else 128 - code

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.process.returncode is None:
                os.kill(self.pid, sig)

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


async def _pump(stream: asyncio.StreamReader, name: str, out: Any) -> None:
    while True:
        try:
            line = await stream.readline()
        except ValueError:  # a line longer than the limit: take what there is
            line = await stream.read(65536)
        if not line:
            return
        text = line.decode(errors="replace")
        tag = "F" if text.endswith("\n") else "P"
        out.write(f"{rfc3339_nano(time.time())} {name} {tag} "
                  f"{text.rstrip(chr(10))}\n")
        out.flush()


async def start(argv: Sequence[str], *, env: Mapping[str, str], cwd: str | None,
                log_path: Path, now: float) -> Instance:
    """Start `argv` (already wrapped to enter the Pod's namespaces) in a session of its
    own, its stdout and stderr written to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed by the pumps' owner
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=dict(env), cwd=cwd, start_new_session=True,
            limit=1 << 20)
    except BaseException:
        out.close()
        raise
    assert process.stdout is not None and process.stderr is not None
    inst = Instance(process, log_path, now, f"meshgate://{uuid.uuid4().hex}")
    pumps = [asyncio.create_task(_pump(process.stdout, "stdout", out)),
             asyncio.create_task(_pump(process.stderr, "stderr", out))]

    async def close_when_done() -> None:
        await asyncio.gather(*pumps, return_exceptions=True)
        out.close()

    closer = asyncio.create_task(close_when_done())
    inst.pumps = [*pumps, closer]
    return inst
