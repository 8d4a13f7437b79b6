"""The VM's resolver configuration: pointed at the mesh DNS server, and put back
exactly as it was.

Two ways, decided by `plan` from what /etc/resolv.conf is:

- A file of nameservers (a plain file, or a symlink to one that is not
  systemd-resolved's stub, e.g. /run/systemd/resolve/resolv.conf or a
  NetworkManager or resolvconf file): glibc asks those nameservers directly. The
  exact bytes, mode, owner and symlink target are saved in the agent's state
  dir (written and fsynced before anything else is touched), then the file gets
  `nameserver <mesh dns>` alone, the mesh search domains
  (`<ns>.svc.<domain> svc.<domain> <domain>`) before the original ones, and
  every other original line (options, comments) as it was; the original
  nameservers become the mesh DNS server's upstreams. Only the mesh server is
  listed: a second nameserver would be asked for cluster names whenever the
  mesh server is slow, leaking them outside. A plain file is rewritten in place
  (O_TRUNC, fsync), never renamed over, because /etc/resolv.conf is often a
  bind mount (containers), where rename fails with EBUSY; a symlink is replaced
  by a plain file, so that the daemon owning its target cannot undo the change,
  and is recreated on restore.
- systemd-resolved's stub (`nameserver 127.0.0.53`, or a symlink to
  /run/systemd/resolve/stub-resolv.conf): the file is left alone and resolved is
  told, on a dummy link of the agent's own, to send `~<domain>` to the mesh
  server and to use that link for nothing else (`resolvectl dns`, `domain`,
  `default-route false`). The mesh server's upstream is the stub itself, for the
  rare query sent to it directly for another name; resolved never sends it one.

`restore` puts the file back byte for byte (or reverts the link), is idempotent,
and refuses, naming the backup, when the file was changed by someone else since.
A crash at any point of `take_over` or `restore` leaves a state that `restore`
(or `take_over` again) completes: the record in the state dir is written before
the file is touched and removed only after the file is back.

Not tested here: the systemd-resolved path against a running resolved (this
sandbox has no systemd). Its decision and the exact `resolvectl` command lines
are pure functions with unit tests; `ResolvedLink` runs them and creates the
dummy link with pyroute2. Resolved forgets per-link settings when it restarts,
so the agent must call `take_over` again at start (it is idempotent).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import enum
import hashlib
import ipaddress
import json
import logging
import os
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mesh.dns import Address, format_address
from mesh.errors import ResolverError
from mesh.files import discard_partial_writes, fsync_dir, write_atomic

log = logging.getLogger(__name__)

RESOLV_CONF = Path("/etc/resolv.conf")
RESOLVED_STUBS = frozenset({"127.0.0.53", "127.0.0.54"})
RESOLVED_STUB_FILE = "/run/systemd/resolve/stub-resolv.conf"
LINK = "meshgate-dns"
MARKER = b"# meshgate:"
BACKUP = "resolv.conf.orig"
RECORD = "resolv.conf.json"


# -- the file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvConf:
    """A resolv.conf as glibc reads it, with its lines kept for rewriting."""

    nameservers: tuple[str, ...]
    search: tuple[str, ...]
    options: tuple[str, ...]
    lines: tuple[str, ...]

    @classmethod
    def parse(cls, data: bytes, *, source: str = str(RESOLV_CONF)) -> ResolvConf:
        nameservers: list[str] = []
        search: tuple[str, ...] = ()
        options: list[str] = []
        lines = []
        for number, raw in enumerate(data.splitlines(), 1):
            try:
                line = raw.decode()
            except UnicodeDecodeError:
                raise ResolverError(f"{source} line {number}: not UTF-8 text: {raw!r}") from None
            lines.append(line)
            words = line.split()
            if not words or words[0][0] in "#;":
                continue
            key, values = words[0], words[1:]
            if key == "nameserver":
                nameservers.append(_nameserver(values, source, number, line))
            elif key in ("search", "domain"):  # as in glibc: the last of them wins
                if not values:
                    raise ResolverError(f"{source} line {number}: {key!r} with no domain: "
                                        f"{line!r}; remove the line or name a domain")
                search = tuple(values) if key == "search" else tuple(values[:1])
            elif key == "options":
                options += values
        return cls(tuple(nameservers), search, tuple(options), tuple(lines))

    @property
    def resolved_stub(self) -> bool:
        return bool(self.nameservers) and set(self.nameservers) <= RESOLVED_STUBS


def _nameserver(values: list[str], source: str, number: int, line: str) -> str:
    if not values:
        raise ResolverError(f"{source} line {number}: nameserver with no address: {line!r}; "
                            f"remove the line or give the resolver's IP address")
    try:
        return str(ipaddress.ip_address(values[0]))
    except ValueError:
        raise ResolverError(f"{source} line {number}: nameserver {values[0]!r} is not an IP "
                            f"address: {line!r}; resolv.conf takes addresses, not names") from None


def mesh_search(namespace: str, cluster_domain: str = "cluster.local") -> tuple[str, ...]:
    """The search domains of a workload in `namespace`, as a pod has them."""
    domain = cluster_domain.rstrip(".")
    return (f"{namespace}.svc.{domain}", f"svc.{domain}", domain)


# -- the decision (pure) ----------------------------------------------------------------


class Mode(enum.Enum):
    FILE = "file"
    RESOLVED = "resolved"


@dataclass(frozen=True)
class Plan:
    """What `take_over` does: write `content` into the file (FILE), or run `commands`
    on `link` (RESOLVED); either way the mesh DNS server forwards to `upstreams`."""

    mode: Mode
    upstreams: tuple[Address, ...]
    content: bytes = b""
    link: str = ""
    commands: tuple[tuple[str, ...], ...] = ()


def plan(current: bytes, *, symlink_target: str | None, dns_address: str,
         search: Sequence[str], cluster_domain: str = "cluster.local", link: str = LINK,
         source: str = str(RESOLV_CONF)) -> Plan:
    """Decide how to send mesh names to `dns_address` from what the file is."""
    conf = ResolvConf.parse(current, source=source)
    if conf.resolved_stub or symlink_target == RESOLVED_STUB_FILE:
        return Plan(Mode.RESOLVED, (((conf.nameservers or ("127.0.0.53",))[0], 53),), link=link,
                    commands=resolved_commands(link, dns_address=dns_address, search=search,
                                               cluster_domain=cluster_domain))
    if dns_address in conf.nameservers:
        raise ResolverError(f"{source} already lists the mesh DNS server {dns_address} but "
                            f"meshgate has no record of it; restore the original file, then "
                            f"join again")
    if not conf.nameservers:
        raise ResolverError(f"{source} lists no nameserver; add the VM's resolver to it so "
                            f"that names outside the mesh can be forwarded there")
    return Plan(Mode.FILE, tuple((ns, 53) for ns in conf.nameservers),
                content=render(conf, dns_address=dns_address, search=search))


def render(conf: ResolvConf, *, dns_address: str, search: Sequence[str]) -> bytes:
    """The file glibc reads while the VM is in the mesh: every original line but the
    nameserver and search/domain lines, after ours."""
    head = [
        f"{MARKER.decode()} mesh names are answered by {dns_address}, other names are "
        f"forwarded to {' '.join(conf.nameservers)}.",
        "# `meshgate vm leave` puts the original file back.",
        f"nameserver {dns_address}",
        "search " + " ".join(dict.fromkeys([*search, *conf.search])),
    ]
    kept = [line for line in conf.lines
            if (line.split() or [""])[0] not in ("nameserver", "search", "domain")]
    return ("\n".join([*head, *kept]) + "\n").encode()


def resolved_commands(link: str, *, dns_address: str, search: Sequence[str],
                      cluster_domain: str) -> tuple[tuple[str, ...], ...]:
    """The resolvectl command lines that route `~<domain>` to the mesh server on `link`."""
    domain = cluster_domain.rstrip(".")
    return (
        ("resolvectl", "dns", link, dns_address),
        ("resolvectl", "domain", link, *search, f"~{domain}"),
        ("resolvectl", "default-route", link, "false"),
    )


def revert_command(link: str) -> tuple[str, ...]:
    return ("resolvectl", "revert", link)


# -- systemd-resolved -------------------------------------------------------------------


class Resolved(Protocol):
    """The host operations of the systemd-resolved path."""

    def apply(self, link: str, commands: Sequence[Sequence[str]]) -> None: ...

    def revert(self, link: str) -> None: ...


class ResolvedLink:
    """A dummy link of the agent's (pyroute2) carrying resolved's per-link settings."""

    def apply(self, link: str, commands: Sequence[Sequence[str]]) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError as PyrouteError

        try:
            with IPRoute() as ip:
                if not ip.link_lookup(ifname=link):
                    ip.link("add", ifname=link, kind="dummy")
                ip.link("set", index=ip.link_lookup(ifname=link)[0], state="up")
        except PyrouteError as e:
            raise ResolverError(f"cannot create the dummy link {link} for systemd-resolved: "
                                f"{e}") from e
        for argv in commands:
            _run(argv)

    def revert(self, link: str) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError as PyrouteError

        try:
            with IPRoute() as ip:
                found = ip.link_lookup(ifname=link)
                if found:
                    try:
                        _run(revert_command(link))
                    except ResolverError as e:  # deleting the link drops its settings too
                        log.warning("resolver: revert link=%s failed, deleting it: %s", link, e)
                    ip.link("del", index=found[0])
        except PyrouteError as e:
            raise ResolverError(f"cannot delete the dummy link {link}: {e}; delete it with "
                                f"`ip link del {link}`") from e


def _run(argv: Sequence[str]) -> None:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise ResolverError(f"{' '.join(argv)}: {e}; is systemd-resolved running?") from e
    if done.returncode != 0:
        raise ResolverError(f"{' '.join(argv)} failed ({done.returncode}): "
                            f"{done.stderr.strip()}")


# -- the record in the state dir --------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """What was there before and what meshgate wrote, kept in the state dir."""

    mode: Mode
    path: str
    perm: int
    uid: int
    gid: int
    symlink: str | None
    original_sha256: str
    written: tuple[bytes, ...]
    upstreams: tuple[Address, ...]
    link: str = ""

    def to_json(self) -> bytes:
        return json.dumps({
            "mode": self.mode.value, "path": self.path, "perm": self.perm, "uid": self.uid,
            "gid": self.gid, "symlink": self.symlink, "original_sha256": self.original_sha256,
            "written": [base64.b64encode(w).decode() for w in self.written],
            "upstreams": [list(u) for u in self.upstreams], "link": self.link,
        }, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, source: Path) -> Record:
        try:
            d = json.loads(data)
            return cls(Mode(d["mode"]), str(d["path"]), int(d["perm"]), int(d["uid"]),
                       int(d["gid"]), d["symlink"], str(d["original_sha256"]),
                       tuple(base64.b64decode(w) for w in d["written"]),
                       tuple((str(h), int(p)) for h, p in d["upstreams"]), str(d["link"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ResolverError(f"{source} is not a resolver record meshgate wrote ({e}); the "
                                f"original resolv.conf, if saved, is {source.parent / BACKUP}"
                                ) from e


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- taking over and restoring ----------------------------------------------------------


class _Found(enum.Enum):
    ORIGINAL = "original"
    OURS = "ours"
    FOREIGN = "foreign"


@dataclass(frozen=True)
class _Current:
    data: bytes | None
    """None when the path does not exist (or is a dangling symlink)."""
    symlink: str | None
    st: os.stat_result | None


def take_over(path: str | Path, state_dir: str | Path, *, dns_address: str,
              search: Sequence[str], cluster_domain: str = "cluster.local",
              resolved: Resolved | None = None) -> Plan:
    """Send the VM's lookups of mesh names to `dns_address`; returns the plan carried out,
    whose `upstreams` the mesh DNS server forwards to. Idempotent: a second call (an
    agent restart, or after a crash half-way) completes or repeats the first."""
    path, state = Path(path), Path(state_dir)
    resolved = resolved if resolved is not None else ResolvedLink()
    record = _load(state)
    if record is None:
        current = _read(path)
        if current.data is None or current.st is None:
            raise ResolverError(f"{path} does not exist (or is a dangling symlink to "
                                f"{current.symlink}); create it with the VM's resolvers first")
        chosen = plan(current.data, symlink_target=current.symlink, dns_address=dns_address,
                      search=search, cluster_domain=cluster_domain, source=str(path))
        record = Record(chosen.mode, str(path), stat.S_IMODE(current.st.st_mode),
                        current.st.st_uid, current.st.st_gid, current.symlink,
                        _sha256(current.data), (chosen.content,) if chosen.content else (),
                        chosen.upstreams, chosen.link)
        _save(state, current.data, record)
    else:
        original = _backup(state, record)
        chosen = plan(original, symlink_target=record.symlink, dns_address=dns_address,
                      search=search, cluster_domain=cluster_domain, source=str(path))
        if chosen.mode is Mode.FILE:
            _check(path, state, record, original)
            if chosen.content not in record.written:
                record = dataclasses.replace(record, written=(*record.written, chosen.content))
                _save_record(state, record)
    if chosen.mode is Mode.RESOLVED:
        resolved.apply(chosen.link, chosen.commands)
    else:
        _write_ours(path, chosen.content)
    log.info("resolver: took over path=%s mode=%s dns=%s upstreams=%s", path,
             chosen.mode.value, dns_address,
             ",".join(format_address(u) for u in chosen.upstreams))
    return chosen


def restore(path: str | Path, state_dir: str | Path, *, resolved: Resolved | None = None
            ) -> bool:
    """Put the resolver configuration back as it was before `take_over`: True when
    something was put back, False when there was nothing to do."""
    path, state = Path(path), Path(state_dir)
    record = _load(state)
    if record is None:
        current = _read(path)
        if current.data is not None and current.data.startswith(MARKER):
            raise ResolverError(f"{path} was written by meshgate but its backup is missing "
                                f"from {state} ({RECORD}, {BACKUP}); write the VM's original "
                                f"resolvers back into {path} by hand")
        return False
    if record.mode is Mode.RESOLVED:
        (resolved if resolved is not None else ResolvedLink()).revert(record.link)
    else:
        original = _backup(state, record)
        if _check(path, state, record, original) is _Found.OURS:
            _put_back(path, record, original)
    _forget(state)
    log.info("resolver: restored path=%s mode=%s", path, record.mode.value)
    return True


def describe(path: str | Path, state_dir: str | Path) -> str:
    """One line for `vm status`: who the VM's resolver configuration belongs to."""
    path, state = Path(path), Path(state_dir)
    try:
        record = _load(state)
        if record is None:
            current = _read(path)
            if current.data is None:
                return f"dns: {path} is missing; meshgate has not changed it"
            if current.data.startswith(MARKER):
                return (f"dns: {path} was written by meshgate but its backup in {state} is "
                        f"missing; restore it by hand")
            conf = ResolvConf.parse(current.data, source=str(path))
            return (f"dns: {path} is not managed by meshgate "
                    f"(nameservers {' '.join(conf.nameservers) or 'none'})")
        upstreams = ",".join(format_address(u) for u in record.upstreams)
        if record.mode is Mode.RESOLVED:
            return (f"dns: systemd-resolved sends mesh names through link {record.link} "
                    f"to the mesh DNS server; other names to resolved (upstream {upstreams})")
        found = _check(path, state, record, _backup(state, record))
    except ResolverError as e:
        return f"dns: {e}"
    if found is _Found.OURS:
        return (f"dns: {path} points at the mesh DNS server, which forwards other names to "
                f"{upstreams}; original saved in {state / BACKUP}")
    return (f"dns: {path} is back to the original; the record in {state} is left from an "
            f"interrupted leave (`meshgate vm leave` completes it)")


# -- file operations --------------------------------------------------------------------


def _read(path: Path) -> _Current:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return _Current(None, None, None)
    except OSError as e:
        raise ResolverError(f"cannot read {path}: {e.strerror}") from e
    symlink = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    if symlink is None and not stat.S_ISREG(st.st_mode):
        raise ResolverError(f"{path} is neither a file nor a symlink; leave it to its owner")
    try:
        return _Current(path.read_bytes(), symlink, st)
    except FileNotFoundError:
        return _Current(None, symlink, st)
    except OSError as e:
        raise ResolverError(f"cannot read {path}: {e.strerror}") from e


def _check(path: Path, state: Path, record: Record, original: bytes) -> _Found:
    """Whether the file is still the original, or what meshgate wrote (or was writing
    when it stopped); anything else is refused."""
    current = _read(path)
    if record.symlink is not None and current.symlink == record.symlink:
        return _Found.ORIGINAL
    if record.symlink is None and current.symlink is None and current.data == original:
        return _Found.ORIGINAL
    if current.data is None and current.symlink is None and record.symlink is not None:
        return _Found.OURS  # stopped between removing the symlink and writing the file
    if current.symlink is None and current.data is not None and any(
            w.startswith(current.data) for w in record.written):
        return _Found.OURS
    raise ResolverError(f"{path} was changed by someone else since meshgate wrote it, so "
                        f"meshgate leaves it alone; the original is saved in {state / BACKUP}"
                        + (f" (a symlink to {record.symlink})" if record.symlink else "")
                        + f": put it back by hand if wanted, then remove {state / RECORD}")


def _write_ours(path: Path, content: bytes) -> None:
    if path.is_symlink():
        path.unlink()  # the daemon that owns the target would undo a change made there
        fsync_dir(path.parent)
    _write_in_place(path, content, perm=0o644)


def _put_back(path: Path, record: Record, original: bytes) -> None:
    if record.symlink is None:
        _write_in_place(path, original, perm=record.perm)
        os.chown(path, record.uid, record.gid, follow_symlinks=False)
        os.chmod(path, record.perm)
        return
    temporary = path.with_name(f".{path.name}.meshgate")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    os.symlink(record.symlink, temporary)
    os.chown(temporary, record.uid, record.gid, follow_symlinks=False)
    os.rename(temporary, path)  # a symlink cannot be a bind mount: rename is safe here
    fsync_dir(path.parent)


def _write_in_place(path: Path, data: bytes, *, perm: int) -> None:
    """Truncate and write the same inode: /etc/resolv.conf may be a bind mount."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, perm)
    except OSError as e:
        raise ResolverError(f"cannot write {path}: {e.strerror}") from e
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _load(state: Path) -> Record | None:
    try:
        data = (state / RECORD).read_bytes()
    except FileNotFoundError:
        return None
    return Record.from_json(data, state / RECORD)


def _backup(state: Path, record: Record) -> bytes:
    try:
        original = (state / BACKUP).read_bytes()
    except FileNotFoundError:
        raise ResolverError(f"the backup {state / BACKUP} of {record.path} is missing; "
                            f"write the VM's original resolvers back into {record.path} by "
                            f"hand, then remove {state / RECORD}") from None
    if _sha256(original) != record.original_sha256:
        raise ResolverError(f"the backup {state / BACKUP} of {record.path} does not match its "
                            f"checksum in {state / RECORD}; restore {record.path} by hand")
    return original


def _save(state: Path, original: bytes, record: Record) -> None:
    """The backup, then the record, each durable before the file is touched."""
    state.mkdir(parents=True, exist_ok=True)
    write_atomic(state / BACKUP, original, mode=0o600)
    _save_record(state, record)


def _save_record(state: Path, record: Record) -> None:
    write_atomic(state / RECORD, record.to_json(), mode=0o600)


def _forget(state: Path) -> None:
    """The record goes first: without it the backup is only a leftover. A write the
    agent was killed in the middle of leaves a temporary file: it goes too."""
    for name in (RECORD, BACKUP):
        with contextlib.suppress(FileNotFoundError):
            (state / name).unlink()
        fsync_dir(state)
    discard_partial_writes(state)
