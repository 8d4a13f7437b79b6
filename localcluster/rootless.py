"""Clusters without root: everything inside a user namespace of the caller's own.

Network namespaces, bridges and routes need CAP_NET_ADMIN and CAP_SYS_ADMIN.
A user without them can still have them inside a user namespace where their
uid is root (`unshare --user --map-root-user`), where the kernel allows it.
For each such cluster a keeper process (``sleep``) holds a user namespace and a
private mount namespace; every `cluster up`, `run-pod` and `down` for the
cluster re-executes itself inside them with ``nsenter``. Named network
namespaces are bind-mounted in a directory of the caller's own (iproute2's
/var/run/netns is root's) that exists only inside that mount namespace. The
network namespace stays the host's: the API server's host listener is where
kubectl expects it, and the cluster's own namespaces hang below it as usual.
`down` stops the keeper last, and with it go the namespaces.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mesh.errors import MeshError

_CAP_NET_ADMIN, _CAP_SYS_ADMIN = 12, 21


class RootlessError(MeshError):
    """A cluster cannot run in a user namespace here."""


def privileged() -> bool:
    """Whether this process may build network namespaces itself."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
                return bool(caps >> _CAP_NET_ADMIN & 1 and caps >> _CAP_SYS_ADMIN & 1)
    return False


def run_dir() -> Path:
    """Where clusters are recorded by name (see localcluster.up)."""
    if "MESHGATE_RUN_DIR" in os.environ:
        return Path(os.environ["MESHGATE_RUN_DIR"])
    if os.geteuid() == 0:
        return Path("/run/meshgate")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "meshgate" if runtime else Path(f"/tmp/meshgate-{os.getuid()}")


def _keeper_file(name: str) -> Path:
    return run_dir() / "clusters" / f"{name}.userns"


def keeper(name: str) -> int | None:
    """The pid of the keeper of cluster `name`, while it lives."""
    try:
        pid = int(_keeper_file(name).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def start_keeper(name: str) -> int:
    """Start (or find) the keeper of cluster `name`; its pid."""
    found = keeper(name)
    if found is not None:
        return found
    unshare = shutil.which("unshare")
    if unshare is None:
        raise RootlessError("running a cluster without root needs `unshare` (util-linux); "
                            "install it, or run as root")
    proc = subprocess.Popen([unshare, "--user", "--map-root-user", "--mount",
                             "--propagation", "private", "--", "sleep", "infinity"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    mine = os.readlink("/proc/self/ns/user")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            raise RootlessError(
                f"cannot create a user namespace ({err or 'unshare failed'}): building a "
                "cluster needs root, or unprivileged user namespaces (sysctl "
                "user.max_user_namespaces > 0, and kernel.unprivileged_userns_clone=1 or "
                "no AppArmor restriction where those exist)")
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{proc.pid}/ns/user") != mine and \
                    Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(b"sleep"):
                break
        time.sleep(0.02)
    else:
        proc.kill()
        raise RootlessError("the user namespace keeper did not start within 5s")
    path = _keeper_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{proc.pid}\n")
    return proc.pid


def stop_keeper(name: str) -> None:
    pid = keeper(name)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    _keeper_file(name).unlink(missing_ok=True)


def run_inside(name: str, argv: Sequence[str]) -> int:
    """Run `argv` (a meshgate command) inside the keeper's namespaces, as their root;
    returns its exit status."""
    pid = keeper(name)
    if pid is None:
        raise RootlessError(f"no cluster named {name!r} is up for this user")
    nsenter = shutil.which("nsenter")
    if nsenter is None:
        raise RootlessError("running a cluster without root needs `nsenter` (util-linux)")
    netns_dir = run_dir() / "netns" / name
    netns_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MESHGATE_RUN_DIR": str(run_dir()),
           "MESHGATE_NETNS_DIR": str(netns_dir)}
    child = subprocess.Popen([nsenter, f"--target={pid}", "--user", "--mount",
                              f"--wd={os.getcwd()}", "--preserve-credentials", "--", *argv],
                             env=env)

    def forward(signum: int, frame: object) -> None:
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def meshgate_argv(args: Sequence[str]) -> list[str]:
    """The command line that runs ``meshgate ARGS`` with this interpreter."""
    return [sys.executable, "-m", "mesh.cli", *args]
