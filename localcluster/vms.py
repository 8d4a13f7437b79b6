"""VMs on this machine, for mesh expansion: a network namespace on the WAN and a
mount namespace of their own.

A VM named NAME is:

- the network namespace ``mg-vm-NAME``, linked to the WAN's bridge with a veth
  (VM side ``eth0``) that carries an address from the WAN's range, recorded in
  the WAN's record (localcluster.wan) beside the clusters' so that no two members
  share one. Loopback is up; there is no other route, so the VM reaches clusters
  only at their nodes' WAN addresses (gateways, API servers, control planes),
  never a pod CIDR. A VM on a WAN that does not exist yet creates it, as the
  first cluster would.
- a persistent mount namespace, bind-mounted on ``STATE/mnt`` (STATE is
  ``$MESHGATE_RUN_DIR/vms/NAME``, which is bind-mounted on itself and made
  private first: the kernel will not pin a mount namespace on a shared mount).
  In it, the VM's private copies under ``STATE/root`` are bind-mounted over
  /etc/resolv.conf, /etc/hosts, /etc/hostname, /etc/systemd/system and
  /var/lib/meshgate, and a sysfs of the VM's network namespace over /sys; every
  mount in it is private, so nothing done there reaches the host. A path the
  host lacks (/var/lib/meshgate, usually) is made by an overlay on its nearest
  existing ancestor, whose upper layer is under ``STATE/overlay``: the host's
  directory is never written. The network namespaces that were mounted when the
  VM was made are unmounted in it, so that it keeps none of them alive.

Writes in the VM to those paths in place (open with O_TRUNC) land in the private
copies. Replacing one with rename() fails with EBUSY, as it does in a container
whose /etc/resolv.conf is a bind mount: the target is a mount point.

`exec_argv` is the command line that runs a program inside both namespaces
(``nsenter``), with ``/`` as its directory and the caller's environment.
`delete` kills whatever still runs in the VM, takes it off the WAN, and removes
its namespaces and state.

`create`, `delete` and `exec_argv` block; from asyncio call them through
`asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, ValidationError

from localcluster import namespaces
from localcluster import wan as wan_topology
from localcluster.rootless import run_dir
from mesh.errors import ConfigError, MeshError

log = logging.getLogger(__name__)

NETNS_PREFIX = "mg-vm-"
STOP_TIMEOUT = 3.0
"""Seconds `delete` waits after SIGTERM, and again after SIGKILL, for the VM's processes."""
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?")
_TOOLS = ("nsenter", "unshare", "mount", "umount", "sh", "awk")


class VmError(namespaces.TopologyError):
    """A VM cannot be created, found, entered or deleted as asked."""


class VmNotFoundError(VmError):
    """No VM of that name exists on this machine."""


@dataclass(frozen=True)
class Private:
    """A path that each VM has a copy of its own."""

    path: PurePosixPath
    directory: bool


PRIVATE = (
    Private(PurePosixPath("/etc/resolv.conf"), directory=False),
    Private(PurePosixPath("/etc/hosts"), directory=False),
    Private(PurePosixPath("/etc/hostname"), directory=False),
    Private(PurePosixPath("/etc/systemd/system"), directory=True),
    Private(PurePosixPath("/var/lib/meshgate"), directory=True),
)


@dataclass(frozen=True)
class Vm:
    """One VM on this machine."""

    name: str
    netns: str
    address: IPv4Interface
    """Its address on the WAN (on eth0), with the WAN's prefix length."""
    wan: str
    state_dir: Path

    @property
    def mount_ns(self) -> Path:
        """The file its mount namespace is bound to (`nsenter --mount=`)."""
        return self.state_dir / "mnt"

    def private(self, path: str) -> Path:
        """Where the host keeps the VM's copy of `path` (e.g. "/etc/resolv.conf")."""
        return private_copy(self.state_dir, PurePosixPath(path))


# --- pure planning -----------------------------------------------------------------------


def check_name(name: str) -> str:
    """`name`, if it can be a host name and name a namespace and a directory."""
    if not _NAME.fullmatch(name):
        raise ConfigError(f"VM name {name!r} must be 1-32 lower-case letters, digits and '-', "
                          "starting and ending with a letter or digit")
    return name


def netns_name(name: str) -> str:
    return f"{NETNS_PREFIX}{check_name(name)}"


def private_copy(state_dir: Path, path: PurePosixPath) -> Path:
    return state_dir / "root" / path.relative_to("/")


def hosts_text(name: str, address: IPv4Address) -> str:
    return ("127.0.0.1\tlocalhost\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"{address}\t{name}\n")


@dataclass(frozen=True)
class Overlay:
    """A directory of the host shown in the VM with a private upper layer, so that a
    path the host lacks can be made in it without writing the host."""

    lower: PurePosixPath
    upper: Path
    work: Path


@dataclass(frozen=True)
class MountPlan:
    overlays: tuple[Overlay, ...] = ()
    placeholders: tuple[tuple[Path, bool], ...] = ()
    """Made in the upper layers before mounting: (path, whether a directory)."""
    binds: tuple[tuple[Path, PurePosixPath], ...] = ()
    """(private copy, path in the VM)."""

    def script(self) -> str:
        """The shell script that builds the VM's mounts, run inside its new mount
        namespace and network namespace (for /sys)."""
        lines = ["set -e",
                 # Drop the copies of every namespace file mounted on the host (network
                 # namespaces under /run/netns, say): held here, they would keep those
                 # namespaces, and their links, alive after the host deletes them.
                 "awk '{for (i = 7; i < NF; i++) if ($i == \"-\") { if ($(i + 1) == \"nsfs\") "
                 "print $5; break }}' /proc/self/mountinfo | sort -r | "
                 "while read -r m; do umount -l \"$m\"; done"]
        for o in self.overlays:
            options = f"lowerdir={o.lower},upperdir={o.upper},workdir={o.work}"
            lines.append(shlex.join(["mount", "-t", "overlay", "overlay", "-o", options,
                                     str(o.lower)]))
        for copy, target in self.binds:
            lines.append(shlex.join(["mount", "--bind", str(copy), str(target)]))
        lines.append("mount -t sysfs sysfs /sys")
        return "\n".join(lines) + "\n"


def plan_mounts(state_dir: Path, private: Sequence[Private],
                exists: Callable[[PurePosixPath], bool]) -> MountPlan:
    """The mounts that put `private` copies under `state_dir` over the host's paths.
    A path the host lacks is made in an overlay of its nearest existing ancestor."""
    overlays: dict[PurePosixPath, Overlay] = {}
    placeholders: list[tuple[Path, bool]] = []
    binds: list[tuple[Path, PurePosixPath]] = []
    for item in private:
        if not exists(item.path):
            ancestor = next(p for p in item.path.parents if exists(p))
            if ancestor == PurePosixPath("/"):
                raise ConfigError(f"cannot give the VM a private {item.path}: none of its "
                                  "parent directories exists on this machine")
            if ancestor not in overlays:
                slug = str(ancestor).strip("/").replace("/", "-")
                base = state_dir / "overlay" / slug
                overlays[ancestor] = Overlay(lower=ancestor, upper=base / "upper",
                                             work=base / "work")
            upper = overlays[ancestor].upper
            relative = item.path.relative_to(ancestor)
            for parent in reversed(relative.parents[:-1]):
                placeholders.append((upper / parent, True))
            placeholders.append((upper / relative, item.directory))
        binds.append((private_copy(state_dir, item.path), item.path))
    for o in overlays.values():
        for path in (o.lower, o.upper, o.work):
            if set(str(path)) & {",", ":", "\\"}:
                raise ConfigError(f"{path} cannot be part of an overlay mount (it has ',', ':' "
                                  "or '\\'); set MESHGATE_RUN_DIR to a plainer directory")
    ordered = sorted(overlays.values(), key=lambda o: len(o.lower.parts))
    return MountPlan(overlays=tuple(ordered), placeholders=tuple(dict.fromkeys(placeholders)),
                     binds=tuple(binds))


def wrap(argv: Sequence[str], *, nsenter: str, netns_path: Path, mount_ns: Path) -> list[str]:
    """argv that runs `argv` in the VM's network and mount namespaces, from /."""
    if not argv:
        raise ConfigError("no command given to run in the VM")
    return [nsenter, f"--net={netns_path}", f"--mount={mount_ns}", "--wd=/", "--", *argv]


# --- state -------------------------------------------------------------------------------


class _Record(BaseModel):
    """STATE/vm.json. Written before what it names is made: a VM here may lack parts,
    but no part of a VM exists that is not recorded."""

    model_config = ConfigDict(extra="forbid")

    name: str
    netns: str
    wan: str
    address: IPv4Interface | None = None


def _vms_dir() -> Path:
    # Resolved, as /proc/self/mountinfo names mount points.
    return Path(os.path.realpath(run_dir() / "vms"))


def _state_dir(name: str) -> Path:
    return _vms_dir() / check_name(name)


def _load(name: str) -> _Record | None:
    path = _state_dir(name) / "vm.json"
    try:
        return _Record.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValidationError as e:
        raise VmError(f"{path} is not a VM record ({e.error_count()} errors); delete the VM's "
                      f"namespace `ip netns delete {netns_name(name)}`, then "
                      f"{path.parent}") from None


def _save(record: _Record) -> None:
    path = _state_dir(record.name) / "vm.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(record.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    with namespaces.locked(_vms_dir() / "lock"):
        yield


def _vm(record: _Record) -> Vm:
    assert record.address is not None
    return Vm(name=record.name, netns=record.netns, address=record.address, wan=record.wan,
              state_dir=_state_dir(record.name))


def _tools() -> dict[str, str]:
    found: dict[str, str] = {}
    for tool in _TOOLS:
        path = shutil.which(tool)
        if path is None:
            raise VmError(f"a VM needs `{tool}` on PATH (util-linux, coreutils, awk); "
                          "install it")
        found[tool] = path
    return found


# --- mounts ------------------------------------------------------------------------------


def _mount_points() -> set[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return {_unescape(line.split()[4]) for line in f}


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _run(argv: Sequence[str], action: str) -> None:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise VmError(f"cannot {action}: "
                      f"{lines[-1] if lines else f'exit status {proc.returncode}'}")


def _write_private_copies(vm: Vm) -> None:
    for item in PRIVATE:
        vm.private(str(item.path)).parent.mkdir(parents=True, exist_ok=True)
    resolv = Path("/etc/resolv.conf")
    vm.private("/etc/resolv.conf").write_bytes(resolv.read_bytes() if resolv.exists() else b"")
    vm.private("/etc/hosts").write_text(hosts_text(vm.name, vm.address.ip), encoding="utf-8")
    vm.private("/etc/hostname").write_text(f"{vm.name}\n", encoding="utf-8")
    units = vm.private("/etc/systemd/system")
    if Path("/etc/systemd/system").is_dir():
        # The image's units, as a VM made from the same image would have them.
        shutil.copytree("/etc/systemd/system", units, symlinks=True, dirs_exist_ok=True)
    units.mkdir(exist_ok=True)
    vm.private("/var/lib/meshgate").mkdir(mode=0o700, exist_ok=True)


def _build_mount_namespace(vm: Vm, tools: dict[str, str]) -> None:
    state = str(vm.state_dir)
    if state not in _mount_points():
        _run([tools["mount"], "--bind", state, state], f"bind-mount {state} on itself")
    _run([tools["mount"], "--make-private", state], f"make {state} a private mount")
    plan = plan_mounts(vm.state_dir, PRIVATE, lambda p: os.path.lexists(p))
    for o in plan.overlays:
        o.upper.mkdir(parents=True, exist_ok=True)
        o.work.mkdir(parents=True, exist_ok=True)
    for path, directory in plan.placeholders:
        if directory:
            path.mkdir(exist_ok=True)
        else:
            path.touch()
    vm.mount_ns.touch()
    _run([tools["nsenter"], f"--net={namespaces.namespace_path(vm.netns)}", "--",
          tools["unshare"], f"--mount={vm.mount_ns}", "--propagation", "private", "--",
          tools["sh"], "-c", plan.script()], f"make the mount namespace of VM {vm.name!r}")


def _loopback_up(netns: str) -> None:
    with namespaces.iproute(netns, f"bring up lo in {netns!r}") as ipr:
        ipr.link("set", index=namespaces.link_index(ipr, "lo"), state="up")


# --- processes ---------------------------------------------------------------------------


def _namespace_key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def processes_in(netns_path: Path, mount_ns: Path) -> list[int]:
    """Live processes (zombies aside) in either namespace, this one excepted."""
    keys = {k for k in (_namespace_key(netns_path), _namespace_key(mount_ns)) if k}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        mine = {_namespace_key(entry / "ns" / "net"), _namespace_key(entry / "ns" / "mnt")}
        if mine & keys and not _zombie(entry):
            found.append(int(entry.name))
    return found


def _zombie(proc_dir: Path) -> bool:
    try:
        return (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _stop_processes(vm: str, netns_path: Path, mount_ns: Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = processes_in(netns_path, mount_ns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT
        while processes_in(netns_path, mount_ns) and time.monotonic() < deadline:
            time.sleep(0.02)
    left = processes_in(netns_path, mount_ns)
    if left:
        raise VmError(f"processes {left} in VM {vm!r} outlived SIGKILL for {STOP_TIMEOUT:.0f} s "
                      "(stuck in the kernel?); run delete again")


# --- removal -----------------------------------------------------------------------------


def _remove(name: str, record: _Record | None) -> None:
    """Removes whatever exists of VM `name`; raises one error naming every part left."""
    state_dir = _state_dir(name)
    netns = record.netns if record is not None else netns_name(name)
    mount_ns = state_dir / "mnt"
    failures: list[str] = []

    def step(action: Callable[[], None]) -> None:
        try:
            action()
        except (MeshError, OSError) as e:
            failures.append(str(e))

    step(lambda: _stop_processes(name, namespaces.namespace_path(netns), mount_ns))
    if record is not None:
        step(lambda: wan_topology.leave_vm(name, wan=record.wan))
        step(lambda: namespaces.delete(netns))
    step(lambda: _unmount(mount_ns, state_dir))
    if not failures:
        step(lambda: shutil.rmtree(state_dir, ignore_errors=False))
    if failures:
        raise VmError(f"VM {name!r} was only partly deleted, run delete again: "
                      f"{'; '.join(failures)}")


def _unmount(*paths: Path) -> None:
    umount = shutil.which("umount") or "umount"
    for path in paths:
        if str(path) in _mount_points():
            _run([umount, str(path)], f"unmount {path}")


# --- public operations -------------------------------------------------------------------


def create(name: str, *, wan: str = wan_topology.DEFAULT_WAN,
           address: IPv4Address | None = None, wan_cidr: IPv4Network | None = None) -> Vm:
    """Create VM `name` on the WAN `wan` (made if absent, with `wan_cidr` or the
    default range), at `address` or the lowest free one. A VM that is fully there is
    returned as it is; the remnant of one that was not finished is removed and made
    again. On failure nothing of the VM is left."""
    check_name(name)
    wan_topology.check_name(wan)
    namespaces.require_off_event_loop(f"creating VM {name!r}")
    namespaces.require_privileges()
    tools = _tools()
    with _locked():
        record = _load(name)
        if record is not None:
            existing = _complete(record)
            if existing is not None:
                return _same(existing, wan, address)
            _remove(name, record)
        netns = netns_name(name)
        owner = f"VM {name!r} (state in {_state_dir(name)})"
        if namespaces.exists(netns):
            raise namespaces.taken(netns, owner)
        record = _Record(name=name, netns=netns, wan=wan)
        _save(record)
        try:
            namespaces.create(netns, owner)
            _loopback_up(netns)
            joined = wan_topology.join_vm(name, netns=netns, wan=wan, cidr=wan_cidr,
                                          address=address)
            record.address = joined.address
            _save(record)
            vm = _vm(record)
            _write_private_copies(vm)
            _build_mount_namespace(vm, tools)
        except BaseException as e:
            try:
                _remove(name, record)
            except MeshError as cleanup:
                e.add_note(f"removing what was made of VM {name!r} also failed: {cleanup}")
            raise
    log.info("vm created vm=%s netns=%s wan=%s address=%s", name, netns, wan, vm.address)
    return vm


def _complete(record: _Record) -> Vm | None:
    if record.address is None or not namespaces.exists(record.netns):
        return None
    vm = _vm(record)
    if str(vm.mount_ns) not in _mount_points() or vm.name not in wan_topology.vms(vm.wan):
        return None
    return vm


def _same(vm: Vm, wan: str, address: IPv4Address | None) -> Vm:
    if vm.wan != wan or (address is not None and address != vm.address.ip):
        raise ConfigError(f"VM {vm.name!r} exists on the WAN {vm.wan!r} at {vm.address.ip}; "
                          f"delete it first (`meshgate cluster vm delete --name {vm.name}`) "
                          "to move it")
    return vm


def delete(name: str) -> None:
    """Kill every process left in VM `name`, take it off the WAN (freeing its address;
    the last member removes the WAN), and remove its namespaces and state. A VM that is
    not there counts as deleted."""
    namespaces.require_off_event_loop(f"deleting VM {name!r}")
    if not _state_dir(name).exists():
        return
    namespaces.require_privileges()
    with _locked():
        if not _state_dir(name).exists():
            return
        _remove(name, _load(name))
    log.info("vm deleted vm=%s", name)


def find(name: str) -> Vm:
    """The VM `name` on this machine."""
    record = _load(name)
    if record is None or record.address is None:
        raise VmNotFoundError(f"no VM named {name!r} on this machine; create it with "
                              f"`meshgate cluster vm create --name {name}`")
    return _vm(record)


def list_vms() -> list[Vm]:
    """The VMs on this machine, by name."""
    found = []
    for path in sorted(_vms_dir().glob("*/vm.json")):
        record = _load(path.parent.name)
        if record is not None and record.address is not None:
            found.append(_vm(record))
    return found


def exec_argv(name: str, argv: Sequence[str]) -> list[str]:
    """argv that runs `argv` inside VM `name`: its network and mount namespaces, from /,
    with the caller's environment. The program replaces nsenter, so the pid is its."""
    vm = find(name)
    if not namespaces.exists(vm.netns) or not vm.mount_ns.exists():
        raise VmError(f"VM {name!r} is recorded in {vm.state_dir} but its namespaces are "
                      f"gone; delete it (`meshgate cluster vm delete --name {name}`) and "
                      "create it again")
    nsenter = shutil.which("nsenter")
    if nsenter is None:
        raise VmError("entering a VM needs `nsenter` (util-linux) on PATH; install it")
    return wrap(argv, nsenter=nsenter,
                netns_path=namespaces.namespace_path(vm.netns), mount_ns=vm.mount_ns)
