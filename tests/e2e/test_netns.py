"""The embedded cluster's namespace topology and AnyIP redirect, in real network namespaces.

Every namespace here is named `mgt-<random>...`; fixtures remove what a test made even
when it fails, and the module checks that the host's own namespace was never changed.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, ip_network
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from localcluster import namespaces, netns
from mesh import redirect
from mesh.errors import ConfigError, NetlinkError

ROOT = Path(__file__).resolve().parents[2]
SERVICE_CIDR = IPv4Network("10.96.0.0/16")
TIMEOUT = 5.0


# ------------------------------------------------------------------------------ helpers


def _suffix() -> str:
    return secrets.token_hex(3)


def _namespaces(prefix: str) -> list[str]:
    return sorted(n for n in pyroute2_netns.listnetns() if n.startswith(prefix))


def _links(ns: str | None = None) -> dict[str, Any]:
    with IPRoute() if ns is None else IPRoute(netns=ns, flags=0) as ipr:
        return {link.get_attr("IFLA_IFNAME"): link for link in ipr.get_links()}


def _kind(link: Any) -> str | None:
    kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    return str(kind) if kind is not None else None


def _root_veths() -> list[str]:
    return [name for name, link in _links().items() if _kind(link) == "veth"]


def _addresses(ns: str, ifname: str) -> list[str]:
    with IPRoute(netns=ns, flags=0) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        return [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                for a in ipr.get_addr(index=index, family=socket.AF_INET)]


def _exchange(server_ns: str, server_ip: str, client_ns: str, *, port: int = 7000) -> str:
    """Listens in one namespace, connects from another, echoes bytes; returns the peer IP."""
    with namespaces.socket_in_namespace(server_ns) as listener:
        listener.settimeout(TIMEOUT)
        listener.bind((server_ip, port))
        listener.listen()
        with namespaces.socket_in_namespace(client_ns) as client:
            client.settimeout(TIMEOUT)
            client.connect((server_ip, port))
            conn, peer = listener.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
                conn.sendall(b"pong")
                assert client.recv(4) == b"pong"
    return str(peer[0])


def _python(code: str, *, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30, check=False)


def _thread_netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def host_untouched() -> Iterator[None]:
    """The host's links, routes, resolv.conf and mounts are the same after these tests."""
    def snapshot() -> tuple[Any, ...]:
        with IPRoute() as ipr:
            routes = sorted(str((r.get_attr("RTA_TABLE"), r.get_attr("RTA_DST"), r["dst_len"],
                                 r["type"])) for r in ipr.get_routes(table=0))
        return (sorted(_links()), routes, Path("/etc/resolv.conf").read_bytes(),
                [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                 if "resolv.conf" in line or " /sys " in line])

    before = snapshot()
    yield
    assert snapshot() == before


def _new_network(state_dir: Path, **kwargs: Any) -> netns.ClusterNetwork:
    return netns.ClusterNetwork(name=f"t{_suffix()}", state_dir=state_dir,
                                netns_prefix="mgt-", **kwargs)


def _sweep(net: netns.ClusterNetwork) -> list[str]:
    """Tears the network down and removes anything still named after it; returns those."""
    try:
        netns.teardown(net.state_dir)
    finally:
        leftovers = _namespaces(f"mgt-{net.name}-")
        for name in leftovers:
            pyroute2_netns.remove(name)
    return leftovers


@pytest.fixture
def network(tmp_path: Path) -> Iterator[netns.ClusterNetwork]:
    """A cluster network that is not up yet; torn down afterwards whatever happened."""
    net = _new_network(tmp_path / "state")
    try:
        yield net
    finally:
        assert _sweep(net) == []


@pytest.fixture
def cluster(network: netns.ClusterNetwork) -> netns.ClusterNetwork:
    netns.up(network)
    return network


@pytest.fixture
def bare_netns() -> Iterator[str]:
    """An empty namespace with nothing but lo."""
    name = f"mgt-bare-{_suffix()}"
    pyroute2_netns.create(name)
    try:
        yield name
    finally:
        pyroute2_netns.remove(name)


# ------------------------------------------------------------------------------ redirect


def test_local_route_lets_any_service_address_be_bound_and_reached(bare_netns: str) -> None:
    redirect.ensure_local_route(SERVICE_CIDR, netns=bare_netns)
    redirect.ensure_local_route("10.96.0.0/16", netns=bare_netns)  # twice is fine
    assert redirect.local_routes(netns=bare_netns) == [SERVICE_CIDR]

    with namespaces.socket_in_namespace(bare_netns) as vip, \
            namespaces.socket_in_namespace(bare_netns) as wildcard:
        vip.bind(("10.96.0.10", 80))
        vip.listen()
        wildcard.bind(("0.0.0.0", 4140))
        wildcard.listen()
        for listener, target in ((vip, ("10.96.0.10", 80)), (wildcard, ("10.96.200.7", 4140))):
            listener.settimeout(TIMEOUT)
            with namespaces.socket_in_namespace(bare_netns) as client:
                client.settimeout(TIMEOUT)
                client.connect(target)
                conn, _ = listener.accept()
                with conn:
                    # The accepting side reads the original destination.
                    assert conn.getsockname() == target
                    client.sendall(b"x")
                    assert conn.recv(1) == b"x"


def test_removing_the_local_route_is_idempotent(bare_netns: str) -> None:
    redirect.ensure_local_route(SERVICE_CIDR, netns=bare_netns)
    redirect.remove_local_route(SERVICE_CIDR, netns=bare_netns)
    redirect.remove_local_route(SERVICE_CIDR, netns=bare_netns)
    assert redirect.local_routes(netns=bare_netns) == []
    with namespaces.socket_in_namespace(bare_netns) as s, pytest.raises(OSError) as e:
        s.bind(("10.96.0.10", 80))
    assert e.value.errno == errno.EADDRNOTAVAIL


def test_local_route_for_ipv6_service_cidr(bare_netns: str) -> None:
    cidr = ip_network("fd00:10:96::/112")
    redirect.ensure_local_route(cidr, netns=bare_netns)
    assert redirect.local_routes(netns=bare_netns) == [cidr]
    # IPv6 accepts on a wildcard listener (binding one address needs IPV6_FREEBIND).
    with namespaces.socket_in_namespace(bare_netns, socket.AF_INET6) as listener, \
            namespaces.socket_in_namespace(bare_netns, socket.AF_INET6) as client:
        listener.settimeout(TIMEOUT)
        client.settimeout(TIMEOUT)
        listener.bind(("::", 4140))
        listener.listen()
        client.connect(("fd00:10:96::a", 4140))
        conn, _ = listener.accept()
        with conn:
            assert conn.getsockname()[:2] == ("fd00:10:96::a", 4140)
    redirect.remove_local_route(cidr, netns=bare_netns)
    assert redirect.local_routes(netns=bare_netns) == []


def test_local_route_in_the_callers_own_namespace(bare_netns: str) -> None:
    # netns=None is what the VM agent uses; run it from a process inside the namespace.
    done = _python("""
        from mesh.redirect import ensure_local_route
        ensure_local_route("10.96.0.0/16")
        ensure_local_route("10.96.0.0/16")
        """, prefix=("nsenter", f"--net={namespaces.namespace_path(bare_netns)}", "--"))
    assert done.returncode == 0, done.stderr
    assert redirect.local_routes(netns=bare_netns) == [SERVICE_CIDR]


def test_redirect_errors_name_the_namespace() -> None:
    missing = f"mgt-missing-{_suffix()}"
    with pytest.raises(NetlinkError, match=missing):
        redirect.ensure_local_route(SERVICE_CIDR, netns=missing)
    redirect.remove_local_route(SERVICE_CIDR, netns=missing)  # nothing there: removed
    with pytest.raises(NetlinkError, match=re.escape("10.96.0.1/16")):
        redirect.ensure_local_route("10.96.0.1/16", netns=missing)
    assert _namespaces(missing) == []  # looking never creates it


# ------------------------------------------------------------------------------ sockets


def test_socket_in_namespace_returns_the_thread_to_its_namespace(bare_netns: str) -> None:
    home = _thread_netns()
    s = namespaces.socket_in_namespace(bare_netns)
    s.close()
    assert _thread_netns() == home
    with pytest.raises(OSError):
        namespaces.socket_in_namespace(bare_netns, family=4242)  # no such family
    assert _thread_netns() == home
    with pytest.raises(namespaces.TopologyError, match="does not exist"):
        namespaces.socket_in_namespace(f"mgt-missing-{_suffix()}")
    assert _thread_netns() == home

    seen: list[int] = []

    def worker() -> None:
        namespaces.socket_in_namespace(bare_netns).close()
        seen.append(_thread_netns())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(TIMEOUT)
    assert seen == [home]


# ------------------------------------------------------------------------------ node and pods


def test_up_builds_a_node_namespace_with_a_bridge(cluster: netns.ClusterNetwork) -> None:
    node_links = _links(cluster.node_netns)
    assert set(node_links) == {"lo", netns.BRIDGE}
    bridge = node_links[netns.BRIDGE]
    assert _kind(bridge) == "bridge"
    assert bridge["flags"] & 1 and node_links["lo"]["flags"] & 1  # IFF_UP
    assert _addresses(cluster.node_netns, netns.BRIDGE) == ["10.244.0.1/16"]
    assert bridge.get_attr("IFLA_ADDRESS") == netns.bridge_mac(cluster.name)
    # Converging again changes nothing.
    assert netns.up(cluster) == netns.Node(cluster.node_netns, netns.BRIDGE, cluster.gateway)
    assert _addresses(cluster.node_netns, netns.BRIDGE) == ["10.244.0.1/16"]
    assert _namespaces(f"mgt-{cluster.name}-") == [cluster.node_netns]
    with pytest.raises(ConfigError, match="tear it down first"):
        netns.up(netns.ClusterNetwork(name=cluster.name, state_dir=cluster.state_dir,
                                      netns_prefix="mgt-", pod_cidr=IPv4Network("10.8.0.0/16")))


def test_pod_has_eth0_a_default_route_and_local_services(cluster: netns.ClusterNetwork) -> None:
    pod = netns.add_pod(cluster, "web")
    assert pod.ip == IPv4Address("10.244.0.2")
    assert pod.netns == f"mgt-{cluster.name}-pod-web"
    assert set(_links(pod.netns)) == {"lo", "eth0"}
    assert _addresses(pod.netns, "eth0") == ["10.244.0.2/16"]
    with IPRoute(netns=pod.netns, flags=0) as ipr:
        defaults = [r.get_attr("RTA_GATEWAY") for r in ipr.get_routes(family=socket.AF_INET)
                    if r["dst_len"] == 0 and r.get_attr("RTA_GATEWAY")]
    assert defaults == ["10.244.0.1"]
    assert redirect.local_routes(netns=pod.netns) == [SERVICE_CIDR]
    node_links = _links(cluster.node_netns)
    veth = node_links[netns.veth_name(cluster.pod_cidr, pod.ip)]
    assert _kind(veth) == "veth"
    assert veth.get_attr("IFLA_MASTER") == node_links[netns.BRIDGE]["index"]
    assert _root_veths() == []
    assert netns.add_pod(cluster, "web") == pod  # already there: the same pod
    assert netns.list_pods(cluster) == [pod]


def test_pods_reach_each_other_through_the_bridge(cluster: netns.ClusterNetwork) -> None:
    a = netns.add_pod(cluster, "a")
    b = netns.add_pod(cluster, "b")
    assert _exchange(b.netns, str(b.ip), a.netns) == str(a.ip)
    assert _exchange(a.netns, str(a.ip), b.netns) == str(b.ip)


def test_node_and_pods_reach_each_other(cluster: netns.ClusterNetwork) -> None:
    pod = netns.add_pod(cluster, "a")
    # What the API server will do: listen on the bridge address inside the node namespace.
    assert _exchange(cluster.node_netns, "10.244.0.1", pod.netns) == str(pod.ip)
    assert _exchange(pod.netns, str(pod.ip), cluster.node_netns) == "10.244.0.1"
    node_links = _links(cluster.node_netns)
    assert set(node_links) == {"lo", netns.BRIDGE, "veth2"}
    assert _root_veths() == []  # the host is linked to nothing


async def test_one_event_loop_serves_in_several_namespaces(
        cluster: netns.ClusterNetwork) -> None:
    with pytest.raises(namespaces.TopologyError, match="to_thread"):
        netns.add_pod(cluster, "a")
    with pytest.raises(NetlinkError, match="to_thread"):
        redirect.local_routes(netns=cluster.node_netns)
    a = await asyncio.to_thread(netns.add_pod, cluster, "a")
    b = await asyncio.to_thread(netns.add_pod, cluster, "b")

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()

    servers = []
    for ns, ip in ((cluster.node_netns, "10.244.0.1"), (b.netns, str(b.ip))):
        sock = namespaces.socket_in_namespace(ns)
        sock.bind((ip, 6443))
        servers.append(await asyncio.start_server(echo, sock=sock))
    try:
        for ip in ("10.244.0.1", str(b.ip)):
            client = namespaces.socket_in_namespace(a.netns)
            client.setblocking(False)
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(client, (ip, 6443)), TIMEOUT)
            reader, writer = await asyncio.open_connection(sock=client)
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"ping"
            writer.close()
            await writer.wait_closed()
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


def test_pod_command_sees_the_pods_resolv_conf_and_interfaces(
        cluster: netns.ClusterNetwork) -> None:
    pod = netns.add_pod(cluster, "dns")
    host_resolv = Path("/etc/resolv.conf").read_bytes()
    cat = subprocess.run(netns.pod_command(cluster, "dns", ["cat", "/etc/resolv.conf"]),
                         capture_output=True, text=True, timeout=30, check=False)
    assert cat.returncode == 0, cat.stderr
    assert cat.stdout == pod.resolv_conf.read_text()
    assert f"nameserver {cluster.gateway.ip}\n" in cat.stdout
    assert Path("/etc/resolv.conf").read_bytes() == host_resolv

    probe = """
        import fcntl, os, socket, struct
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", b"eth0"))  # SIOCGIFADDR
        print(sorted(n for _, n in socket.if_nameindex()), sorted(os.listdir("/sys/class/net")),
              socket.inet_ntoa(packed[20:24]))
        """
    seen = subprocess.run(netns.pod_command(cluster, "dns",
                                            [sys.executable, "-c", textwrap.dedent(probe)]),
                          capture_output=True, text=True, timeout=30, check=False)
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout.split() == ["['eth0',", "'lo']", "['eth0',", "'lo']", str(pod.ip)]
    assert Path("/etc/resolv.conf").read_bytes() == host_resolv
    with pytest.raises(namespaces.TopologyError, match="no pod 'nope'"):
        netns.pod_command(cluster, "nope", ["true"])


def test_remove_pod_frees_its_address_and_links(cluster: netns.ClusterNetwork) -> None:
    a = netns.add_pod(cluster, "a")
    b = netns.add_pod(cluster, "b")
    netns.remove_pod(cluster, "a")
    netns.remove_pod(cluster, "a")  # already gone: fine
    assert _namespaces(a.netns) == []
    assert set(_links(cluster.node_netns)) == {"lo", netns.BRIDGE, "veth3"}
    assert not a.resolv_conf.exists()
    assert netns.list_pods(cluster) == [b]
    assert netns.add_pod(cluster, "c").ip == a.ip  # the lowest free address again


def test_addresses_are_allocated_across_processes(cluster: netns.ClusterNetwork) -> None:
    code = """
        import sys
        from pathlib import Path
        from localcluster.netns import ClusterNetwork, add_pod
        net = ClusterNetwork.load(Path(sys.argv[1]))
        for i in range(3):
            print(add_pod(net, f"{sys.argv[2]}{i}").ip)
        """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code),
                               str(cluster.state_dir), name], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name in ("x", "y")]
    outputs = [p.communicate(timeout=30) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    printed = [ip for out, _ in outputs for ip in out.split()]
    assert sorted(printed) == [f"10.244.0.{i}" for i in range(2, 8)]
    assert {str(p.ip) for p in netns.list_pods(cluster)} == set(printed)
    assert len(_namespaces(f"mgt-{cluster.name}-pod-")) == 6


# ------------------------------------------------------------------------------ failures


@pytest.mark.parametrize("where", ["veth", "service-route"])
def test_failed_add_pod_leaves_nothing(cluster: netns.ClusterNetwork,
                                       monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    if where == "veth":  # the kernel refuses a name over 15 characters
        monkeypatch.setattr(netns, "POD_IFNAME", "a-name-too-long-for-linux")
    else:  # the very last step, after the pod is linked and addressed
        def refuse(*_: Any, **__: Any) -> None:
            raise NetlinkError("refused by the test")
        monkeypatch.setattr(redirect, "ensure_local_route", refuse)
    with pytest.raises(NetlinkError):
        netns.add_pod(cluster, "doomed")
    assert _namespaces(f"mgt-{cluster.name}-pod-") == []
    assert set(_links(cluster.node_netns)) == {"lo", netns.BRIDGE}
    assert netns.list_pods(cluster) == []
    assert list((cluster.state_dir / "network" / "pods").glob("*")) == []
    monkeypatch.undo()
    assert netns.add_pod(cluster, "doomed").ip == IPv4Address("10.244.0.2")


def test_failed_up_leaves_nothing(network: netns.ClusterNetwork,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Fails after the node namespace exists: the kernel refuses the bridge's name.
    monkeypatch.setattr(netns, "BRIDGE", "a-name-too-long-for-linux")
    with pytest.raises(namespaces.TopologyError, match="Numerical result out of range"):
        netns.up(network)
    assert _namespaces(f"mgt-{network.name}-") == []
    assert not (network.state_dir / "network" / "topology.json").exists()
    assert _root_veths() == []


def test_teardown_from_another_process(cluster: netns.ClusterNetwork) -> None:
    netns.add_pod(cluster, "a")
    netns.add_pod(cluster, "b")
    done = _python(f"""
        from pathlib import Path
        from localcluster.netns import teardown
        teardown(Path({str(cluster.state_dir)!r}))
        """)
    assert done.returncode == 0, done.stderr
    assert _namespaces(f"mgt-{cluster.name}-") == []
    assert _root_veths() == []
    assert netns.list_pods(cluster) == []
    netns.teardown(cluster.state_dir)  # nothing left to do


def test_teardown_tolerates_parts_already_gone(cluster: netns.ClusterNetwork) -> None:
    a = netns.add_pod(cluster, "a")
    b = netns.add_pod(cluster, "b")
    pyroute2_netns.remove(a.netns)
    with IPRoute(netns=cluster.node_netns, flags=0) as ipr:
        ipr.link("del", ifname=netns.veth_name(cluster.pod_cidr, b.ip))
    netns.teardown(cluster.state_dir)
    assert _namespaces(f"mgt-{cluster.name}-") == []


def test_up_collects_pods_whose_namespace_vanished(cluster: netns.ClusterNetwork) -> None:
    a = netns.add_pod(cluster, "a")
    pyroute2_netns.remove(a.netns)
    netns.up(cluster)
    assert netns.list_pods(cluster) == []
    assert set(_links(cluster.node_netns)) == {"lo", netns.BRIDGE}


def test_a_pod_recorded_but_never_built_is_rebuilt(cluster: netns.ClusterNetwork) -> None:
    # What a crash between recording a pod and creating it leaves behind.
    state_file = cluster.state_dir / "network" / "topology.json"
    state = json.loads(state_file.read_text())
    state["pods"]["half"] = {"ip": "10.244.0.9", "netns": cluster.pod_netns("half"),
                             "veth": "veth9"}
    state_file.write_text(json.dumps(state))
    pod = netns.add_pod(cluster, "half")
    assert pod.ip == IPv4Address("10.244.0.9")
    assert _exchange(cluster.node_netns, "10.244.0.1", pod.netns) == "10.244.0.9"


def test_a_busy_topology_is_reported(cluster: netns.ClusterNetwork,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "LOCK_TIMEOUT", 0.1)
    with open(cluster.state_dir / "network" / "lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(namespaces.TopologyError, match="another process has held"):
            netns.add_pod(cluster, "a")
    assert netns.add_pod(cluster, "a").ip == IPv4Address("10.244.0.2")


def test_someone_elses_namespace_is_refused_and_kept(network: netns.ClusterNetwork) -> None:
    pyroute2_netns.create(network.node_netns)
    try:
        with pytest.raises(namespaces.NamespaceTakenError, match="ip netns delete"):
            netns.up(network)
        assert _namespaces(network.node_netns) == [network.node_netns]
    finally:
        pyroute2_netns.remove(network.node_netns)

    netns.up(network)
    foreign = network.pod_netns("taken")
    pyroute2_netns.create(foreign)
    try:
        with pytest.raises(namespaces.NamespaceTakenError, match=foreign):
            netns.add_pod(network, "taken")
        assert _namespaces(foreign) == [foreign]
        assert netns.list_pods(network) == []
    finally:
        pyroute2_netns.remove(foreign)


def test_exhausted_pod_cidr(tmp_path: Path) -> None:
    net = _new_network(tmp_path, pod_cidr=IPv4Network("10.244.0.0/30"))
    try:
        netns.up(net)
        assert netns.add_pod(net, "only").ip == IPv4Address("10.244.0.2")
        with pytest.raises(netns.PodCidrExhaustedError, match=re.escape("10.244.0.0/30")):
            netns.add_pod(net, "more")
        assert _namespaces(net.pod_netns("more")) == []
        assert [p.name for p in netns.list_pods(net)] == ["only"]
    finally:
        assert _sweep(net) == []


def test_add_pod_before_up(network: netns.ClusterNetwork) -> None:
    with pytest.raises(namespaces.TopologyError, match="call up"):
        netns.add_pod(network, "a")


def test_without_privileges_the_error_says_what_to_do(network: netns.ClusterNetwork,
                                                      bare_netns: str) -> None:
    code = f"""
        from pathlib import Path
        from localcluster import namespaces, netns
        net = netns.ClusterNetwork(name={network.name!r}, netns_prefix="mgt-",
                                   state_dir=Path({str(network.state_dir)!r}))
        for attempt in (lambda: netns.up(net),
                        lambda: namespaces.socket_in_namespace({bare_netns!r})):
            try:
                attempt()
            except namespaces.NotPermittedError as e:
                print(e)
        """
    # Root without a capability bounding set has no capabilities after exec.
    done = _python(code, prefix=("setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    assert "CAP_NET_ADMIN and CAP_SYS_ADMIN" in lines[0] and "run as root" in lines[0]
    assert "CAP_SYS_ADMIN" in lines[1]
    assert _namespaces(f"mgt-{network.name}-") == []
