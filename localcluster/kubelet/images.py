"""What a container runs, without pulling images: its own ``command`` from this
machine's filesystem, or, for meshgate's image, the local meshgate installation (its
``meshgate`` for the image's entrypoint, its interpreter for the image's ``python``)."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from localcluster.rootless import meshgate_argv
from mesh.image import IMAGE

MESHGATE_IMAGE = IMAGE
"""meshgate's own image (mesh.image), under any tag or digest: runs the local
installation."""

IMAGE_PYTHON = ("python", "python3", "/opt/meshgate/bin/python", "/opt/meshgate/bin/python3")
"""How a container of meshgate's image names the image's Python (deploy/Dockerfile)."""

NOT_RUNNABLE_REASON = "ImageNotRunnable"
NOT_RUNNABLE_MESSAGE = ("this embedded cluster does not pull images; give the container a "
                        "command to run from this machine")

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def is_meshgate(image: str) -> bool:
    repo = image.split("@", 1)[0]
    name, _, tag = repo.rpartition(":")
    if "/" in tag:  # a registry port, not a tag
        name = repo
    return (name or repo) == MESHGATE_IMAGE


@dataclass(frozen=True)
class Runnable:
    argv: tuple[str, ...]
    meshgate: bool = False


def expand(text: str, env: Mapping[str, str]) -> str:
    """kube's $(VAR) expansion in command and args: unknown names stay as written,
    and $$ escapes a dollar."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR.sub(sub, text)


def runnable(container: Mapping[str, Any], env: Mapping[str, str]) -> Runnable | None:
    """The command line of `container`, or None when it cannot be run here."""
    command: Sequence[str] = container.get("command") or ()
    args: Sequence[str] = container.get("args") or ()
    meshgate = is_meshgate(str(container.get("image", "")))
    if command and meshgate and command[0] in IMAGE_PYTHON:
        # The image's interpreter, with meshgate installed: the local installation's.
        return Runnable((sys.executable, *(expand(a, env) for a in (*command[1:], *args))),
                        meshgate=True)
    if command:
        return Runnable(tuple(expand(a, env) for a in (*command, *args)))
    if meshgate:
        return Runnable(tuple(meshgate_argv([expand(a, env) for a in args])), meshgate=True)
    return None
