"""VM mesh expansion on the control-plane side, end to end: the ExternalWorkload CRD
served by the embedded cluster, `meshgate control run` (as a process, heartbeats
counted in fractions of a second, listening on two addresses) turning a Service's
ExternalWorkloads into EndpointSlices, the destination API handing the VM's proxy to
`WatchDiscovery` with its identity, and the policy API serving a VM's ports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes import client

from mesh.control.crds import install_crds
from mesh.control.externalworkloads import GROUP, MANAGED_BY, PLURAL, VERSION
from mesh.control.policy import GROUP as POLICY_GROUP
from mesh.control.policy import PLURALS, SERVER
from mesh.control.policy import VERSION as POLICY_VERSION
from mesh.discovery.client import WatchDiscovery
from mesh.discovery.index import MANAGED_BY_LABEL, SERVICE_NAME_LABEL
from mesh.identity.names import Identity, service_identity
from mesh.identity.static import StaticIdentity
from mesh.proxy.discovery import ServiceSpec
from mesh.proxy.policy import PolicyWatch
from tests.cluster import Cluster
from tests.controlplane import ControlProcess, eventually, get, start_control
from tests.meshproxy import DOMAIN, Trust

MERGE = "application/merge-patch+json"
CONTROL = service_identity(DOMAIN)
BEAT = 0.3
"""Seconds between heartbeats; two missed make a workload stale."""


@pytest.fixture(scope="module")
def control(cluster: Cluster, trust: Trust) -> Iterator[ControlProcess]:
    install_crds(cluster.api())
    c = start_control(cluster, trust, extra=(
        "--listen", "127.0.0.2:0", "--workload-heartbeat", f"{int(BEAT * 1000)}ms",
        "--workload-missed-heartbeats", "2"))
    try:
        yield c
    finally:
        c.stop()


class Site:
    """One namespace with a Service ``legacy`` (80 -> the workloads' port "http")."""

    def __init__(self, cluster: Cluster) -> None:
        api = cluster.api()
        # Bodies are dicts, which the client sends as they are; its types name only models.
        self.core: Any = client.CoreV1Api(api)
        self.custom: Any = client.CustomObjectsApi(api)
        self.discovery: Any = client.DiscoveryV1Api(api)
        self.ns = f"vm-{uuid.uuid4().hex[:8]}"
        self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
            name=self.ns)))

    def service(self, name: str = "legacy") -> str:
        created = self.core.create_namespaced_service(self.ns, {
            "metadata": {"name": name},
            "spec": {"selector": {"app": "legacy"},
                     "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}})
        return str(created.spec.cluster_ip)

    def workload(self, name: str, ip: str | None, *, labels: dict[str, str] | None = None
                 ) -> None:
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ExternalWorkload",
            "metadata": {"name": name, "labels": labels or {"app": "legacy"}},
            "spec": {"meshTLS": {"identity": self.identity(name), "serverName": name},
                     "ports": [{"name": "http", "port": 8080}],
                     "workloadIPs": [{"ip": ip}] if ip else []}})

    def identity(self, name: str) -> str:
        return Identity(self.ns, name, DOMAIN).dns_name

    def heartbeat(self, name: str, *, status: str = "True", reason: str = "Heartbeat") -> None:
        """What the VM agent does every interval: a fresh lastProbeTime on Ready."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.ns, PLURAL, name, {"status": {"conditions": [
                {"type": "Ready", "status": status, "lastProbeTime": now,
                 "lastTransitionTime": now, "reason": reason, "message": "agent"}]}},
            _content_type=MERGE)

    def slices(self, service: str = "legacy") -> list[dict[str, Any]]:
        body = self.discovery.list_namespaced_endpoint_slice(
            self.ns, label_selector=f"{SERVICE_NAME_LABEL}={service}",
            _preload_content=False)
        items: list[dict[str, Any]] = json.loads(body.data)["items"]
        return items

    def ours(self, service: str = "legacy") -> list[dict[str, Any]]:
        return [s for s in self.slices(service)
                if s["metadata"]["labels"].get(MANAGED_BY_LABEL) == MANAGED_BY]


@asynccontextmanager
async def heartbeating(site: Site, name: str) -> AsyncIterator[None]:
    async def beat() -> None:
        while True:
            await asyncio.to_thread(site.heartbeat, name)
            await asyncio.sleep(BEAT)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@asynccontextmanager
async def watching(url: str, workload: StaticIdentity) -> AsyncIterator[WatchDiscovery]:
    d = WatchDiscovery(url, context=workload.client_context, server_identity=CONTROL,
                       min_backoff=0.05, max_backoff=0.3)
    d.start()
    try:
        yield d
    finally:
        await d.stop()


def endpoints(spec: ServiceSpec | None) -> list[tuple[str, int, str | None]]:
    return [] if spec is None else [(e.address, e.target_port, e.identity)
                                    for e in spec.endpoints]


# -- the CRD -----------------------------------------------------------------------------


def test_the_crd_is_served_with_its_status_subresource(cluster: Cluster,
                                                       control: ControlProcess) -> None:
    site = Site(cluster)
    site.workload("joining", None)  # created by the operator before the VM joins
    site.custom.patch_namespaced_custom_object(
        GROUP, VERSION, site.ns, PLURAL, "joining",
        {"spec": {"workloadIPs": [{"ip": "192.0.2.40"}]}}, _content_type=MERGE)
    site.heartbeat("joining")
    obj = site.custom.get_namespaced_custom_object(GROUP, VERSION, site.ns, PLURAL, "joining")
    assert obj["spec"]["workloadIPs"] == [{"ip": "192.0.2.40"}]
    [ready] = obj["status"]["conditions"]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "True", "Heartbeat")
    # The status subresource writes status only.
    site.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, site.ns, PLURAL, "joining",
        {"spec": {"workloadIPs": []}, "status": {"conditions": []}}, _content_type=MERGE)
    obj = site.custom.get_namespaced_custom_object(GROUP, VERSION, site.ns, PLURAL, "joining")
    assert obj["spec"]["workloadIPs"] == [{"ip": "192.0.2.40"}]
    listed = site.custom.list_namespaced_custom_object(GROUP, VERSION, site.ns, PLURAL)
    assert [o["metadata"]["name"] for o in listed["items"]] == ["joining"]
    with pytest.raises(client.ApiException) as refused:
        site.custom.create_namespaced_custom_object(GROUP, VERSION, site.ns, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ExternalWorkload",
            "metadata": {"name": "no-identity"}, "spec": {"ports": []}})
    assert refused.value.status == 422


# -- the control plane -------------------------------------------------------------------


async def test_listens_on_every_address_given(control: ControlProcess,
                                              workload: StaticIdentity) -> None:
    assert len(control.urls) == 2 and "127.0.0.2" in control.urls[1]
    for url in control.urls:
        deadline = time.monotonic() + 10.0
        while (answer := await get(f"{url}/ready", workload.client_context()))[0] != 200:
            assert time.monotonic() < deadline, (url, answer)
            await asyncio.sleep(0.05)


async def test_a_vm_endpoint_follows_its_heartbeat(cluster: Cluster, control: ControlProcess,
                                                   workload: StaticIdentity) -> None:
    site = Site(cluster)
    vip = site.service()
    site.workload("vm1", "192.0.2.7")
    site.workload("vm-joining", None)
    site.workload("other", "192.0.2.9", labels={"app": "other"})
    vm = [("192.0.2.7:4143", 8080, site.identity("vm1"))]
    async with watching(control.url, workload) as d:
        async with heartbeating(site, "vm1"):
            await eventually(lambda: endpoints(d.resolve((vip, 80))) == vm, timeout=10.0,
                             what="the VM's endpoint")
            [ours] = site.ours()
            assert ours["ports"] == [{"name": "web", "port": 8080, "protocol": "TCP"}]
            assert [ep["targetRef"]["name"] for ep in ours["endpoints"]] == ["vm1"]
            # The cluster's own endpoints controller has been through (its slice is
            # there) and left ours alone.
            await eventually(lambda: len(site.slices()) == 2, what="both controllers' slices")
            assert [s["metadata"]["name"] for s in site.ours()] == [ours["metadata"]["name"]]
        # Heartbeats stop: the endpoint turns not ready and leaves the destination.
        await eventually(lambda: endpoints(d.resolve((vip, 80))) == [], timeout=10.0,
                         what="the stale VM gone")
        assert [ep["conditions"]["ready"] for ep in site.ours()[0]["endpoints"]] == [False]
        async with heartbeating(site, "vm1"):
            await eventually(lambda: endpoints(d.resolve((vip, 80))) == vm, timeout=10.0,
                             what="the VM back")
        # The agent leaving says so at once.
        site.heartbeat("vm1", status="False", reason="Left")
        await eventually(lambda: endpoints(d.resolve((vip, 80))) == [], timeout=10.0,
                         what="the VM that left gone")


async def test_slices_go_with_their_service(cluster: Cluster, control: ControlProcess) -> None:
    site = Site(cluster)
    site.service()
    site.workload("vm1", "192.0.2.8")
    await eventually(lambda: len(site.ours()) == 1, timeout=10.0, what="the slice")
    site.core.patch_namespaced_service("legacy", site.ns,
                                       {"spec": {"selector": {"app": "nothing"}}},
                                       _content_type=MERGE)
    await eventually(lambda: site.ours() == [], timeout=10.0, what="unselected slice gone")
    site.core.patch_namespaced_service("legacy", site.ns,
                                       {"spec": {"selector": {"app": "legacy"}}},
                                       _content_type=MERGE)
    await eventually(lambda: len(site.ours()) == 1, timeout=10.0, what="the slice again")
    site.core.delete_namespaced_service("legacy", site.ns)
    await eventually(lambda: site.ours() == [], timeout=10.0, what="orphan slice gone")


# -- policy ------------------------------------------------------------------------------


async def test_the_policy_api_serves_a_vms_ports(cluster: Cluster, control: ControlProcess,
                                                 workload: StaticIdentity) -> None:
    site = Site(cluster)
    site.workload("vm1", "192.0.2.10")
    friend = Identity(site.ns, "friend", DOMAIN).dns_name
    w = PolicyWatch(control.url, namespace=site.ns, external_workload="vm1",
                    context=workload.client_context, server_identity=CONTROL,
                    min_backoff=0.05, max_backoff=0.3)
    w.start()
    try:
        assert await w.wait_ready(10.0), f"no policy within 10s: {w.last_error}"
        assert w.for_port(8080).server is None  # no Server yet: the default
        site.custom.create_namespaced_custom_object(
            POLICY_GROUP, POLICY_VERSION, site.ns, PLURALS[SERVER], {
                "apiVersion": f"{POLICY_GROUP}/{POLICY_VERSION}", "kind": SERVER,
                "metadata": {"name": "vm-http"},
                "spec": {"externalWorkloadSelector": {"matchLabels": {"app": "legacy"}},
                         "port": "http", "accessPolicy": "deny"}})
        # A pod's Server of the same labels does not select the VM.
        site.custom.create_namespaced_custom_object(
            POLICY_GROUP, POLICY_VERSION, site.ns, PLURALS[SERVER], {
                "apiVersion": f"{POLICY_GROUP}/{POLICY_VERSION}", "kind": SERVER,
                "metadata": {"name": "pods-9000"},
                "spec": {"podSelector": {"matchLabels": {"app": "legacy"}}, "port": 9000,
                         "accessPolicy": "all-unauthenticated"}})
        await eventually(lambda: w.for_port(8080).server == f"{site.ns}/vm-http",
                         timeout=10.0, what="the VM's Server by its named port")
        assert not w.for_port(8080).allows(friend).allowed
        assert w.for_port(9000).server is None
    finally:
        await w.stop()
