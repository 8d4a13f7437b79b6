"""VMs on the WAN, in real namespaces: addresses, private files, reachability, exec and
delete, through localcluster.vms and `meshgate cluster vm`.

The WAN is made the cheapest way: a throwaway node namespace attached as a cluster
(no cluster processes). Every namespace is named after a random suffix; fixtures
remove what the tests made even when they fail, and the module checks that the
host's links, routes, files and mounts are as they were.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from localcluster import namespaces, vms, wan
from tests.cluster import wait_for

ROOT = Path(__file__).resolve().parents[2]
WAN_CIDR = IPv4Network("172.29.77.0/24")
POD_CIDR = IPv4Network("10.239.0.0/16")
SERVICE_CIDR = IPv4Network("10.238.0.0/16")
HOST_FILES = ("/etc/resolv.conf", "/etc/hosts", "/etc/hostname")
TIMEOUT = 5.0


def _suffix() -> str:
    return secrets.token_hex(3)


def _snapshot(run: Path) -> tuple[Any, ...]:
    with IPRoute() as ipr:
        links = sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links())
        routes = sorted(str((r.get_attr("RTA_TABLE"), r.get_attr("RTA_DST"), r["dst_len"]))
                        for r in ipr.get_routes(table=0))
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if " /etc" in line or " /var/lib" in line or str(run) in line]
    units = sorted(os.listdir("/etc/systemd/system"))
    return (links, routes, [Path(f).read_bytes() for f in HOST_FILES], mounts, units,
            os.path.lexists("/var/lib/meshgate"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    run = tmp_path_factory.mktemp("vms-run")
    before = _snapshot(run)
    previous = os.environ.get("MESHGATE_RUN_DIR")
    os.environ["MESHGATE_RUN_DIR"] = str(run)
    try:
        yield run
    finally:
        for vm in vms.list_vms():
            vms.delete(vm.name)
        if previous is None:
            del os.environ["MESHGATE_RUN_DIR"]
        else:
            os.environ["MESHGATE_RUN_DIR"] = previous
        assert _snapshot(run) == before


@dataclass(frozen=True)
class Wan:
    name: str
    node_netns: str
    node_cluster: str
    node_address: IPv4Address
    pod_address: IPv4Address
    """An address in the node's pod CIDR (on its bridge), which VMs must not reach."""


def _node(netns: str) -> None:
    namespaces.create(netns, "the VM tests")
    with namespaces.iproute(netns, "build a node for the VM tests") as ipr:
        ipr.link("set", index=namespaces.link_index(ipr, "lo"), state="up")
        ipr.link("add", ifname="mgbr0", kind="bridge")
        bridge = namespaces.link_index(ipr, "mgbr0")
        ipr.addr("add", index=bridge, address=str(POD_CIDR.network_address + 1),
                 prefixlen=POD_CIDR.prefixlen)
        ipr.link("set", index=bridge, state="up")


@pytest.fixture(scope="module")
def lan(run_dir: Path) -> Iterator[Wan]:
    suffix = _suffix()
    name, node, cluster = f"mgt-{suffix}-wan", f"mgt-{suffix}-node", f"n{suffix}"
    try:
        _node(node)
        attached = wan.attach(cluster, node_netns=node, pod_cidr=POD_CIDR,
                              service_cidr=SERVICE_CIDR, wan=name, cidr=WAN_CIDR)
        yield Wan(name=name, node_netns=node, node_cluster=cluster,
                  node_address=attached.address.ip, pod_address=POD_CIDR.network_address + 1)
    finally:
        try:
            for vm in vms.list_vms():
                vms.delete(vm.name)
            wan.detach(cluster, wan=name)
        finally:
            namespaces.delete(node)
            for leftover in (n for n in pyroute2_netns.listnetns() if suffix in n):
                pyroute2_netns.remove(leftover)


@pytest.fixture
def vm(lan: Wan) -> Iterator[vms.Vm]:
    name = f"t{_suffix()}"
    try:
        yield vms.create(name, wan=lan.name)
    finally:
        vms.delete(name)


def _in(vm: vms.Vm, *argv: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(vms.exec_argv(vm.name, argv), input=input, capture_output=True,
                          timeout=30, check=False)


def _meshgate(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], input=input, env=env,
                          capture_output=True, timeout=60, check=False, cwd=ROOT)


def _python_in(vm: vms.Vm, code: str, *args: str) -> str:
    proc = _in(vm, sys.executable, "-c", code, *args)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().strip()


# ------------------------------------------------------------------------------ the WAN


def test_the_vm_is_on_the_wan_at_its_own_address(lan: Wan, vm: vms.Vm) -> None:
    assert vm.address.network == WAN_CIDR and vm.address.ip != lan.node_address
    assert wan.vms(lan.name)[vm.name] == vm.address.ip
    assert vms.find(vm.name) == vm
    with IPRoute(netns=vm.netns, flags=0) as ipr:
        links = {link.get_attr("IFLA_IFNAME"): link for link in ipr.get_links()}
        assert set(links) == {"lo", "eth0"}
        assert all(link.get_attr("IFLA_OPERSTATE") in ("UP", "UNKNOWN")
                   for link in links.values())
        addresses = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)}
        assert addresses == {"127.0.0.1", str(vm.address.ip)}
        routes = {(r.get_attr("RTA_DST"), r["dst_len"]) for r in ipr.get_routes(
            family=socket.AF_INET, table=254)}
        assert routes == {(str(WAN_CIDR.network_address), WAN_CIDR.prefixlen)}


def test_the_vm_reaches_a_wan_member_but_no_pod(lan: Wan, vm: vms.Vm) -> None:
    with namespaces.socket_in_namespace(lan.node_netns) as listener:
        listener.settimeout(TIMEOUT)
        listener.bind((str(lan.node_address), 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = ("import socket, sys\n"
                "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
                "s.sendall(b'hello'); print(s.getsockname()[0])\n")
        assert _python_in(vm, code, str(lan.node_address), str(port)) == str(vm.address.ip)
        conn, peer = listener.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            assert conn.recv(5) == b"hello" and peer[0] == str(vm.address.ip)
    code = ("import socket, sys\n"
            "try:\n"
            "    socket.create_connection((sys.argv[1], 80), timeout=2)\n"
            "except OSError as e:\n"
            "    print(e.errno)\n")
    assert _python_in(vm, code, str(lan.pod_address)) == str(errno.ENETUNREACH)


def test_two_vms_get_distinct_addresses_and_reach_each_other(lan: Wan, vm: vms.Vm) -> None:
    other = vms.create(f"t{_suffix()}", wan=lan.name)
    try:
        assert other.address.ip not in (vm.address.ip, lan.node_address)
        assert {v.name for v in vms.list_vms()} >= {vm.name, other.name}
        with namespaces.socket_in_namespace(vm.netns) as listener:
            listener.settimeout(TIMEOUT)
            listener.bind((str(vm.address.ip), 0))
            listener.listen()
            port = listener.getsockname()[1]
            code = ("import socket, sys\n"
                    "socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n")
            _python_in(other, code, str(vm.address.ip), str(port))
            conn, peer = listener.accept()
            conn.close()
            assert peer[0] == str(other.address.ip)
    finally:
        vms.delete(other.name)
    assert other.name not in wan.vms(lan.name)


def test_an_address_in_use_is_refused_naming_its_holder(lan: Wan, vm: vms.Vm) -> None:
    name = f"t{_suffix()}"
    for taken, holder in ((lan.node_address, f"cluster '{lan.node_cluster}'"),
                          (vm.address.ip, f"VM '{vm.name}'")):
        proc = _meshgate("cluster", "vm", "create", "--name", name, "--wan", lan.name,
                         "--address", str(taken))
        assert proc.returncode == 2
        assert f"WAN address {taken} is in use by {holder}" in proc.stderr.decode()
        assert not namespaces.exists(vms.netns_name(name))
        assert not (vm.state_dir.parent / name).exists()
        assert name not in wan.vms(lan.name)


def test_a_vm_keeps_the_wan_up_after_the_last_cluster_leaves(run_dir: Path) -> None:
    suffix = _suffix()
    name, node, cluster = f"mgt-{suffix}-wan", f"mgt-{suffix}-node", f"n{suffix}"
    vm_name = f"t{suffix}"
    try:
        first = vms.create(vm_name, wan=name, wan_cidr=IPv4Network("172.29.78.0/24"))
        assert namespaces.exists(name) and first.address.ip == IPv4Address("172.29.78.1")
        _node(node)
        attached = wan.attach(cluster, node_netns=node, pod_cidr=POD_CIDR,
                              service_cidr=SERVICE_CIDR, wan=name)
        assert attached.address.ip == IPv4Address("172.29.78.2")
        wan.detach(cluster, wan=name)
        assert namespaces.exists(name) and wan.vms(name) == {vm_name: first.address.ip}
        vms.delete(vm_name)
        assert not namespaces.exists(name)
    finally:
        vms.delete(vm_name)
        wan.detach(cluster, wan=name)
        namespaces.delete(node)


# ------------------------------------------------------------------------------ files


def test_the_vm_starts_with_the_hosts_resolv_conf_and_its_own_hosts(vm: vms.Vm) -> None:
    host = Path("/etc/resolv.conf").read_bytes()
    assert _in(vm, "cat", "/etc/resolv.conf").stdout == host
    assert vm.private("/etc/resolv.conf").read_bytes() == host
    hosts = _in(vm, "cat", "/etc/hosts").stdout.decode().splitlines()
    assert "127.0.0.1\tlocalhost" in hosts and f"{vm.address.ip}\t{vm.name}" in hosts
    assert _in(vm, "cat", "/etc/hostname").stdout == f"{vm.name}\n".encode()
    assert _in(vm, "pwd").stdout == b"/\n"


def test_writes_in_the_vm_land_in_its_copies_not_on_the_host(vm: vms.Vm) -> None:
    before = {f: Path(f).read_bytes() for f in HOST_FILES}
    script = ("printf 'nameserver 192.0.2.53\\n' > /etc/resolv.conf\n"
              "printf '192.0.2.1 mesh\\n' >> /etc/hosts\n"
              "mkdir -p /var/lib/meshgate/identity && echo key > /var/lib/meshgate/identity/k\n"
              "printf '[Unit]\\n' > /etc/systemd/system/meshgate-vm.service\n")
    proc = _in(vm, "sh", "-ec", script)
    assert proc.returncode == 0, proc.stderr.decode()
    assert {f: Path(f).read_bytes() for f in HOST_FILES} == before
    assert vm.private("/etc/resolv.conf").read_bytes() == b"nameserver 192.0.2.53\n"
    assert vm.private("/etc/hosts").read_text().endswith("192.0.2.1 mesh\n")
    assert (vm.private("/var/lib/meshgate") / "identity" / "k").read_text() == "key\n"
    assert (vm.private("/etc/systemd/system") / "meshgate-vm.service").exists()
    assert not Path("/etc/systemd/system/meshgate-vm.service").exists()
    assert _in(vm, "cat", "/etc/resolv.conf").stdout == b"nameserver 192.0.2.53\n"


def test_replacing_a_private_file_by_rename_is_refused_as_in_a_container(vm: vms.Vm) -> None:
    code = ("import errno, os\n"
            "open('/etc/resolv.conf.new', 'w').write('x')\n"
            "try:\n"
            "    os.replace('/etc/resolv.conf.new', '/etc/resolv.conf')\n"
            "except OSError as e:\n"
            "    print(errno.errorcode[e.errno])\n"
            "finally:\n"
            "    os.unlink('/etc/resolv.conf.new')\n")
    assert _python_in(vm, code) == "EBUSY"


# ------------------------------------------------------------------------------ exec


def test_exec_passes_status_stdin_and_stdout_through(lan: Wan, vm: vms.Vm) -> None:
    proc = _meshgate("cluster", "vm", "exec", "--name", vm.name, "--", "sh", "-c", "exit 7")
    assert proc.returncode == 7
    proc = _meshgate("cluster", "vm", "exec", "--name", vm.name, "--", "cat", input=b"ping\n")
    assert proc.returncode == 0 and proc.stdout == b"ping\n"
    proc = _meshgate("cluster", "vm", "list")
    assert f"{vm.name}\t{vm.address.ip}\t{lan.name}\t{vm.netns}".encode() in proc.stdout


def test_exec_of_a_vm_that_does_not_exist_says_how_to_make_it(lan: Wan) -> None:
    proc = _meshgate("cluster", "vm", "exec", "--name", "nosuchvm", "--", "true")
    assert proc.returncode == 2
    assert b"no VM named 'nosuchvm'" in proc.stderr
    assert b"meshgate cluster vm create --name nosuchvm" in proc.stderr


# ------------------------------------------------------------------------------ delete


def test_delete_removes_everything_and_is_idempotent(lan: Wan, run_dir: Path) -> None:
    made = vms.create(f"t{_suffix()}", wan=lan.name)
    agent = subprocess.Popen(vms.exec_argv(made.name, ["sleep", "600"]),
                             start_new_session=True)
    # A process that ignores SIGTERM must be killed too.
    stubborn = subprocess.Popen(vms.exec_argv(made.name, ["sh", "-c",
                                                          "trap '' TERM; sleep 600"]),
                                start_new_session=True)
    try:
        wait_for(lambda: len(vms.processes_in(namespaces.namespace_path(made.netns),
                                              made.mount_ns)) >= 2, what="processes in the VM")
        with IPRoute(netns=lan.name, flags=0) as ipr:
            peers = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        assert wan.peer_name(WAN_CIDR, made.address.ip) in peers
        deleted = _meshgate("cluster", "vm", "delete", "--name", made.name)
        assert deleted.returncode == 0, deleted.stderr.decode()
        assert agent.wait(timeout=10) is not None and stubborn.wait(timeout=10) is not None
        assert not namespaces.exists(made.netns)
        assert not made.state_dir.exists()
        assert str(made.state_dir) not in Path("/proc/self/mountinfo").read_text()
        assert made.name not in wan.vms(lan.name)
        with IPRoute(netns=lan.name, flags=0) as ipr:
            peers = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        assert wan.peer_name(WAN_CIDR, made.address.ip) not in peers
        with pytest.raises(vms.VmNotFoundError, match=made.name):
            vms.find(made.name)
        again = _meshgate("cluster", "vm", "delete", "--name", made.name)
        assert again.returncode == 0, again.stderr.decode()
    finally:
        for child in (agent, stubborn):
            child.kill()
            child.wait()
        vms.delete(made.name)
