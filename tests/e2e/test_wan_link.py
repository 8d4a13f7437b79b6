"""Distance and partitions on a WAN, in real namespaces, through localcluster.wanlink and
`meshgate cluster wan`.

The WAN is made the cheapest way (as in test_vms): two throwaway node namespaces
attached as clusters, and a third joined as a VM, with no cluster processes. Every
namespace is named after a random suffix; fixtures remove what the tests made even
when they fail, and the module checks that the host's links, routes and qdiscs are as
they were. On a kernel built without netem, the netem test checks instead that asking for
it is refused by name and changes nothing (this machine's kernel is one).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from localcluster import namespaces, wan, wanlink
from localcluster.wan import Netem
from tests.cluster import wait_for

ROOT = Path(__file__).resolve().parents[2]
WAN_CIDR = IPv4Network("172.29.91.0/24")
POD_CIDR = IPv4Network("10.237.0.0/16")
SERVICE_CIDR = IPv4Network("10.236.0.0/16")
CUT = 1.5
"""Seconds a connection is given across a partition before it counts as cut off."""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")


def _snapshot() -> tuple[Any, ...]:
    with IPRoute() as ipr:
        links = sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links())
        routes = sorted(str((r.get_attr("RTA_TABLE"), r.get_attr("RTA_DST"), r["dst_len"]))
                        for r in ipr.get_routes(table=0))
        qdiscs = sorted(str((q["index"], q.get_attr("TCA_KIND"))) for q in ipr.get_qdiscs())
    return links, routes, qdiscs


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    run = tmp_path_factory.mktemp("wanlink-run")
    before = _snapshot()
    previous = os.environ.get("MESHGATE_RUN_DIR")
    os.environ["MESHGATE_RUN_DIR"] = str(run)
    try:
        yield run
    finally:
        if previous is None:
            del os.environ["MESHGATE_RUN_DIR"]
        else:
            os.environ["MESHGATE_RUN_DIR"] = previous
        assert _snapshot() == before


def _netem_available(suffix: str) -> bool:
    """Whether this kernel has netem, tried on a veth in a namespace of our own."""
    probe = f"mgt-{suffix}-probe"
    namespaces.create(probe, "the netem probe")
    try:
        with namespaces.iproute(probe, "probe netem") as ipr:
            ipr.link("add", ifname="p0", kind="veth", peer="p1")
            index = namespaces.link_index(ipr, "p0")
            try:
                ipr.tc("replace", kind="netem", index=index, delay=1000)
            except Exception as e:  # the kernel's answer is what is probed
                if getattr(e, "code", None) == errno.ENOENT:
                    return False
                raise
            return True
    finally:
        namespaces.delete(probe)


@dataclass(frozen=True)
class Lan:
    name: str
    a: str
    """A cluster's name; its node namespace is `a_netns`."""
    a_netns: str
    b: str
    b_netns: str
    b_address: IPv4Address
    vm: str
    vm_netns: str
    vm_address: IPv4Address
    netem: bool


def _bare(netns: str) -> None:
    namespaces.create(netns, "the WAN link tests")
    with namespaces.iproute(netns, "bring up lo for the WAN link tests") as ipr:
        ipr.link("set", index=namespaces.link_index(ipr, "lo"), state="up")


@pytest.fixture(scope="module")
def lan(run_dir: Path) -> Iterator[Lan]:
    suffix = secrets.token_hex(3)
    name, a, b, vm = f"mgt-{suffix}-wan", f"a{suffix}", f"b{suffix}", f"v{suffix}"
    a_netns, b_netns, vm_netns = (f"mgt-{suffix}-{x}" for x in ("a", "b", "v"))
    try:
        netem = _netem_available(suffix)
        for netns in (a_netns, b_netns, vm_netns):
            _bare(netns)
        wan.attach(a, node_netns=a_netns, pod_cidr=POD_CIDR, service_cidr=SERVICE_CIDR,
                   wan=name, cidr=WAN_CIDR)
        b_at = wan.attach(b, node_netns=b_netns, pod_cidr=POD_CIDR,
                          service_cidr=SERVICE_CIDR, wan=name)
        vm_at = wan.join_vm(vm, netns=vm_netns, wan=name)
        yield Lan(name=name, a=a, a_netns=a_netns, b=b, b_netns=b_netns,
                  b_address=b_at.address.ip, vm=vm, vm_netns=vm_netns,
                  vm_address=vm_at.address.ip, netem=netem)
    finally:
        try:
            wan.leave_vm(vm, wan=name)
            wan.detach(a, wan=name)
            wan.detach(b, wan=name)
        finally:
            for leftover in (n for n in pyroute2_netns.listnetns() if suffix in n):
                pyroute2_netns.remove(leftover)
        assert not (run_dir / "wan" / name / "wan.json").exists()


@pytest.fixture
def clean(lan: Lan) -> Iterator[Lan]:
    """The LAN with every member healed and without netem after the test, pass or fail."""
    try:
        yield lan
    finally:
        for member in (f"cluster/{lan.a}", f"cluster/{lan.b}", f"vm/{lan.vm}"):
            wanlink.heal(lan.name, member)
            wanlink.set_link(lan.name, member, delay_ms=0, loss_pct=0)


@contextlib.contextmanager
def _server(netns: str, address: IPv4Address) -> Iterator[tuple[socket.socket, int]]:
    server = namespaces.socket_in_namespace(netns)
    try:
        server.bind((str(address), 0))
        server.listen(8)
        yield server, server.getsockname()[1]
    finally:
        server.close()


def _connect(netns: str, address: IPv4Address, port: int, timeout: float) -> socket.socket:
    client = namespaces.socket_in_namespace(netns)
    client.settimeout(timeout)
    try:
        client.connect((str(address), port))
    except BaseException:
        client.close()
        raise
    return client


def _connect_time(netns: str, address: IPv4Address, port: int) -> float:
    start = time.monotonic()
    _connect(netns, address, port, 10).close()
    return time.monotonic() - start


def _cut_off(netns: str, address: IPv4Address, port: int) -> None:
    """A connection is neither made nor refused: it times out (or, once the neighbour
    entry has failed, finds no route)."""
    with pytest.raises(OSError) as failed:
        _connect(netns, address, port, CUT).close()
    assert isinstance(failed.value, TimeoutError) or failed.value.errno in (
        errno.EHOSTUNREACH, errno.ENETUNREACH), failed.value


def _peer_up(lan: Lan, peer_of: str) -> bool:
    peer = next(m.peer for m in wan.member_refs(lan.name) if m.name == peer_of)
    with namespaces.iproute(lan.name, "look at a peer") as ipr:
        link = ipr.get_links(namespaces.link_index(ipr, peer))[0]
        return bool(link["flags"] & 1)


def _root_qdisc(netns: str, ifname: str) -> str | None:
    with namespaces.iproute(netns, "look at a qdisc") as ipr:
        index = namespaces.link_index(ipr, ifname)
        roots = [q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index=index)
                 if q["parent"] == wanlink.TC_H_ROOT]
    return roots[0] if roots else None


def _meshgate(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], env=env, text=True,
                          capture_output=True, timeout=60, check=False, cwd=ROOT)


# ------------------------------------------------------------------------------ show


def test_show_lists_clusters_then_vms_with_address_netem_and_partition(lan: Lan) -> None:
    shown = wanlink.show(lan.name)
    clusters = sorted([("cluster", lan.a), ("cluster", lan.b)])
    assert [(m.kind, m.name) for m in shown] == [*clusters, ("vm", lan.vm)]
    assert all(m.netem.empty and not m.partitioned for m in shown)
    out = _meshgate("cluster", "wan", "show", "--wan", lan.name)
    assert out.returncode == 0, out.stderr
    assert f"vm\t{lan.vm}\t{lan.vm_address}\tnone\tconnected" in out.stdout.splitlines()


def test_an_unknown_member_is_named_with_the_members_there_are(lan: Lan) -> None:
    with pytest.raises(wanlink.UnknownMemberError, match=f"has no member 'nope'; its "
                       f"members: cluster '{sorted([lan.a, lan.b])[0]}'"):
        wanlink.partition(lan.name, "nope")
    out = _meshgate("cluster", "wan", "heal", "--wan", lan.name, "--name", "nope")
    assert out.returncode != 0 and f"VM '{lan.vm}' ({lan.vm_address})" in out.stderr


# ------------------------------------------------------------------------------ partitions


def test_a_partition_cuts_a_member_off_silently_and_heal_resumes_its_connections(
        clean: Lan) -> None:
    lan = clean
    with _server(lan.b_netns, lan.b_address) as (server, port):
        client = _connect(lan.a_netns, lan.b_address, port, 5)
        accepted, _ = server.accept()
        with client, accepted:
            wanlink.partition(lan.name, lan.b)
            assert not _peer_up(lan, lan.b)
            assert [m.partitioned for m in wanlink.show(lan.name) if m.name == lan.b] == [True]
            client.sendall(b"across")
            accepted.settimeout(CUT)
            with pytest.raises(TimeoutError):
                accepted.recv(16)
            client.settimeout(0.5)
            with pytest.raises(TimeoutError):  # no reset: the connection just waits
                client.recv(16)
            _cut_off(lan.a_netns, lan.b_address, port)

            wanlink.heal(lan.name, lan.b)
            assert _peer_up(lan, lan.b)
            accepted.settimeout(30)  # TCP retransmits what the partition swallowed
            assert accepted.recv(16) == b"across"
            _connect(lan.a_netns, lan.b_address, port, 5).close()


def test_a_vm_is_partitioned_and_healed_from_the_command_line(clean: Lan) -> None:
    lan = clean
    with _server(lan.vm_netns, lan.vm_address) as (_, port):
        _connect(lan.a_netns, lan.vm_address, port, 5).close()
        out = _meshgate("cluster", "wan", "partition", "--wan", lan.name, "--name", lan.vm)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\t")[-1].strip() == "partitioned"
        record = json.loads((Path(os.environ["MESHGATE_RUN_DIR"]) / "wan" / lan.name /
                             "wan.json").read_text())
        assert record["vms"][lan.vm]["partitioned"] is True
        _cut_off(lan.a_netns, lan.vm_address, port)
        out = _meshgate("cluster", "wan", "heal", "--wan", lan.name, "--name", f"vm/{lan.vm}")
        assert out.returncode == 0, out.stderr
        wait_for(lambda: _reaches(lan.a_netns, lan.vm_address, port), timeout=15,
                 what="the healed VM answering")


def _reaches(netns: str, address: IPv4Address, port: int) -> bool:
    try:
        _connect(netns, address, port, 1).close()
    except OSError:
        return False
    return True


def test_a_partitioned_member_is_made_again_partitioned(clean: Lan) -> None:
    lan = clean
    wanlink.partition(lan.name, lan.b)
    b = next(m for m in wan.member_refs(lan.name) if m.name == lan.b)
    with namespaces.iproute(b.node_netns, "remove b's link") as ipr:
        ipr.link("del", index=namespaces.link_index(ipr, "wan0"))
    wan.attach(lan.b, node_netns=lan.b_netns, pod_cidr=POD_CIDR, service_cidr=SERVICE_CIDR,
               wan=lan.name)  # as `cluster up` again does
    assert not _peer_up(lan, lan.b)
    assert wanlink.converge(lan.name, f"cluster/{lan.b}").partitioned


# ------------------------------------------------------------------------------ netem


def test_clearing_settings_works_on_any_kernel_and_leaves_no_qdisc(clean: Lan) -> None:
    lan = clean
    ref = wanlink.set_link(lan.name, lan.a, delay_ms=0, jitter_ms=0, loss_pct=0)
    assert ref.netem.empty
    assert _root_qdisc(lan.a_netns, "wan0") != "netem"


def test_netem_delays_drops_and_survives_a_partition_or_is_refused_by_name(
        clean: Lan) -> None:
    """On a kernel with netem: delay each way, loss, netem kept across heal. On one
    without (CONFIG_NET_SCH_NETEM unset): asking for it is refused by name and
    changes nothing. Either way the test asserts what a user of this kernel sees."""
    lan = clean
    if not lan.netem:
        with pytest.raises(wanlink.NetemUnavailableError, match="CONFIG_NET_SCH_NETEM"):
            wanlink.set_link(lan.name, lan.a, delay_ms=30)
        assert [m.netem for m in wanlink.show(lan.name) if m.name == lan.a] == [Netem()]
        assert _root_qdisc(lan.a_netns, "wan0") != "netem"
        out = _meshgate("cluster", "wan", "set", "--wan", lan.name, "--name", lan.a,
                        "--delay", "30ms")
        assert out.returncode == 2 and "CONFIG_NET_SCH_NETEM" in out.stderr
        return
    _delay_each_way_and_cleared(lan)
    _loss_of_everything_leaves_the_link_up(lan)
    _netem_kept_when_healed(lan)


def _delay_each_way_and_cleared(lan: Lan) -> None:
    with _server(lan.b_netns, lan.b_address) as (_, port):
        before = min(_connect_time(lan.a_netns, lan.b_address, port) for _ in range(3))
        out = _meshgate("cluster", "wan", "set", "--wan", lan.name, "--name", lan.a,
                        "--delay", "50ms", "--jitter", "1ms")
        assert out.returncode == 0, out.stderr
        assert "delay 50ms 1ms" in out.stdout
        assert _root_qdisc(lan.a_netns, "wan0") == "netem"
        # SYN out through a's side, SYN-ACK back through the WAN's: twice 50ms.
        assert _connect_time(lan.a_netns, lan.b_address, port) >= 0.090
        wanlink.set_link(lan.name, lan.b, delay_ms=20)
        assert _connect_time(lan.a_netns, lan.b_address, port) >= 0.130
        assert {m.name: m.netem.delay_ms for m in wanlink.show(lan.name)
                if m.kind == "cluster"} == {lan.a: 50.0, lan.b: 20.0}

        wanlink.set_link(lan.name, lan.a, delay_ms=0)
        wanlink.set_link(lan.name, lan.b, delay_ms=0)
        assert _root_qdisc(lan.a_netns, "wan0") != "netem"
        assert min(_connect_time(lan.a_netns, lan.b_address, port)
                   for _ in range(3)) < before + 0.040


def _loss_of_everything_leaves_the_link_up(lan: Lan) -> None:
    with _server(lan.b_netns, lan.b_address) as (_, port):
        wanlink.set_link(lan.name, lan.b, loss_pct=100)
        assert _peer_up(lan, lan.b)
        assert [m.partitioned for m in wanlink.show(lan.name) if m.name == lan.b] == [False]
        _cut_off(lan.a_netns, lan.b_address, port)
        wanlink.set_link(lan.name, lan.b, loss_pct=0)
        _connect(lan.a_netns, lan.b_address, port, 5).close()


def _netem_kept_when_healed(lan: Lan) -> None:
    wanlink.set_link(lan.name, lan.b, delay_ms=40, loss_pct=0.5)
    wanlink.partition(lan.name, lan.b)
    healed = wanlink.heal(lan.name, lan.b)
    assert healed.netem == Netem(delay_ms=40, loss_pct=0.5) and not healed.partitioned
    assert _root_qdisc(lan.b_netns, "wan0") == "netem"
    assert _root_qdisc(lan.name, healed.peer) == "netem"
