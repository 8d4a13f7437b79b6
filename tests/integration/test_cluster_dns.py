"""Cluster DNS against a real embedded cluster: `dig` and dnspython ask over UDP
and TCP on loopback; Services created and deleted through the API show up in the
answers; names outside the domain are refused or forwarded to another server;
garbage does not stop the server and is counted."""

from __future__ import annotations

import asyncio
import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry

from localcluster.dns import DNSServer, main, start
from localcluster.dnszone import ClusterZone
from mesh.dnsserver import bind_sockets
from mesh.informer import ADDED
from tests.cluster import Cluster, stop_process, wait_for

T = TypeVar("T")
DOMAIN = "svc.cluster.local"
MERGE = "application/merge-patch+json"


class LoopThread:
    """An event loop in its own thread, so that blocking clients (dig, dnspython's
    synchronous resolver) can run in the test while servers answer."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 15) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@dataclass
class Served:
    server: DNSServer
    registry: CollectorRegistry

    @property
    def port(self) -> int:
        return self.server.address[1]

    def malformed(self) -> float:
        return self.registry.get_sample_value("dns_malformed_total") or 0.0


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.stop()


@pytest.fixture(scope="module")
def served(cluster: Cluster, loop_thread: LoopThread) -> Iterator[Served]:
    udp, tcp = bind_sockets("127.0.0.1", 0)
    registry = CollectorRegistry()
    server = loop_thread.run(start(cluster.api(), udp_sock=udp, tcp_sock=tcp,
                                   registry=registry))
    try:
        wait_for(lambda: server.ready, what="the DNS informers to sync")
        yield Served(server, registry)
    finally:
        loop_thread.run(server.close())


@pytest.fixture
def core(cluster: Cluster) -> client.CoreV1Api:
    return client.CoreV1Api(cluster.api())


def new_namespace(core: client.CoreV1Api) -> str:
    ns = f"dns-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    return ns


def port(name: str, number: int, protocol: str = "TCP") -> client.V1ServicePort:
    return client.V1ServicePort(name=name, port=number, protocol=protocol)


def create_service(core: client.CoreV1Api, ns: str, name: str, **spec: Any) -> str:
    """Creates a Service (`spec` in the client's field names); returns its ClusterIP."""
    spec.setdefault("ports", [port("http", 80)])
    return cluster_ip(core.create_namespaced_service(ns, client.V1Service(
        metadata=client.V1ObjectMeta(name=name), spec=client.V1ServiceSpec(**spec))))


def cluster_ip(svc: client.V1Service) -> str:
    assert svc.spec is not None
    return str(svc.spec.cluster_ip)


def kubernetes_ip(core: client.CoreV1Api) -> str:
    return cluster_ip(core.read_namespaced_service("kubernetes", "default"))


def dig(port: int, *args: str) -> str:
    exe = shutil.which("dig")
    assert exe, "dig is missing: apt-get install -y dnsutils"
    proc = subprocess.run([exe, "@127.0.0.1", "-p", str(port), "+time=2", "+tries=1", *args],
                          capture_output=True, text=True, timeout=15)
    return proc.stdout


def dig_short(port: int, *args: str) -> list[str]:
    return dig(port, "+short", *args).split("\n")[:-1]


def dig_status(port: int, *args: str) -> str:
    found = re.search(r"status: (\w+)", dig(port, *args))
    return found.group(1) if found else "no answer"


def ask_udp(port: int, name: str, rdtype: str = "A") -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, rdtype), "127.0.0.1", port=port,
                         timeout=5)


def test_dig_gets_the_cluster_ip_of_a_service_that_existed_before_start(
        served: Served, core: client.CoreV1Api) -> None:
    # Answers start only once the informers synced: no waiting, no false NXDOMAIN.
    ip = kubernetes_ip(core)
    assert dig_short(served.port, f"kubernetes.default.{DOMAIN}") == [ip]
    assert dig_short(served.port, f"KUBERNETES.Default.{DOMAIN.upper()}") == [ip]


def test_new_service_resolves_and_deleted_one_becomes_nxdomain(
        served: Served, core: client.CoreV1Api) -> None:
    ns = new_namespace(core)
    ip = create_service(core, ns, "web")
    name = f"web.{ns}.{DOMAIN}"
    wait_for(lambda: dig_short(served.port, name) == [ip], timeout=5, what=f"{name} -> {ip}")
    response = ask_udp(served.port, name)
    assert response.answer[0].ttl == 5
    assert ask_udp(served.port, name, "AAAA").rcode() == dns.rcode.NOERROR
    assert ask_udp(served.port, name, "AAAA").answer == []
    core.delete_namespaced_service("web", ns)
    wait_for(lambda: dig_status(served.port, name) == "NXDOMAIN", timeout=5,
             what=f"{name} NXDOMAIN")


def test_srv_for_a_named_port_via_dig_and_dnspython(served: Served,
                                                    core: client.CoreV1Api) -> None:
    ns = new_namespace(core)
    ip = create_service(core, ns, "web", ports=[port("http", 8080), port("dns", 53, "UDP")])
    target = f"web.{ns}.{DOMAIN}."
    srv = f"_http._tcp.web.{ns}.{DOMAIN}"
    wait_for(lambda: dig_short(served.port, srv, "SRV") == [f"0 100 8080 {target}"],
             timeout=5, what=f"SRV {srv}")
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port, resolver.lifetime = ["127.0.0.1"], served.port, 5
    answer = resolver.resolve(f"_dns._udp.web.{ns}.{DOMAIN}", "SRV")
    assert [(r.port, r.target.to_text()) for r in answer] == [(53, target)]
    assert answer.response.additional[0].to_text() == f"{target} 5 IN A {ip}"


def test_tcp_queries(served: Served, core: client.CoreV1Api) -> None:
    ip = kubernetes_ip(core)
    assert dig_short(served.port, "+tcp", f"kubernetes.default.{DOMAIN}") == [ip]
    # Several queries on one connection.
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        for name in (f"kubernetes.default.{DOMAIN}", f"nope.default.{DOMAIN}"):
            dns.query.send_tcp(sock, dns.message.make_query(name, "A"))
            response, _ = dns.query.receive_tcp(sock)
            assert response.rcode() == (dns.rcode.NOERROR if name.startswith("kubernetes")
                                        else dns.rcode.NXDOMAIN)


def test_unknown_names_are_nxdomain_with_soa_and_empty_intermediate_names_nodata(
        served: Served) -> None:
    response = ask_udp(served.port, f"nope.default.{DOMAIN}")
    assert response.rcode() == dns.rcode.NXDOMAIN
    (soa,) = response.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.ttl == 5
    assert dig_status(served.port, f"nope.nowhere.{DOMAIN}") == "NXDOMAIN"
    for name in (f"default.{DOMAIN}", DOMAIN, "cluster.local"):
        response = ask_udp(served.port, name)
        assert (response.rcode(), response.answer) == (dns.rcode.NOERROR, []), name
        assert response.authority[0].rdtype == dns.rdatatype.SOA


def test_names_outside_the_domain_are_refused(served: Served) -> None:
    assert dig_status(served.port, "example.com") == "REFUSED"
    assert dig_status(served.port, "+tcp", "cluster.local.example.com") == "REFUSED"


def test_headless_service_answers_ready_pod_addresses(served: Served,
                                                      core: client.CoreV1Api) -> None:
    ns = new_namespace(core)
    create_service(core, ns, "db", cluster_ip="None", selector={"app": "db"})
    for name, ip, ready in (("db-0", "10.244.7.1", True), ("db-1", "10.244.7.2", False)):
        core.create_namespaced_pod(ns, client.V1Pod(
            metadata=client.V1ObjectMeta(name=name, labels={"app": "db"}),
            spec=client.V1PodSpec(containers=[client.V1Container(name="db", image="db")])))
        core.patch_namespaced_pod_status(name, ns, {"status": {
            "phase": "Running", "podIP": ip,
            "conditions": [{"type": "Ready", "status": str(ready)}]}}, _content_type=MERGE)
    wait_for(lambda: dig_short(served.port, f"db.{ns}.{DOMAIN}") == ["10.244.7.1"],
             timeout=5, what="the ready pod's address")


def test_external_name_is_a_cname(served: Served, core: client.CoreV1Api) -> None:
    ns = new_namespace(core)
    create_service(core, ns, "ext", type="ExternalName", external_name="db.example.org",
                   ports=[])
    wait_for(lambda: dig_short(served.port, f"ext.{ns}.{DOMAIN}") == ["db.example.org."],
             timeout=5, what="the CNAME")


def test_garbage_over_udp_and_tcp_is_counted_and_does_not_stop_answers(
        served: Served) -> None:
    before = served.malformed()
    address = ("127.0.0.1", served.port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        udp.sendto(b"\x01\x02\x03", address)  # not even a header: dropped
        udp.sendto(b"\xbe\xef\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff", address)
        formerr = dns.message.from_wire(udp.recvfrom(512)[0])
        assert (formerr.id, formerr.rcode()) == (0xBEEF, dns.rcode.FORMERR)
    for garbage in (struct.pack("!H", 5) + b"\xff" * 5, b"\x00", b"GET / HTTP/1.1\r\n\r\n"):
        with socket.create_connection(address, timeout=5) as tcp:
            tcp.sendall(garbage)
            tcp.shutdown(socket.SHUT_WR)
            assert tcp.recv(100) == b"", "the server closes a connection that sent garbage"
    wait_for(lambda: served.malformed() == before + 5, timeout=5, what="5 malformed counted")
    assert dig_short(served.port, f"kubernetes.default.{DOMAIN}")
    assert dig_short(served.port, "+tcp", f"kubernetes.default.{DOMAIN}")
    assert (served.registry.get_sample_value("dns_queries_total", {"rcode": "FORMERR"})
            or 0) >= 1


def test_forwards_to_upstream_resolvers(cluster: Cluster, loop_thread: LoopThread,
                                        core: client.CoreV1Api) -> None:
    # The upstream is another DNSServer, serving a zone filled by hand.
    upstream_zone = ClusterZone("example.test")
    upstream_zone.on_service(ADDED, {"metadata": {"name": "web", "namespace": "prod"},
                                     "spec": {"clusterIP": "192.0.2.10"}})
    upstream_zone.on_service(ADDED, {"metadata": {"name": "big", "namespace": "prod"},
                                     "spec": {"clusterIP": "None"}})
    many = [f"198.51.100.{i}" for i in range(1, 201)]  # 3 KB: too big for one datagram
    upstream_zone.on_endpoint_slice(ADDED, {
        "metadata": {"name": "big-1", "namespace": "prod",
                     "labels": {"kubernetes.io/service-name": "big"}},
        "addressType": "IPv4", "endpoints": [{"addresses": [a]} for a in many]})
    upstream = DNSServer(upstream_zone)
    loop_thread.run(upstream.listen(*bind_sockets("127.0.0.1", 0)))
    udp, tcp = bind_sockets("127.0.0.1", 0)
    forwarder = loop_thread.run(start(cluster.api(), upstreams=[upstream.address],
                                      udp_sock=udp, tcp_sock=tcp))
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    stranded = DNSServer(ClusterZone(), upstreams=[silent.getsockname()],
                         upstream_timeout=0.3)
    loop_thread.run(stranded.listen(*bind_sockets("127.0.0.1", 0)))
    try:
        wait_for(lambda: forwarder.ready, what="the forwarder to sync")
        port = forwarder.address[1]
        assert dig_short(port, "web.prod.svc.example.test") == ["192.0.2.10"]
        assert dig_status(port, "nope.prod.svc.example.test") == "NXDOMAIN"
        # UDP to the upstream is truncated, so the forwarder asks again over TCP; its
        # UDP answer to dig is truncated too, so dig asks again over TCP.
        assert sorted(dig_short(port, "big.prod.svc.example.test")) == sorted(many)
        # The cluster's own names are still answered locally.
        ip = kubernetes_ip(core)
        assert dig_short(port, f"kubernetes.default.{DOMAIN}") == [ip]
        # An ExternalName whose target is outside the cluster is chased upstream.
        ns = new_namespace(core)
        create_service(core, ns, "alias", type="ExternalName",
                       external_name="web.prod.svc.example.test", ports=[])
        wait_for(lambda: dig_short(port, f"alias.{ns}.{DOMAIN}") ==
                 ["web.prod.svc.example.test.", "192.0.2.10"], timeout=5, what="the chase")
        assert ask_udp(stranded.address[1], "example.com").rcode() == dns.rcode.SERVFAIL
        assert (stranded.registry.get_sample_value("dns_queries_total",
                                                   {"rcode": "SERVFAIL"}) == 1)
    finally:
        silent.close()
        for server in (forwarder, upstream, stranded):
            loop_thread.run(server.close())


def test_servfail_until_the_informers_sync(loop_thread: LoopThread) -> None:
    # An API server that refuses connections: the informers never sync.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    api = client.ApiClient(client.Configuration(host=f"https://127.0.0.1:"
                                                     f"{closed.getsockname()[1]}"))
    server = loop_thread.run(start(api, listen=("127.0.0.1", 0)))
    try:
        port = server.address[1]
        assert dig_status(port, f"kubernetes.default.{DOMAIN}") == "SERVFAIL"
        assert dig_status(port, "example.com") == "REFUSED"
        assert not server.ready
    finally:
        loop_thread.run(server.close())
        closed.close()


def test_main_serves_and_stops_on_sigterm(cluster: Cluster, core: client.CoreV1Api,
                                          tmp_path: Path) -> None:
    log_path = tmp_path / "dns.log"
    with log_path.open("w") as log_file, subprocess.Popen(
            [sys.executable, "-m", "localcluster.dns", "--kubeconfig", str(cluster.kubeconfig),
             "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=log_file,
            text=True) as proc:
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            for line in proc.stdout or []:
                lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        try:
            first = lines.get(timeout=15)
            found = re.fullmatch(r"dns: serving cluster\.local\. on 127\.0\.0\.1:(\d+) "
                                 r"\(udp, tcp\)\n", first)
            assert found, first + log_path.read_text()
            port = int(found.group(1))
            ip = kubernetes_ip(core)
            wait_for(lambda: dig_short(port, f"kubernetes.default.{DOMAIN}") == [ip],
                     timeout=5, what="main to answer")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0, log_path.read_text()
        finally:
            stop_process(proc)


def test_main_reports_a_bad_kubeconfig_and_a_port_in_use(
        cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--kubeconfig", str(tmp_path / "missing"), "--listen", "127.0.0.1:0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kubeconfig" in err and "does not exist" in err
    (tmp_path / "broken").write_text("clusters: [")
    assert main(["--kubeconfig", str(tmp_path / "broken"), "--listen", "127.0.0.1:0"]) == 1
    assert capsys.readouterr().err.startswith("error: kubeconfig")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert main(["--kubeconfig", str(cluster.kubeconfig),
                     "--listen", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"127.0.0.1:{port}" in err and "in use" in err
