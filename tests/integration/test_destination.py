"""The destination API end to end: a real embedded cluster, `meshgate control run`
as a process, and `WatchDiscovery` (the proxy's client) or raw mTLS requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from kubernetes import client
from prometheus_client import CollectorRegistry

from mesh.control.crds import install_crds
from mesh.discovery.client import WatchDiscovery
from mesh.discovery.index import (
    INBOUND_PORT_ANNOTATION,
    OPAQUE_PORTS_ANNOTATION,
    DestinationIndex,
    ServiceUpdated,
)
from mesh.discovery.server import DestinationService
from mesh.identity import tls
from mesh.identity.errors import PeerIdentityMismatch
from mesh.identity.names import Identity
from mesh.identity.static import StaticIdentity
from mesh.proxy.discovery import EndpointSpec, ServiceSpec
from tests.cluster import Cluster
from tests.controlplane import SERVER, ControlProcess, eventually, get, start_control
from tests.meshproxy import DOMAIN, Trust, free_port

MERGE = "application/merge-patch+json"


@pytest.fixture(scope="module")
def control(cluster: Cluster, trust: Trust) -> Iterator[ControlProcess]:
    install_crds(cluster.api())  # the policy API needs them to be ready
    c = start_control(cluster, trust)
    try:
        yield c
    finally:
        c.stop()


@asynccontextmanager
async def watching(url: str, workload: StaticIdentity, *, expect: Identity = SERVER
                   ) -> AsyncIterator[WatchDiscovery]:
    d = WatchDiscovery(url, context=workload.client_context, server_identity=expect,
                       min_backoff=0.05, max_backoff=0.3)
    d.start()
    try:
        yield d
    finally:
        await d.stop()


@asynccontextmanager
async def raw_watch(url: str, ctx: ssl.SSLContext, query: str = ""
                    ) -> AsyncIterator[Callable[[float], Awaitable[dict[str, Any]]]]:
    async with aiohttp.ClientSession() as s, s.get(
            f"{url}/v1/destinations{query}", ssl=ctx,
            server_hostname=SERVER.dns_name) as resp:
        assert resp.status == 200, await resp.text()

        async def next_message(timeout: float = 5.0) -> dict[str, Any]:
            async with asyncio.timeout(timeout):
                line = await resp.content.readline()
            assert line, "the stream ended"
            msg: dict[str, Any] = json.loads(line)
            return msg

        yield next_message


# -- the cluster ----------------------------------------------------------------------


class Shop:
    """One namespace with a Service ``web`` (http 80 -> named port, admin 9090 opaque)."""

    def __init__(self, cluster: Cluster, name: str = "web") -> None:
        # Bodies are dicts, which the client sends as they are; its types name only models.
        self.core: Any = client.CoreV1Api(cluster.api())
        self.ns = f"d-{uuid.uuid4().hex[:8]}"
        self.svc = name
        self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
            name=self.ns)))

    @property
    def name(self) -> str:
        return f"{self.svc}.{self.ns}.svc.{DOMAIN}"

    def create_service(self) -> str:
        created = self.core.create_namespaced_service(self.ns, {
            "metadata": {"name": self.svc, "annotations": {OPAQUE_PORTS_ANNOTATION: "9090"}},
            "spec": {"selector": {"app": self.svc}, "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "admin", "port": 9090, "targetPort": 9091}]}})
        return str(created.spec.cluster_ip)

    def pod(self, name: str, ip: str, *, meshed: bool = True, ready: bool = True) -> None:
        annotations = {INBOUND_PORT_ANNOTATION: "4143"} if meshed else {}
        self.core.create_namespaced_pod(self.ns, {
            "metadata": {"name": name, "labels": {"app": self.svc},
                         "annotations": annotations},
            "spec": {"serviceAccountName": "web", "containers": [{
                "name": "app", "image": "web",
                "ports": [{"name": "http", "containerPort": 8080},
                          {"name": "admin", "containerPort": 9091}]}]}})
        self.set_ready(name, ip, ready)

    def set_ready(self, name: str, ip: str, ready: bool) -> None:
        self.core.patch_namespaced_pod_status(name, self.ns, {"status": {
            "phase": "Running", "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}},
            _content_type=MERGE)

    def identity(self, sa: str = "web") -> str:
        return Identity(self.ns, sa, DOMAIN).dns_name


def endpoints(spec: ServiceSpec | None) -> list[tuple[str, int, str | None]]:
    if spec is None:
        return []
    return [(e.address, e.target_port, e.identity) for e in spec.endpoints]


# -- tests ------------------------------------------------------------------------------


async def test_snapshot_of_a_service_with_two_ready_pods(
        cluster: Cluster, control: ControlProcess, workload: StaticIdentity) -> None:
    shop = Shop(cluster)
    vip = shop.create_service()
    shop.pod("web-1", "10.244.1.1", meshed=True)
    shop.pod("web-2", "10.244.1.2", meshed=False)
    want_http = [("10.244.1.1:4143", 8080, shop.identity()), ("10.244.1.2:8080", 8080, None)]
    async with watching(control.url, workload) as d:
        await eventually(lambda: endpoints(d.resolve_name(f"{shop.name}:80")) == want_http,
                         what="both pods in the client")
        admin = d.resolve((vip, 9090))
        assert admin is not None and admin.opaque and admin.name == shop.name
        assert endpoints(admin) == [("10.244.1.1:4143", 9091, shop.identity()),
                                    ("10.244.1.2:9091", 9091, None)]
        http = d.resolve((vip, 80))
        assert http is not None and not http.opaque
    async with raw_watch(control.url, workload.client_context(),
                         f"?service={shop.name}:80") as next_message:
        first = await next_message(5.0)
    assert first["type"] == "snapshot" and first["heartbeatSeconds"] == 0.5
    assert first["services"] == [{
        "name": shop.name, "address": f"{vip}:80", "opaque": False, "failbackSeconds": None,
        "endpoints": [
            {"address": "10.244.1.1:4143", "targetPort": 8080, "identity": shop.identity(),
             "weight": 1, "priority": 0, "zone": "", "cluster": "test",
             "authorityOverride": None},
            {"address": "10.244.1.2:8080", "targetPort": 8080, "identity": None,
             "weight": 1, "priority": 0, "zone": "", "cluster": "test",
             "authorityOverride": None}]}]


async def test_scaling_down_reaches_the_client(
        cluster: Cluster, control: ControlProcess, workload: StaticIdentity) -> None:
    shop = Shop(cluster)
    vip = shop.create_service()
    shop.pod("web-1", "10.244.2.1")
    shop.pod("web-2", "10.244.2.2")
    async with watching(control.url, workload) as d:
        seen: list[int] = []
        d.subscribe(lambda s: seen.append(len(s.endpoints)) if s.address == f"{vip}:80"
                    else None)
        await eventually(lambda: len(endpoints(d.resolve((vip, 80)))) == 2, what="two pods")
        shop.set_ready("web-2", "10.244.2.2", False)
        await eventually(lambda: [e[0] for e in endpoints(d.resolve((vip, 80)))] ==
                         ["10.244.2.1:4143"], timeout=5, what="web-2 gone")
        shop.core.delete_namespaced_pod("web-1", shop.ns)
        await eventually(lambda: endpoints(d.resolve((vip, 80))) == [], timeout=5,
                         what="no endpoints")
        assert seen[-2:] == [1, 0]
        # The Service itself going away is announced once more, without endpoints.
        shop.core.delete_namespaced_service("web", shop.ns)
        await eventually(lambda: d.resolve((vip, 80)) is None, timeout=5, what="removal")


async def test_a_watch_for_a_later_service_starts_empty_then_fills(
        cluster: Cluster, control: ControlProcess, workload: StaticIdentity) -> None:
    shop = Shop(cluster, "late")
    ctx = workload.client_context()
    async with raw_watch(control.url, ctx, f"?service={shop.name}:80") as next_message:
        assert await next_message(5.0) == {"type": "snapshot", "heartbeatSeconds": 0.5,
                                           "services": []}
        vip = shop.create_service()
        shop.pod("late-1", "10.244.3.1")
        kinds = set()
        while True:
            msg = await next_message(5.0)
            kinds.add(msg["type"])
            if msg["type"] == "update" and msg["service"]["endpoints"]:
                break
        assert msg["service"]["address"] == f"{vip}:80"
        assert kinds <= {"update", "heartbeat"}
        # A quiet stream carries heartbeats.
        while (await next_message(3.0))["type"] != "heartbeat":
            pass
    async with raw_watch(control.url, ctx, f"?address={vip}:9090") as next_message:
        first = await next_message(5.0)
    assert [s["address"] for s in first["services"]] == [f"{vip}:9090"]


async def test_malformed_queries_get_400_with_json(
        control: ControlProcess, workload: StaticIdentity) -> None:
    ctx = workload.client_context()
    for query in ("?service=web.default.svc.cluster.local", "?service=web:http",
                  "?address=web:80", "?address=10.96.0.1:99999", "?bogus=1",
                  "?service=a.b:80&address=10.96.0.1:80", "?service=a:80&service=b:80"):
        status, text = await get(f"{control.url}/v1/destinations{query}", ctx)
        assert status == 400, (query, text)
        body = json.loads(text)
        assert body["error"] == "malformed" and body["message"], (query, body)


async def test_a_client_without_certificate_is_refused(
        control: ControlProcess, trust: Trust) -> None:
    from mesh.identity.bundle import TrustBundle

    anonymous = tls.client_context(TrustBundle.from_pem(trust.bundle.read_bytes()))
    status, text = await get(f"{control.url}/v1/destinations", anonymous)
    assert status == 401 and json.loads(text)["error"] == "no-certificate"
    # The same listener serves the identity service, which takes callers without one.
    status, text = await get(f"{control.url}/v1/status", anonymous)
    assert status == 200 and json.loads(text)["trustDomain"] == DOMAIN
    assert (await get(f"{control.url}/ready", anonymous))[0] == 200
    status, page = await get(f"{control.url}/metrics", anonymous)
    assert "endpoints_subscribers" in page and "identity_issuer_expiration" in page


async def test_expecting_another_server_identity_fails_clearly(
        control: ControlProcess, workload: StaticIdentity) -> None:
    wrong = Identity("meshgate", "someone-else", DOMAIN)
    async with watching(control.url, workload, expect=wrong) as d:
        await eventually(lambda: isinstance(d.last_error, PeerIdentityMismatch),
                         timeout=5, what="an identity mismatch")
        message = str(d.last_error)
        assert f"presented {SERVER}, expected {wrong}" in message
        assert not d.ready.is_set() and d.services() == []


async def test_last_known_data_survives_the_control_plane_and_catches_up(
        cluster: Cluster, trust: Trust, workload: StaticIdentity) -> None:
    port = free_port()
    plane = start_control(cluster, trust, port=port)
    try:
        shop = Shop(cluster)
        vip = shop.create_service()
        shop.pod("web-1", "10.244.4.1")
        shop.pod("web-2", "10.244.4.2")
        async with watching(plane.url, workload) as d:
            announced: list[int] = []
            d.subscribe(lambda s: announced.append(len(s.endpoints))
                        if s.address == f"{vip}:80" else None)
            await eventually(lambda: len(endpoints(d.resolve((vip, 80)))) == 2,
                             what="two pods")
            plane.kill()
            await eventually(lambda: not d.connected, timeout=5, what="the stream to drop")
            assert len(endpoints(d.resolve((vip, 80)))) == 2  # still serving
            shop.set_ready("web-2", "10.244.4.2", False)  # a change while it is away
            await asyncio.sleep(0.3)
            assert len(endpoints(d.resolve((vip, 80)))) == 2
            plane = start_control(cluster, trust, port=port)
            await eventually(lambda: [e[0] for e in endpoints(d.resolve((vip, 80)))] ==
                             ["10.244.4.1:4143"], timeout=10, what="the missed change")
            assert d.connections == 2 and announced[-1] == 1
    finally:
        plane.stop()


async def test_a_watcher_that_stops_reading_is_cut_off_alone(
        cluster: Cluster, trust: Trust, workload: StaticIdentity) -> None:
    files = trust.workload(SERVER.namespace, SERVER.service_account)
    server_id = StaticIdentity.load(Path(files["certFile"]), Path(files["keyFile"]),
                                    trust.bundle)
    registry = CollectorRegistry()
    service = DestinationService(DestinationIndex(trust_domain=DOMAIN),
                                 trust=lambda: server_id.bundle, registry=registry,
                                 heartbeat=5.0, queue_limit=4)
    app = web.Application()
    service.add_routes(app)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    context = server_id.server_context()
    context.num_tickets = 0  # as the control plane's own context: no resumed sessions
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"https://127.0.0.1:{port}"
    service.watch_cluster(cluster.api(), asyncio.get_running_loop())
    try:
        await eventually(lambda: service.ready, what="the informers to sync")
        # The stalled watcher: a small receive window, and nothing read after the request.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        stalled_reader, stalled = await asyncio.open_connection(
            sock=sock, ssl=workload.client_context(), server_hostname=SERVER.dns_name)
        stalled.write(b"GET /v1/destinations HTTP/1.1\r\nHost: cp\r\n\r\n")
        await eventually(lambda: registry.get_sample_value("endpoints_subscribers") == 1,
                         what="the stalled watcher")
        big = ServiceSpec(name="big.default.svc.cluster.local", address="10.96.9.0:80",
                          endpoints=[EndpointSpec(address=f"10.1.{i // 250}.{i % 250}:8080",
                                                  target_port=8080) for i in range(1000)])
        async with aiohttp.ClientSession() as s, s.get(
                f"{url}/v1/destinations", ssl=workload.client_context(),
                server_hostname=SERVER.dns_name) as resp:
            received = bytearray()
            last = b'"address":"10.96.11.99:80"'

            async def drain() -> None:
                while last not in received[-200_000:]:
                    chunk = await resp.content.readany()
                    assert chunk, f"the stream ended early: {bytes(received[-300:])!r}"
                    received.extend(chunk)

            reading = asyncio.create_task(drain())
            for i in range(200):
                address = f"10.96.{10 + i // 100}.{i % 100}:80"
                service.publish([ServiceUpdated(msgspec.structs.replace(big, address=address))])
                await asyncio.sleep(0)
            async with asyncio.timeout(10):
                await reading
        assert registry.get_sample_value("endpoint_updates_queue_overflow_total") == 1
        # The stalled watcher's connection was dropped, not left to hang.
        async with asyncio.timeout(5):
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                while await stalled_reader.read(1 << 20):
                    pass
        stalled.close()
    finally:
        service.stop()
        await runner.cleanup()


def test_control_run_errors_exit_2_with_one_line(cluster: Cluster, trust: Trust,
                                                 tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    base = ["--kubeconfig", str(cluster.kubeconfig), "--identity-dir", str(trust.issuers.path),
            "--trust-domain", DOMAIN, "--listen", "127.0.0.1:0"]

    def argv(**change: str) -> list[str]:
        args = list(base)
        for flag, value in change.items():
            args[args.index("--" + flag.replace("_", "-")) + 1] = value
        return [sys.executable, "-m", "mesh.cli", "control", "run", *args]

    cases = {
        "kubeconfig": (argv(kubeconfig=str(tmp_path / "nope")), "kubeconfig"),
        "identity dir": (argv(identity_dir=str(tmp_path / "none")), "meshgate identity init"),
        "trust domain": (argv(trust_domain="other.example"), "trust domain cluster.local"),
        "port": (argv(listen=f"127.0.0.1:{port}"), f"cannot listen on 127.0.0.1:{port}"),
    }
    try:
        procs = {name: subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True) for name, (args, _) in cases.items()}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 2, (name, out, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("meshgate: "), (name, err)
            assert cases[name][1] in lines[0], (name, err)
    finally:
        busy.close()


async def test_a_failover_service_is_served_in_priority_groups(
        cluster: Cluster, control: ControlProcess, workload: StaticIdentity) -> None:
    from mesh.discovery.failover import CLUSTERS_ANNOTATION, POLICY_ANNOTATION
    from mirror.link import parse_spec
    from mirror.mirrors import GatewayEndpoint, mirror_service, mirror_slices

    shop = Shop(cluster)
    vip = shop.create_service()
    shop.pod("web-1", "10.244.5.1")
    disc: Any = client.DiscoveryV1Api(cluster.api())
    gateway = Identity("meshgate", "meshgate-gateway", DOMAIN).dns_name
    remote = {"metadata": {"name": "web", "namespace": shop.ns, "resourceVersion": "7"},
              "spec": {"ports": [{"name": "http", "port": 80}, {"name": "admin",
                                                                 "port": 9090}]}}
    for cluster_name, ip in (("west", "192.0.2.21"), ("central", "192.0.2.22")):
        link = parse_spec({"metadata": {"name": cluster_name}, "spec": {
            "targetClusterName": cluster_name, "clusterCredentialsSecret": "creds",
            "gatewayAddress": ip, "gatewayPort": 4143, "gatewayIdentity": gateway}})
        mirror = mirror_service(remote, link)
        shop.core.create_namespaced_service(shop.ns, mirror)
        for piece in mirror_slices(mirror, link, [GatewayEndpoint(ip, True)]).values():
            disc.create_namespaced_endpoint_slice(shop.ns, piece)
    shop.core.patch_namespaced_service("web", shop.ns, {"metadata": {"annotations": {
        CLUSTERS_ANNOTATION: "west,central", POLICY_ANNOTATION: "failback=5s"}}})

    def seen() -> list[tuple[int, str, str, str | None]]:
        spec = d.resolve((vip, 80))
        return [] if spec is None else [(e.priority, e.cluster, e.address, e.authority)
                                        for e in spec.endpoints]

    remote_name = f"web.{shop.ns}.svc.cluster.local"
    async with watching(control.url, workload) as d:
        await eventually(lambda: seen() == [
            (0, "test", "10.244.5.1:4143", None), (1, "west", "192.0.2.21:4143", remote_name),
            (2, "central", "192.0.2.22:4143", remote_name)], what="three priority groups")
        spec = d.resolve((vip, 80))
        assert spec is not None and spec.failback_s == 5.0
        assert [e.identity for e in spec.endpoints[1:]] == [gateway, gateway]
        # The declared order changes: the groups follow.
        shop.core.patch_namespaced_service("web", shop.ns, {"metadata": {"annotations": {
            CLUSTERS_ANNOTATION: "central,test,west"}}})
        await eventually(lambda: [g[:2] for g in seen()] == [
            (0, "central"), (1, "test"), (2, "west")], what="the new order")
        # Removing the annotation serves the Service plain again.
        shop.core.patch_namespaced_service("web", shop.ns, {"metadata": {"annotations": {
            CLUSTERS_ANNOTATION: None, POLICY_ANNOTATION: None}}})
        await eventually(lambda: seen() == [(0, "test", "10.244.5.1:4143", None)],
                         what="a plain Service")
