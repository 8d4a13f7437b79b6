"""A VM's planning, without namespaces: names, /etc/hosts, the mounts that give it its
private paths, and the command line that enters it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pytest

from localcluster.vms import (
    PRIVATE,
    Private,
    check_name,
    hosts_text,
    netns_name,
    plan_mounts,
    wrap,
)
from mesh.errors import ConfigError

STATE = Path("/run/meshgate/vms/db")
HOST = {PurePosixPath(p) for p in ("/", "/etc", "/etc/resolv.conf", "/etc/hosts",
                                   "/etc/hostname", "/etc/systemd", "/etc/systemd/system",
                                   "/var", "/var/lib")}


def _exists(paths: set[PurePosixPath]) -> Callable[[PurePosixPath], bool]:
    return lambda p: p in paths


@pytest.mark.parametrize("name", ["db", "vm-1", "a" * 32])
def test_good_names(name: str) -> None:
    assert check_name(name) == name
    assert netns_name(name) == f"mg-vm-{name}"


@pytest.mark.parametrize("name", ["", "-db", "db-", "DB", "db_1", "a" * 33, "../x"])
def test_bad_names_are_refused_saying_what_a_name_may_be(name: str) -> None:
    with pytest.raises(ConfigError, match="lower-case letters, digits"):
        check_name(name)


def test_hosts_names_localhost_and_the_vm_at_its_wan_address() -> None:
    from ipaddress import IPv4Address

    lines = hosts_text("db", IPv4Address("172.30.0.9")).splitlines()
    assert "127.0.0.1\tlocalhost" in lines and "172.30.0.9\tdb" in lines


def test_every_private_path_the_host_has_is_a_bind_of_the_vms_copy() -> None:
    plan = plan_mounts(STATE, PRIVATE, _exists(HOST | {PurePosixPath("/var/lib/meshgate")}))
    assert plan.overlays == () and plan.placeholders == ()
    assert plan.binds == tuple((STATE / "root" / str(p.path)[1:], p.path) for p in PRIVATE)


def test_a_path_the_host_lacks_is_made_in_an_overlay_of_its_parent() -> None:
    plan = plan_mounts(STATE, PRIVATE, _exists(HOST))
    [overlay] = plan.overlays
    assert overlay.lower == PurePosixPath("/var/lib")
    assert overlay.upper == STATE / "overlay" / "var-lib" / "upper"
    assert overlay.work == STATE / "overlay" / "var-lib" / "work"
    assert plan.placeholders == ((overlay.upper / "meshgate", True),)
    # The overlay comes first in the script, the bind over what it made after it.
    script = plan.script().splitlines()
    overlay_line = next(i for i, line in enumerate(script) if "overlay" in line)
    bind_line = next(i for i, line in enumerate(script) if line.endswith(" /var/lib/meshgate"))
    assert overlay_line < bind_line


def test_missing_parents_are_made_too_and_a_missing_file_is_a_file() -> None:
    private = (Private(PurePosixPath("/etc/systemd/system"), directory=True),
               Private(PurePosixPath("/etc/hostname"), directory=False))
    plan = plan_mounts(STATE, private, _exists({PurePosixPath("/"), PurePosixPath("/etc")}))
    [overlay] = plan.overlays
    assert overlay.lower == PurePosixPath("/etc")
    assert plan.placeholders == ((overlay.upper / "systemd", True),
                                 (overlay.upper / "systemd" / "system", True),
                                 (overlay.upper / "hostname", False))


def test_nested_overlays_are_mounted_outermost_first() -> None:
    private = (Private(PurePosixPath("/etc/a/b/c"), directory=True),
               Private(PurePosixPath("/etc/x"), directory=False))
    plan = plan_mounts(STATE, private, _exists({PurePosixPath("/"), PurePosixPath("/etc"),
                                                PurePosixPath("/etc/a")}))
    assert [o.lower for o in plan.overlays] == [PurePosixPath("/etc"), PurePosixPath("/etc/a")]


def test_a_path_with_no_existing_parent_but_the_root_is_refused() -> None:
    with pytest.raises(ConfigError, match="none of its parent directories"):
        plan_mounts(STATE, PRIVATE, _exists({PurePosixPath("/")}))


def test_a_state_dir_an_overlay_cannot_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="MESHGATE_RUN_DIR"):
        plan_mounts(Path("/tmp/a,b/vms/db"), PRIVATE, _exists(HOST))


def test_the_script_drops_namespace_mounts_first_and_mounts_sysfs_last() -> None:
    script = plan_mounts(STATE, PRIVATE, _exists(HOST)).script().splitlines()
    assert script[0] == "set -e" and "nsfs" in script[1] and "umount -l" in script[1]
    assert script[-1] == "mount -t sysfs sysfs /sys"


def test_exec_enters_both_namespaces_from_the_root() -> None:
    argv = wrap(["cat", "/etc/hosts"], nsenter="/usr/bin/nsenter",
                netns_path=Path("/run/netns/mg-vm-db"), mount_ns=STATE / "mnt")
    assert argv == ["/usr/bin/nsenter", "--net=/run/netns/mg-vm-db", f"--mount={STATE}/mnt",
                    "--wd=/", "--", "cat", "/etc/hosts"]
    with pytest.raises(ConfigError, match="no command"):
        wrap([], nsenter="nsenter", netns_path=Path("/x"), mount_ns=Path("/y"))
