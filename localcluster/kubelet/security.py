"""What a Pod's security settings change in how its containers run here.

- Capabilities: each container runs as root (users are not applied) with the
  capabilities a container runtime gives it: containerd's default set, or none with
  ``drop: [ALL]``, then ``add`` added and the rest of ``drop`` removed (a privileged
  container keeps them all). `confine` puts ``setpriv`` in front of the container's
  command, after its volumes are mounted, limiting both the bounding and the
  inheritable set, which is what a root process's capabilities become at exec.
- Sysctls: the Pod's ``net.*`` sysctls (``securityContext.sysctls``; namespaced, so
  its own) are written in the Pod's network namespace before its containers start.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_CAPABILITIES = frozenset({
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "NET_RAW", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"})
"""containerd's default capabilities for a container."""


def _names(values: Sequence[Any] | None) -> set[str]:
    return {str(v).upper().removeprefix("CAP_") for v in values or []}


def capabilities(container: Mapping[str, Any]) -> frozenset[str] | None:
    """The container's capabilities; None for all of them (privileged, or add ALL)."""
    context = container.get("securityContext") or {}
    if context.get("privileged"):
        return None
    caps = context.get("capabilities") or {}
    add, drop = _names(caps.get("add")), _names(caps.get("drop"))
    if "ALL" in add:
        return None
    base = set() if "ALL" in drop else set(DEFAULT_CAPABILITIES)
    return frozenset((base | add) - drop)


def confine(container: Mapping[str, Any], argv: Sequence[str], *, setpriv: str
            ) -> list[str]:
    """`argv` run with only the container's capabilities."""
    caps = capabilities(container)
    if caps is None:
        return list(argv)
    spec = ",".join(["-all", *(f"+{c.lower()}" for c in sorted(caps))])
    return [setpriv, f"--inh-caps={spec}", f"--bounding-set={spec}", "--", *argv]


def net_sysctls(pod: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The Pod's network sysctls: (name, value)."""
    context = (pod.get("spec") or {}).get("securityContext") or {}
    return [(str(s["name"]), str(s.get("value", ""))) for s in context.get("sysctls") or []
            if str(s.get("name", "")).startswith("net.")]


def write_sysctls(sysctls: Sequence[tuple[str, str]], proc_sys: Path = Path("/proc/sys")
                  ) -> None:
    """Write `sysctls` (run it inside the Pod's network namespace)."""
    for name, value in sysctls:
        (proc_sys / name.replace(".", "/")).write_text(f"{value}\n")
