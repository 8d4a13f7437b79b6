"""A Pod's volumes, materialised under its directory and bind-mounted at each
container's ``mountPath`` inside the container's private mount namespace:
emptyDir, hostPath, secret, configMap, downwardAPI and projected (with the
ServiceAccount token bound to the Pod, refreshed before it expires).

Files are replaced by rename, so a mounted directory shows each update whole.
A mount point missing on this machine is created (an empty directory or file)
before the bind mount, as a container runtime creates it in an image.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localcluster.errors import ApiError
from localcluster.kubelet.containers import ConfigError, Lookup, field_value
from mesh.errors import MeshError

REFRESH_AT = 0.8
"""Share of a token's lifetime after which it is replaced, as kube's kubelet does."""

TokenMinter = Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any]]]
"""(namespace, service account, TokenRequest) -> the TokenRequest answered."""

_MOUNT_SCRIPT = (
    'm=$1; shift; '
    'while [ "$1" != -- ]; do s=$1; d=$2; o=$3; shift 3; '
    'if [ -d "$s" ]; then mkdir -p "$d"; else mkdir -p "$(dirname "$d")"; '
    '[ -e "$d" ] || : > "$d"; fi && "$m" --bind "$s" "$d" && '
    '{ [ "$o" != ro ] || "$m" -o remount,bind,ro "$d"; } || '
    '{ echo "$0: cannot mount $s on $d" >&2; exit 125; }; done; shift; exec "$@"')


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root if root == "/" else root + "/")


def mount_order(mounts: list[tuple[str, str, bool]]) -> list[tuple[str, str, bool]]:
    """The mounts in an order where none hides the source of a later one: a pod's
    volumes live under the state directory on this machine's filesystem, and a
    mountPath such as /tmp may cover it. Such mounts go last (with the mounts inside
    their mountPath after them, so that they are not hidden either); the rest keep
    their order."""
    covering = [m for m in mounts if any(_under(o[0], m[1]) for o in mounts if o is not m)]
    inside = [m for m in mounts if m not in covering
              and any(_under(m[1], c[1]) for c in covering)]
    rest = [m for m in mounts if m not in covering and m not in inside]
    return [*rest, *covering, *inside]


class VolumeError(MeshError):
    """A volume cannot be set up (yet): what is missing, in kube's words."""


@dataclass
class _Token:
    path: Path
    request: dict[str, Any]
    minted: float
    lifetime: float


@dataclass
class Volumes:
    pod: Mapping[str, Any]
    root: Path
    lookup: Lookup
    mint: TokenMinter
    host_ip: str
    clock: Callable[[], float]
    tokens: list[_Token] = field(default_factory=list)

    def path(self, name: str) -> Path:
        return self.root / name

    async def prepare(self) -> None:
        """Write every volume's content; raises VolumeError naming what is missing."""
        self.tokens.clear()
        for volume in (self.pod.get("spec") or {}).get("volumes") or []:
            try:
                await self._prepare(volume)
            except (VolumeError, ConfigError, ApiError) as e:
                raise VolumeError(f'MountVolume.SetUp failed for volume "{volume["name"]}" : '
                                  f"{e}") from e

    async def refresh(self) -> None:
        """Replace the tokens past `REFRESH_AT` of their lifetime."""
        now = self.clock()
        for token in self.tokens:
            if now - token.minted >= REFRESH_AT * token.lifetime:
                await self._mint(token)

    def mounts(self, container: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
        """(source, mountPath, read-only) of each of the container's volumeMounts."""
        named = {v["name"]: v for v in (self.pod.get("spec") or {}).get("volumes") or []}
        out = []
        for m in container.get("volumeMounts") or []:
            volume = named.get(m.get("name", ""))
            if volume is None:
                raise VolumeError(f"volumeMount {m.get('name')!r} names no volume of the pod")
            if "hostPath" in volume:
                source = Path(volume["hostPath"]["path"])
            else:
                source = self.path(volume["name"])
            if m.get("subPath"):
                source = source / m["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            ro = bool(m.get("readOnly")) or any(k in volume for k in (
                "secret", "configMap", "downwardAPI", "projected"))
            out.append((str(source), str(m["mountPath"]), ro))
        return mount_order(out)

    @staticmethod
    def wrap(mounts: Sequence[tuple[str, str, bool]], argv: Sequence[str], *, sh: str,
             mount: str) -> list[str]:
        """argv that bind-mounts `mounts`, then runs `argv` (in the same mount namespace)."""
        if not mounts:
            return list(argv)
        spec = [x for s, d, ro in mounts for x in (s, d, "ro" if ro else "rw")]
        return [sh, "-c", _MOUNT_SCRIPT, "meshgate-volumes", mount, *spec, "--", *argv]

    # -- sources ---------------------------------------------------------------------

    async def _prepare(self, volume: Mapping[str, Any]) -> None:
        name = volume["name"]
        target = self.path(name)
        target.mkdir(parents=True, exist_ok=True)
        ns = self.pod["metadata"]["namespace"]
        if "emptyDir" in volume:
            return
        if "hostPath" in volume:
            host = Path(volume["hostPath"]["path"])
            kind = volume["hostPath"].get("type", "")
            if kind == "DirectoryOrCreate":
                host.mkdir(parents=True, exist_ok=True)
            elif not host.exists() and kind not in ("", "FileOrCreate"):
                raise VolumeError(f'hostPath type check failed: {host} is not a '
                                  f'{kind or "path"}')
            return
        mode = int(next((volume[k].get("defaultMode", 420) for k in (
            "secret", "configMap", "downwardAPI", "projected") if k in volume), 420))
        if self._source(target, ns, volume, mode, secret_name="secretName"):
            return
        if "projected" in volume:
            for source in volume["projected"].get("sources") or []:
                await self._projected(target, source, mode)
        else:
            kinds = ", ".join(k for k in volume if k != "name")
            raise VolumeError(f'volume "{name}": {kinds} volumes are not supported by this '
                              "embedded cluster's kubelet (emptyDir, hostPath, secret, "
                              "configMap, downwardAPI and projected are)")

    async def _projected(self, target: Path, source: Mapping[str, Any], mode: int) -> None:
        ns = self.pod["metadata"]["namespace"]
        if "serviceAccountToken" in source:
            sat = source["serviceAccountToken"]
            meta = self.pod["metadata"]
            spec: dict[str, Any] = {"expirationSeconds": int(sat.get("expirationSeconds", 3600)),
                                    "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                                                       "name": meta["name"], "uid": meta["uid"]}}
            if sat.get("audience"):
                spec["audiences"] = [sat["audience"]]
            token = _Token(target / sat.get("path", "token"), {"spec": spec}, 0.0, 0.0)
            await self._mint(token, mode)
            self.tokens.append(token)
        else:
            self._source(target, ns, source, mode, secret_name="name")

    def _source(self, target: Path, ns: str, source: Mapping[str, Any], mode: int, *,
                secret_name: str) -> bool:
        """Write a secret, configMap or downwardAPI source; False for any other kind. A
        volume names its Secret in `secretName`, a projected source in `name`."""
        if "secret" in source:
            src = source["secret"]
            self._keys(target, "Secret", ns, src.get(secret_name, ""), src, mode)
        elif "configMap" in source:
            src = source["configMap"]
            self._keys(target, "ConfigMap", ns, src.get("name", ""), src, mode)
        elif "downwardAPI" in source:
            self._downward(target, source["downwardAPI"].get("items") or [], mode)
        else:
            return False
        return True

    async def _mint(self, token: _Token, mode: int = 0o644) -> None:
        sa = (self.pod.get("spec") or {}).get("serviceAccountName") or "default"
        now = self.clock()
        answer = await self.mint(self.pod["metadata"]["namespace"], sa, token.request)
        _write(token.path, str(answer["status"]["token"]).encode(), mode)
        token.minted = now
        token.lifetime = float(token.request["spec"]["expirationSeconds"])

    def _keys(self, target: Path, kind: str, ns: str, name: str, src: Mapping[str, Any],
              mode: int) -> None:
        obj = self.lookup(("", "secrets" if kind == "Secret" else "configmaps"), ns, name)
        if obj is None:
            if src.get("optional"):
                return
            raise VolumeError(f'{kind.lower()} "{name}" not found')
        data: dict[str, bytes] = {}
        for k, v in (obj.get("data") or {}).items():
            data[k] = base64.b64decode(v) if kind == "Secret" else str(v).encode()
        for k, v in (obj.get("binaryData") or {}).items():
            data[k] = base64.b64decode(v)
        items = src.get("items")
        if not items:
            for k, v in data.items():
                _write(target / k, v, mode)
            return
        for item in items:
            if item["key"] not in data:
                if src.get("optional"):
                    continue
                raise VolumeError(f"configmap references non-existent config key: "
                                  f"{item['key']}" if kind == "ConfigMap" else
                                  f"references non-existent secret key: {item['key']}")
            _write(target / item["path"], data[item["key"]], int(item.get("mode", mode)))

    def _downward(self, target: Path, items: Sequence[Mapping[str, Any]], mode: int) -> None:
        for item in items:
            ref = item.get("fieldRef")
            if ref is None:
                raise VolumeError(f"downwardAPI item {item.get('path')!r}: only fieldRef is "
                                  "supported")
            value = field_value(self.pod, ref.get("fieldPath", ""), self.host_ip)
            _write(target / item["path"], value.encode(), int(item.get("mode", mode)))


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode & 0o777)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode & 0o777)
    os.replace(tmp, path)
