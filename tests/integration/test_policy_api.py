"""The policy API end to end: a real embedded cluster with the policy CRDs installed,
`meshgate control run` as a process, and `PolicyWatch` (the inbound proxy's client)
or raw mTLS requests to ``/v1/policy``."""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from mesh.authz import AccessPolicy
from mesh.control.crds import install_crds
from mesh.control.policy import (
    AUTHORIZATION_POLICY,
    GROUP,
    MESH_TLS_AUTHENTICATION,
    PLURALS,
    SERVER,
    VERSION,
)
from mesh.identity import tls
from mesh.identity.bundle import TrustBundle
from mesh.identity.names import Identity, service_identity
from mesh.identity.static import StaticIdentity
from mesh.proxy.policy import PolicyWatch
from tests.cluster import Cluster
from tests.controlplane import ControlProcess, eventually, get, start_control
from tests.meshproxy import DOMAIN, Trust, free_port

MERGE = "application/merge-patch+json"
CONTROL = service_identity(DOMAIN)
HTTP, ADMIN = 8080, 9091
"""The pods' container ports, named http and admin."""


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> None:
    install_crds(cluster.api())  # without them the control plane never becomes ready


@pytest.fixture(scope="module")
def control(cluster: Cluster, trust: Trust, crds: None) -> Iterator[ControlProcess]:
    c = start_control(cluster, trust)
    try:
        yield c
    finally:
        c.stop()


class Tenant:
    """One namespace of the cluster, where a test puts pods and policy resources."""

    def __init__(self, cluster: Cluster) -> None:
        api = cluster.api()
        # Bodies are dicts, which the client sends as they are; its types name only models.
        self.core: Any = client.CoreV1Api(api)
        self.custom: Any = client.CustomObjectsApi(api)
        self.ns = f"p-{uuid.uuid4().hex[:8]}"
        self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
            name=self.ns)))

    def pod(self, name: str, labels: dict[str, str]) -> None:
        self.core.create_namespaced_pod(self.ns, {
            "metadata": {"name": name, "labels": labels},
            "spec": {"serviceAccountName": "web", "containers": [{
                "name": "app", "image": "web",
                "ports": [{"name": "http", "containerPort": HTTP},
                          {"name": "admin", "containerPort": ADMIN}]}]}})

    def relabel(self, pod: str, labels: dict[str, str]) -> None:
        self.core.patch_namespaced_pod(pod, self.ns, {"metadata": {"labels": labels}},
                                       _content_type=MERGE)

    def create(self, kind: str, name: str, spec: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURALS[kind], {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name},
            "spec": spec})

    def patch(self, kind: str, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURALS[kind], name,
                                                   {"spec": spec}, _content_type=MERGE)

    def server(self, name: str, port: int | str, app: str = "web") -> str:
        """A Server with the default accessPolicy (deny); returns its ``ns/name``."""
        self.create(SERVER, name, {"podSelector": {"matchLabels": {"app": app}}, "port": port})
        return f"{self.ns}/{name}"

    def identity(self, sa: str) -> str:
        return Identity(self.ns, sa, DOMAIN).dns_name


@asynccontextmanager
async def watching(url: str, workload: StaticIdentity, ns: str, pod: str
                   ) -> AsyncIterator[PolicyWatch]:
    w = PolicyWatch(url, namespace=ns, pod=pod, context=workload.client_context,
                    server_identity=CONTROL, min_backoff=0.05, max_backoff=0.3)
    w.start()
    try:
        assert await w.wait_ready(10.0), f"no policy within 10s: {w.last_error}"
        yield w
    finally:
        await w.stop()


@asynccontextmanager
async def raw_watch(url: str, ctx: ssl.SSLContext, query: str
                    ) -> AsyncIterator[Callable[[float], Awaitable[dict[str, Any]]]]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/policy{query}", ssl=ctx,
                                                   server_hostname=CONTROL.dns_name) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")

        async def next_message(timeout: float) -> dict[str, Any]:
            async with asyncio.timeout(timeout):
                line = await resp.content.readline()
            assert line, "the stream ended"
            msg: dict[str, Any] = json.loads(line)
            return msg

        yield next_message


def metric(page: str, name: str) -> float | None:
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


# -- tests ------------------------------------------------------------------------------


async def test_a_pod_without_servers_gets_the_default_policy(
        cluster: Cluster, control: ControlProcess, workload: StaticIdentity) -> None:
    t = Tenant(cluster)
    t.pod("web-1", {"app": "web"})
    async with raw_watch(control.url, workload.client_context(),
                         f"?namespace={t.ns}&pod=web-1") as next_message:
        assert await next_message(5.0) == {"type": "policy", "heartbeatSeconds": 0.5,
                                           "default": "all-authenticated", "ports": []}
        assert await next_message(3.0) == {"type": "heartbeat"}  # a quiet stream
    async with watching(control.url, workload, t.ns, "web-1") as w:
        assert w.default is AccessPolicy.ALL_AUTHENTICATED and w.ports == {}
        for port in (HTTP, ADMIN, 1):
            policy = w.for_port(port)
            assert policy.server is None and policy.access is AccessPolicy.ALL_AUTHENTICATED
            for client_id in (t.identity("client"), Identity("other", "x", DOMAIN).dns_name):
                assert policy.allows(client_id).allowed, (port, client_id)
            refused = policy.allows(None)
            assert not refused.allowed
            assert "default policy all-authenticated refuses an unauthenticated client" in \
                refused.reason


async def test_a_new_server_denies_its_port_and_leaves_the_others(
        cluster: Cluster, control: ControlProcess, workload: StaticIdentity) -> None:
    t = Tenant(cluster)
    t.pod("web-1", {"app": "web"})
    async with watching(control.url, workload, t.ns, "web-1") as w:
        assert w.for_port(HTTP).server is None
        server = t.server("web-http", HTTP)
        await eventually(lambda: w.for_port(HTTP).server == server, timeout=5.0,
                         what="the Server to reach the watch")
        policy = w.for_port(HTTP)
        assert policy.access is AccessPolicy.DENY and policy.authorizations == ()
        for client_id in (t.identity("client"), None):
            decision = policy.allows(client_id)
            assert not decision.allowed
            assert f"Server {server}" in decision.reason, decision.reason
        assert sorted(w.ports) == [HTTP]
        admin = w.for_port(ADMIN)
        assert admin.server is None and admin.allows(t.identity("client")).allowed
        assert not admin.allows(None).allowed
        assert w.connections == 1  # an update on the same stream is no reconnection


async def test_an_authorization_policy_admits_only_its_identities(
        cluster: Cluster, control: ControlProcess, workload: StaticIdentity) -> None:
    t = Tenant(cluster)
    t.pod("web-1", {"app": "web"})
    server = t.server("web-http", HTTP)
    friend, stranger = t.identity("friend"), t.identity("stranger")
    async with watching(control.url, workload, t.ns, "web-1") as w:
        await eventually(lambda: w.for_port(HTTP).server == server, timeout=5.0,
                         what="the Server")
        # The policy first, naming an authentication that does not exist yet: no one.
        t.create(AUTHORIZATION_POLICY, "web-friends", {
            "targetRef": {"group": GROUP, "kind": "Server", "name": "web-http"},
            "requiredAuthenticationRefs": [
                {"group": GROUP, "kind": MESH_TLS_AUTHENTICATION, "name": "friends"}]})
        await eventually(lambda: w.for_port(HTTP).authorizations, timeout=5.0,
                         what="the AuthorizationPolicy")
        assert not w.for_port(HTTP).allows(friend).allowed
        # The authentication appearing changes the policy that refers to it.
        t.create(MESH_TLS_AUTHENTICATION, "friends", {"identities": [friend]})
        await eventually(lambda: w.for_port(HTTP).allows(friend).allowed, timeout=5.0,
                         what="the MeshTLSAuthentication")
        policy = w.for_port(HTTP)
        assert policy.identities == {friend}
        assert f"AuthorizationPolicy {t.ns}/web-friends" in policy.allows(friend).reason
        for client_id in (stranger, None):
            refused = policy.allows(client_id)
            assert not refused.allowed
            assert f"authorizes {client_id or 'an unauthenticated client'}" in refused.reason
            assert f"{t.ns}/web-friends" in refused.reason and server in refused.reason
        assert w.for_port(ADMIN).allows(stranger).allowed  # no Server there


async def test_a_server_names_its_port_through_the_pods_containers(
        cluster: Cluster, control: ControlProcess, workload: StaticIdentity) -> None:
    t = Tenant(cluster)
    t.pod("web-1", {"app": "web"})
    by_name = t.server("web-http", "http")
    t.server("web-grpc", "grpc")  # no container port has that name: it selects nothing
    async with watching(control.url, workload, t.ns, "web-1") as w:
        await eventually(lambda: w.for_port(HTTP).server == by_name, timeout=5.0,
                         what="the named port")
        assert sorted(w.ports) == [HTTP]
        assert not w.for_port(HTTP).allows(t.identity("client")).allowed
        admin = t.server("web-admin", "admin")
        await eventually(lambda: w.for_port(ADMIN).server == admin, timeout=5.0,
                         what="the second named port")
        assert sorted(w.ports) == [HTTP, ADMIN]


async def test_relabelling_the_pod_away_from_the_server_restores_the_default(
        cluster: Cluster, control: ControlProcess, workload: StaticIdentity) -> None:
    t = Tenant(cluster)
    t.pod("web-1", {"app": "web", "tier": "front"})
    server = t.server("web-http", HTTP)
    async with watching(control.url, workload, t.ns, "web-1") as w:
        await eventually(lambda: w.for_port(HTTP).server == server, timeout=5.0,
                         what="the Server")
        t.relabel("web-1", {"app": "moved"})
        await eventually(lambda: w.ports == {}, timeout=5.0, what="the default again")
        policy = w.for_port(HTTP)
        assert policy.server is None and policy.access is AccessPolicy.ALL_AUTHENTICATED
        assert policy.allows(t.identity("client")).allowed
        t.relabel("web-1", {"app": "web"})
        await eventually(lambda: w.for_port(HTTP).server == server, timeout=5.0,
                         what="the Server once more")


async def test_a_watch_for_a_later_pod_starts_default_then_fills(
        cluster: Cluster, control: ControlProcess, workload: StaticIdentity) -> None:
    t = Tenant(cluster)
    server = t.server("web-http", HTTP)
    async with raw_watch(control.url, workload.client_context(),
                         f"?namespace={t.ns}&pod=late") as next_message:
        first = await next_message(5.0)
        assert first["default"] == "all-authenticated" and first["ports"] == []
        async with watching(control.url, workload, t.ns, "late") as w:
            assert w.ports == {} and w.for_port(HTTP).allows(t.identity("client")).allowed
            t.pod("late", {"app": "web"})
            await eventually(lambda: w.for_port(HTTP).server == server, timeout=5.0,
                             what="the pod's policies")
            assert not w.for_port(HTTP).allows(t.identity("client")).allowed
            # The pod going away takes its policies with it.
            t.core.delete_namespaced_pod("late", t.ns)
            await eventually(lambda: w.ports == {}, timeout=5.0, what="the default again")
        while (msg := await next_message(5.0))["type"] != "policy":
            pass  # heartbeats
        assert [p["server"] for p in msg["ports"]] == [server]
        assert msg["ports"][0]["port"] == HTTP and msg["ports"][0]["access"] == "deny"


async def test_a_client_without_certificate_is_refused(
        control: ControlProcess, trust: Trust) -> None:
    anonymous = tls.client_context(TrustBundle.from_pem(trust.bundle.read_bytes()))
    status, text = await get(f"{control.url}/v1/policy?namespace=default&pod=web", anonymous)
    assert status == 401, text
    body = json.loads(text)
    assert body["error"] == "no-certificate" and "mutual TLS" in body["message"]


@pytest.mark.parametrize(("query", "named"), [
    ("", "namespace"),
    ("?pod=web", "namespace"),
    ("?namespace=&pod=web", "namespace"),
    ("?namespace=default", "pod"),
    ("?namespace=default&pod=", "pod"),
    ("?namespace=default&pod=web&port=80", "port"),
    ("?namespace=default&pod=web&externalworkload=vm", "externalworkload"),
    ("?service=web:80", "service"),
])
async def test_malformed_queries_get_400_naming_the_parameter(
        control: ControlProcess, workload: StaticIdentity, query: str, named: str) -> None:
    status, text = await get(f"{control.url}/v1/policy{query}", workload.client_context())
    assert status == 400, (query, text)
    body = json.loads(text)
    assert body["error"] == "malformed" and named in body["message"], (query, body)


async def test_an_invalid_resource_is_logged_counted_and_ignored(
        cluster: Cluster, control: ControlProcess, workload: StaticIdentity) -> None:
    t = Tenant(cluster)
    t.pod("web-1", {"app": "web"})
    server = t.server("web-http", HTTP)
    async with watching(control.url, workload, t.ns, "web-1") as w:
        await eventually(lambda: w.for_port(HTTP).server == server, timeout=5.0,
                         what="the Server")
        # The schema takes any Namespace name; the index only the policy's own.
        t.create(AUTHORIZATION_POLICY, "elsewhere", {
            "targetRef": {"kind": "Namespace", "name": "kube-system"},
            "requiredAuthenticationRefs": []})
        marker = f"policy resource ignored kind={AUTHORIZATION_POLICY} name={t.ns}/elsewhere "

        def reported() -> list[str]:
            return [line for line in list(control.output) if marker in line]

        await eventually(reported, timeout=5.0, what="the ignored resource's log line")
        # The control plane carries on: a valid change still reaches the watch.
        t.create(AUTHORIZATION_POLICY, "everyone", {
            "targetRef": {"kind": "Namespace", "name": t.ns},
            "requiredAuthenticationRefs": []})
        await eventually(lambda: w.for_port(HTTP).allows(None).allowed, timeout=5.0,
                         what="the valid policy")
        assert [a.policy for a in w.for_port(HTTP).authorizations] == [f"{t.ns}/everyone"]
        lines = reported()
        assert len(lines) == 1, lines
        assert "spec.targetRef.name" in lines[0] and '"kube-system"' in lines[0]
        assert lines[0].rstrip("\n").count("\n") == 0
    status, page = await get(f"{control.url}/metrics", workload.client_context())
    assert status == 200
    invalid = metric(page, "policy_invalid_resources")
    assert invalid is not None and invalid >= 1, page


@pytest.mark.usefixtures("crds")
async def test_last_policy_survives_the_control_plane_and_catches_up(
        cluster: Cluster, trust: Trust, workload: StaticIdentity) -> None:
    port = free_port()
    plane = start_control(cluster, trust, port=port)
    try:
        t = Tenant(cluster)
        t.pod("web-1", {"app": "web"})
        client_id = t.identity("client")
        async with watching(plane.url, workload, t.ns, "web-1") as w:
            server = t.server("web-http", HTTP)
            await eventually(lambda: w.for_port(HTTP).server == server, timeout=5.0,
                             what="the Server")
            before = w.for_port(HTTP)
            assert not before.allows(client_id).allowed
            plane.kill()
            await eventually(lambda: not w.connected, timeout=5.0, what="the stream to drop")
            await eventually(lambda: "unreachable" in str(w.last_error), timeout=5.0,
                             what="a reconnection to fail")
            t.patch(SERVER, "web-http", {"accessPolicy": "all-authenticated"})
            assert w.for_port(HTTP) == before  # still the last known policy
            assert not w.for_port(HTTP).allows(client_id).allowed
            plane = start_control(cluster, trust, port=port)
            await eventually(lambda: w.for_port(HTTP).access is AccessPolicy.ALL_AUTHENTICATED,
                             timeout=10.0, what="the change made while it was down")
            assert w.for_port(HTTP).allows(client_id).allowed
            assert w.for_port(HTTP).server == server
            assert w.connected and w.connections == 2
    finally:
        plane.stop()
