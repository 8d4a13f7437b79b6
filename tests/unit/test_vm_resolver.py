"""The VM's resolver configuration on temporary files: parsing, the plan for a
plain file, a symlink and systemd-resolved's stub, restore byte for byte, and
restore after a crash at each step of taking over."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from mesh.errors import ResolverError
from vm_agent import resolver
from vm_agent.resolver import BACKUP, RECORD, Mode, ResolvConf, mesh_search, plan

ORIGINAL = (b"# written by the cloud image\n"
            b"nameserver 10.0.0.2\n"
            b"nameserver fd00::2\n"
            b"search corp.example eu.corp.example\n"
            b"options ndots:2 timeout:1 # keep\n"
            b"; another comment\n")
SEARCH = mesh_search("default")


class FakeResolved:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple[tuple[str, ...], ...]]] = []

    def apply(self, link: str, commands: Sequence[Sequence[str]]) -> None:
        self.calls.append(("apply", link, tuple(tuple(c) for c in commands)))

    def revert(self, link: str) -> None:
        self.calls.append(("revert", link, ()))


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "resolv.conf"
    path.parent.mkdir()
    path.write_bytes(ORIGINAL)
    path.chmod(0o640)
    return path


def take_over(path: Path, state: Path, resolved: FakeResolved | None = None
              ) -> resolver.Plan:
    return resolver.take_over(path, state, dns_address="127.0.0.153", search=SEARCH,
                              resolved=resolved or FakeResolved())


def test_parse_follows_glibc() -> None:
    parsed = ResolvConf.parse(ORIGINAL + b"domain last.example\nsortlist 10.0.0.0\n")
    assert parsed.nameservers == ("10.0.0.2", "fd00::2")
    assert parsed.search == ("last.example",)  # the last search or domain line wins
    assert parsed.options == ("ndots:2", "timeout:1", "#", "keep")
    assert parsed.lines[0] == "# written by the cloud image" and len(parsed.lines) == 8
    assert ResolvConf.parse(b"nameserver fe80::1%eth0\n").nameservers == ("fe80::1%eth0",)


@pytest.mark.parametrize("text, message", [
    (b"search a\nnameserver\n", "line 2: nameserver with no address"),
    (b"nameserver dns.example.com\n", "line 1: nameserver 'dns.example.com' is not an IP"),
    (b"# ok\n\nsearch\n", "line 3: 'search' with no domain"),
    (b"nameserver 10.0.0.1\n\xff\xfe\n", "line 2: not UTF-8"),
])
def test_parse_errors_name_the_line(text: bytes, message: str) -> None:
    with pytest.raises(ResolverError, match=message):
        ResolvConf.parse(text, source="/etc/resolv.conf")


def test_plan_for_a_file_puts_the_mesh_first_and_keeps_the_rest() -> None:
    chosen = plan(ORIGINAL, symlink_target=None, dns_address="127.0.0.153", search=SEARCH)
    assert chosen.mode is Mode.FILE
    assert chosen.upstreams == (("10.0.0.2", 53), ("fd00::2", 53))
    written = ResolvConf.parse(chosen.content)
    assert written.nameservers == ("127.0.0.153",)
    assert written.search == ("default.svc.cluster.local", "svc.cluster.local", "cluster.local",
                              "corp.example", "eu.corp.example")
    assert written.options == ("ndots:2", "timeout:1", "#", "keep")
    assert "# written by the cloud image" in written.lines and "; another comment" in written.lines
    assert chosen.content.startswith(resolver.MARKER)


@pytest.mark.parametrize("text, target", [
    (b"nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n", None),
    (b"nameserver 127.0.0.53\n", "/run/systemd/resolve/stub-resolv.conf"),
    (b"nameserver 127.0.0.53\n", "../run/systemd/resolve/stub-resolv.conf"),
])
def test_plan_for_the_resolved_stub_routes_the_domain_on_a_link(text: bytes,
                                                              target: str | None) -> None:
    chosen = plan(text, symlink_target=target, dns_address="127.0.0.153", search=SEARCH)
    assert chosen.mode is Mode.RESOLVED and chosen.content == b""
    assert chosen.upstreams == (("127.0.0.53", 53),)
    assert chosen.commands == (
        ("resolvectl", "dns", "meshgate-dns", "127.0.0.153"),
        ("resolvectl", "domain", "meshgate-dns", "default.svc.cluster.local",
         "svc.cluster.local", "cluster.local", "~cluster.local"),
        ("resolvectl", "default-route", "meshgate-dns", "false"),
    )
    assert resolver.revert_command("meshgate-dns") == ("resolvectl", "revert", "meshgate-dns")


def test_plan_for_resolved_uplink_file_is_a_file() -> None:
    # /run/systemd/resolve/resolv.conf lists the real servers: glibc bypasses resolved.
    chosen = plan(b"nameserver 192.0.2.1\n", symlink_target="/run/systemd/resolve/resolv.conf",
                  dns_address="127.0.0.153", search=SEARCH)
    assert chosen.mode is Mode.FILE and chosen.upstreams == (("192.0.2.1", 53),)


def test_plan_refuses_a_file_without_nameservers_or_already_pointing_at_the_mesh() -> None:
    with pytest.raises(ResolverError, match="no nameserver"):
        plan(b"search x\n", symlink_target=None, dns_address="127.0.0.153", search=SEARCH)
    with pytest.raises(ResolverError, match="already lists the mesh DNS server"):
        plan(b"nameserver 127.0.0.153\n", symlink_target=None, dns_address="127.0.0.153",
             search=SEARCH)


def test_take_over_writes_in_place_and_restore_is_byte_for_byte(conf: Path,
                                                                 tmp_path: Path) -> None:
    state = tmp_path / "state"
    inode = conf.stat().st_ino
    chosen = take_over(conf, state)
    assert conf.read_bytes() == chosen.content and conf.stat().st_ino == inode
    assert (state / BACKUP).read_bytes() == ORIGINAL
    assert "points at the mesh DNS server" in resolver.describe(conf, state)
    assert take_over(conf, state) == chosen  # an agent restart
    assert resolver.restore(conf, state) is True
    assert conf.read_bytes() == ORIGINAL and conf.stat().st_ino == inode
    assert conf.stat().st_mode & 0o777 == 0o640
    assert not (state / BACKUP).exists() and not (state / RECORD).exists()
    assert resolver.restore(conf, state) is False  # idempotent
    assert "not managed by meshgate" in resolver.describe(conf, state)


def test_a_symlink_is_replaced_by_a_file_and_put_back(tmp_path: Path) -> None:
    target = tmp_path / "run" / "resolv.conf"
    target.parent.mkdir()
    target.write_bytes(ORIGINAL)
    link = tmp_path / "resolv.conf"
    link.symlink_to(target)
    state = tmp_path / "state"
    take_over(link, state)
    assert not link.is_symlink() and target.read_bytes() == ORIGINAL
    assert resolver.restore(link, state)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == ORIGINAL
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_resolved_stub_is_left_alone_and_the_link_reverted(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    stub = b"nameserver 127.0.0.53\noptions edns0 trust-ad\n"
    path.write_bytes(stub)
    fake = FakeResolved()
    chosen = take_over(path, tmp_path / "state", fake)
    assert path.read_bytes() == stub
    assert fake.calls == [("apply", "meshgate-dns", chosen.commands)]
    assert "systemd-resolved" in resolver.describe(path, tmp_path / "state")
    assert resolver.restore(path, tmp_path / "state", resolved=fake)
    assert fake.calls[-1] == ("revert", "meshgate-dns", ())


def test_restore_refuses_a_file_changed_by_someone_else(conf: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    take_over(conf, state)
    conf.write_bytes(b"nameserver 192.0.2.99\n")
    with pytest.raises(ResolverError, match=f"changed by someone else.*{state / BACKUP}"):
        resolver.restore(conf, state)
    assert conf.read_bytes() == b"nameserver 192.0.2.99\n"
    assert (state / BACKUP).read_bytes() == ORIGINAL
    assert "changed by someone else" in resolver.describe(conf, state)


def test_restore_refuses_when_the_backup_is_missing(conf: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    take_over(conf, state)
    (state / BACKUP).unlink()
    with pytest.raises(ResolverError, match=f"backup {state / BACKUP} .* is missing"):
        resolver.restore(conf, state)
    (state / RECORD).unlink()
    with pytest.raises(ResolverError, match="backup is missing"):
        resolver.restore(conf, state)


def crash_points(content: bytes) -> list[bytes]:
    """What the file may hold if the machine stops while it is written."""
    return [b"", content[:1], content[: len(content) // 2], content]


@pytest.mark.parametrize("step", range(4))
def test_restore_after_a_crash_while_writing(conf: Path, tmp_path: Path, step: int) -> None:
    state = tmp_path / "state"
    content = take_over(conf, state).content
    conf.write_bytes(crash_points(content)[step])
    assert resolver.restore(conf, state)
    assert conf.read_bytes() == ORIGINAL


def test_restore_after_a_crash_before_the_file_was_touched(conf: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    take_over(conf, state)
    conf.write_bytes(ORIGINAL)  # the record was saved, the file not yet written
    assert resolver.restore(conf, state) and conf.read_bytes() == ORIGINAL
    assert not (state / RECORD).exists()
    # Saved the backup but not the record: nothing was touched, nothing to restore.
    state.mkdir(exist_ok=True)
    (state / BACKUP).write_bytes(ORIGINAL)
    assert resolver.restore(conf, state) is False and conf.read_bytes() == ORIGINAL


def test_restore_after_a_crash_between_removing_the_symlink_and_writing(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.write_bytes(ORIGINAL)
    link = tmp_path / "resolv.conf"
    link.symlink_to(target)
    state = tmp_path / "state"
    take_over(link, state)
    link.unlink()
    assert "points at the mesh" in resolver.describe(link, state)
    assert resolver.restore(link, state) and os.readlink(link) == str(target)


def test_take_over_again_after_a_crash_and_with_another_namespace(conf: Path,
                                                                  tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = take_over(conf, state)
    conf.write_bytes(first.content[:10])
    assert take_over(conf, state).content == first.content
    second = resolver.take_over(conf, state, dns_address="127.0.0.153",
                                search=mesh_search("prod"), resolved=FakeResolved())
    assert b"search prod.svc.cluster.local" in conf.read_bytes()
    assert second.upstreams == first.upstreams  # from the backup, not from our own file
    conf.write_bytes(first.content)  # e.g. a crash between the record and the write
    assert resolver.restore(conf, state) and conf.read_bytes() == ORIGINAL


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ResolverError, match="does not exist"):
        take_over(tmp_path / "resolv.conf", tmp_path / "state")


def test_restore_also_removes_what_a_killed_write_left(conf: Path, tmp_path: Path) -> None:
    """A join killed between write_atomic's temporary file and its rename leaves
    `.NAME.*.tmp` behind; undoing the take-over leaves the state directory empty."""
    state = tmp_path / "state"
    take_over(conf, state)
    (state / f".{RECORD}.x1y2.tmp").write_bytes(b"half a record")
    assert resolver.restore(conf, state) is True
    assert conf.read_bytes() == ORIGINAL
    assert list(state.iterdir()) == []
