"""The mirror controller (`meshgate mirror run`) against two embedded API servers
on loopback: east imports, west exports.

Each test has its own Link, with its own cluster name and a selector on its own
label, so the tests share the two clusters without seeing each other's
mirrors. Controllers run as real processes; the gateway probe hits a small
HTTP server on 127.0.0.1 that tests stop and start.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException
from prometheus_client.parser import text_string_to_metric_families

from mirror.crds import install_crds
from mirror.link import GROUP, PLURAL, VERSION
from mirror.mirrors import (
    CLUSTER_LABEL,
    FULL_NAME_ANNOTATION,
    GATEWAY_IDENTITY_ANNOTATION,
    MIRRORED_LABEL,
    REMOTE_FQ_NAME_ANNOTATION,
    REMOTE_VERSION_ANNOTATION,
    SERVICE_NAME_LABEL,
    mirror_name,
)
from tests.cluster import Cluster, spawn, start_cluster, stop_process, wait_for
from tests.meshproxy import free_port

NS = "meshgate"
EXPORTED = "mirror.meshgate.io/exported"
GATEWAY_IDENTITY = "gateway.meshgate.serviceaccount.identity.meshgate.west.example"
LEASE_DURATION, LEASE_RENEW = 2.0, 0.5


# -- a gateway probe target ----------------------------------------------------------

class _Ready(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"ready\n" if self.path == "/ready" else b"not found\n"
        self.send_response(200 if self.path == "/ready" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class ProbeTarget:
    """`GET /ready` answered on 127.0.0.1:`port` while started."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _Ready)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# -- a controller process ------------------------------------------------------------

@dataclass
class Controller:
    proc: Any
    output: list[str]
    metrics_url: str

    def logged(self, text: str) -> int:
        return sum(1 for line in list(self.output) if text in line)

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        wait_for(lambda: self.logged(text), timeout=timeout, what=f"log line {text!r}:\n"
                 + "".join(self.output))

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            return str(resp.read().decode())

    def sample(self, name: str, text: str | None = None, **labels: str) -> float:
        """One sample's value, from `text` (one scrape) or a new scrape; 0 if absent."""
        for family in text_string_to_metric_families(text or self.metrics()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0

    def stop(self) -> None:
        stop_process(self.proc)

    def kill(self) -> None:
        """Crash it: it stops at whatever line it is on, requests in flight included."""
        self.proc.kill()
        self.proc.wait()


# -- the two clusters ------------------------------------------------------------------

@dataclass
class Env:
    east: Cluster
    west: Cluster
    gateway: ProbeTarget
    controllers: list[Controller] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ecore = client.CoreV1Api(self.east.api())
        self.wcore = client.CoreV1Api(self.west.api())
        self.custom = client.CustomObjectsApi(self.east.api())
        self.slices_api = client.DiscoveryV1Api(self.east.api())

    # west ---------------------------------------------------------------------------

    def namespace(self, core: client.CoreV1Api, name: str) -> None:
        try:
            core.create_namespace({"metadata": {"name": name}})
        except ApiException as e:
            if e.status != 409:
                raise

    def export(self, ns: str, name: str, test: str, *, exported: bool = True,
               labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
               ports: list[dict[str, Any]] | None = None, core: client.CoreV1Api | None = None
               ) -> None:
        core = core or self.wcore
        self.namespace(core, ns)
        all_labels = {"mirror-test": test, **(labels or {})}
        if exported:
            all_labels[EXPORTED] = "true"
        core.create_namespaced_service(ns, {
            "metadata": {"name": name, "labels": all_labels, "annotations": annotations or {}},
            "spec": {"selector": {"app": name},
                     "ports": ports or [{"name": "http", "port": 80, "targetPort": 8080}]}})

    # east ---------------------------------------------------------------------------

    def secret(self, name: str, kubeconfig: str,
               type_: str = "mirror.meshgate.io/remote-kubeconfig") -> None:
        body = {"metadata": {"name": name}, "type": type_,
                "data": {"kubeconfig": base64.b64encode(kubeconfig.encode()).decode()}}
        try:
            self.ecore.create_namespaced_secret(NS, body)
        except ApiException as e:
            if e.status != 409:
                raise
            if self.ecore.read_namespaced_secret(name, NS).type == type_:
                self.ecore.patch_namespaced_secret(name, NS, {"data": body["data"]})
            else:  # a Secret's type cannot change
                self.ecore.delete_namespaced_secret(name, NS)
                self.ecore.create_namespaced_secret(NS, body)

    def link(self, name: str, cluster: str, test: str, *, secret: str = "west-creds",
             **spec: Any) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Link",
                "metadata": {"name": name},
                "spec": {"targetClusterName": cluster, "clusterCredentialsSecret": secret,
                         "gatewayAddress": "127.0.0.1", "gatewayPort": 4143,
                         "gatewayIdentity": GATEWAY_IDENTITY,
                         "probeSpec": {"port": self.gateway.port, "period": "300ms",
                                       "timeout": "250ms"},
                         "selector": {"matchLabels": {EXPORTED: "true", "mirror-test": test}},
                         **spec}}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)

    def read_link(self, name: str) -> dict[str, Any] | None:
        try:
            resp = self.custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name,
                                                            _preload_content=False)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        body: dict[str, Any] = json.loads(resp.data)
        return body

    def condition(self, link: str, kind: str) -> dict[str, Any]:
        for c in ((self.read_link(link) or {}).get("status") or {}).get("conditions") or []:
            if c["type"] == kind:
                return dict(c)
        return {}

    def mirror(self, ns: str, name: str) -> dict[str, Any] | None:
        try:
            resp = self.ecore.read_namespaced_service(name, ns, _preload_content=False)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        body: dict[str, Any] = json.loads(resp.data)
        return body

    def mirrors(self, cluster: str) -> dict[str, dict[str, Any]]:
        resp = self.ecore.list_service_for_all_namespaces(
            label_selector=f"{MIRRORED_LABEL}=true,{CLUSTER_LABEL}={cluster}",
            _preload_content=False)
        return {f"{o['metadata']['namespace']}/{o['metadata']['name']}": o
                for o in json.loads(resp.data)["items"]}

    def slices(self, ns: str, service: str) -> list[dict[str, Any]]:
        resp = self.slices_api.list_namespaced_endpoint_slice(
            ns, label_selector=f"{SERVICE_NAME_LABEL}={service}", _preload_content=False)
        items: list[dict[str, Any]] = json.loads(resp.data)["items"]
        return items

    def cluster_slices(self, cluster: str) -> list[dict[str, Any]]:
        resp = self.slices_api.list_endpoint_slice_for_all_namespaces(
            label_selector=f"{CLUSTER_LABEL}={cluster}", _preload_content=False)
        items: list[dict[str, Any]] = json.loads(resp.data)["items"]
        return items

    def controller(self, link: str, *, identity: str | None = None, resync: float = 1.0
                   ) -> Controller:
        args = [sys.executable, "-m", "mesh.cli", "mirror", "run", "--kubeconfig",
                str(self.east.kubeconfig), "--link", link, "--namespace", NS,
                "--metrics-listen", "127.0.0.1:0", "--resync", str(resync),
                "--lease-duration", str(LEASE_DURATION), "--lease-renew", str(LEASE_RENEW),
                "--identity", identity or f"{link}-controller"]
        proc, output, _, line = spawn(args, lambda text: "metrics at http://" in text,
                                      what=f"mirror controller for {link}")
        match = re.search(r"metrics at (http://\S+)", line)
        assert match, line
        c = Controller(proc, output, match.group(1))
        self.controllers.append(c)
        return c


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = Path(tmp_path_factory.mktemp("mirror"))
    west = start_cluster(root / "west", "--service-cidr", "10.97.0.0/16", name="west")
    east = start_cluster(root / "east", "--service-cidr", "10.96.0.0/16", name="east")
    gateway = ProbeTarget()
    gateway.start()
    e = Env(east, west, gateway)
    try:
        install_crds(east.api())
        e.namespace(e.ecore, NS)
        e.secret("west-creds", west.kubeconfig.read_text())
        yield e
    finally:
        for c in e.controllers:  # all at once: each takes a moment to let go
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        for c in e.controllers:
            c.stop()
        gateway.stop()
        east.stop()
        west.stop()


def _ports(svc: dict[str, Any]) -> list[tuple[str, int, int]]:
    return [(p.get("name", ""), p["port"], p["targetPort"]) for p in svc["spec"]["ports"]]


# -- mirroring ------------------------------------------------------------------------

def test_exported_services_are_mirrored_updated_and_deleted(env: Env) -> None:
    env.export("crud", "web", "crud", labels={"tier": "front", "secret-key": "x"},
               annotations={"team": "shop", "internal.example.com/cost": "3"})
    env.export("crud", "db", "crud", exported=False)
    env.link("crud", "wcrud", "crud", excludedLabels=["secret-*"],
             excludedAnnotations=["internal.example.com/*"])
    c = env.controller("crud")

    web = wait_for(lambda: env.mirror("crud", "web-wcrud"), what="mirror of web")
    meta = web["metadata"]
    assert meta["labels"] == {"mirror-test": "crud", "tier": "front", MIRRORED_LABEL: "true",
                              CLUSTER_LABEL: "wcrud"}
    assert meta["annotations"]["team"] == "shop"
    assert "internal.example.com/cost" not in meta["annotations"]
    assert meta["annotations"][REMOTE_FQ_NAME_ANNOTATION] == "web.crud.svc.cluster.local"
    assert not web["spec"].get("selector") and web["spec"]["clusterIP"].startswith("10.96.")
    assert _ports(web) == [("http", 80, 80)]
    (s,) = wait_for(lambda: env.slices("crud", "web-wcrud"), what="slice of web-wcrud")
    assert s["metadata"]["annotations"][GATEWAY_IDENTITY_ANNOTATION] == GATEWAY_IDENTITY
    assert s["ports"] == [{"name": "http", "port": 4143, "protocol": "TCP"}]
    assert [(e["addresses"], e["conditions"]["ready"]) for e in s["endpoints"]] == [
        (["127.0.0.1"], True)]
    assert env.mirror("crud", "db-wcrud") is None  # not exported

    # An update: a new port, a label gone, an annotation changed.
    env.wcore.patch_namespaced_service("web", "crud", {
        "metadata": {"labels": {"tier": None}, "annotations": {"team": "checkout"}},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080},
                           {"name": "admin", "port": 9990, "targetPort": 9990}]}})
    remote_version = env.wcore.read_namespaced_service("web", "crud").metadata.resource_version

    def updated() -> bool:
        m = env.mirror("crud", "web-wcrud") or {}
        return (m.get("metadata", {}).get("annotations", {}).get(REMOTE_VERSION_ANNOTATION)
                == remote_version)

    wait_for(updated, what="the mirror to follow the update")
    web = env.mirror("crud", "web-wcrud") or {}
    assert "tier" not in web["metadata"]["labels"]
    assert web["metadata"]["annotations"]["team"] == "checkout"
    assert _ports(web) == [("http", 80, 80), ("admin", 9990, 9990)]
    wait_for(lambda: len(env.slices("crud", "web-wcrud")[0]["ports"]) == 2)

    # Exporting db mirrors it; unexporting web removes its mirror and slice.
    env.wcore.patch_namespaced_service("db", "crud", {"metadata": {"labels": {EXPORTED: "true"}}})
    wait_for(lambda: env.mirror("crud", "db-wcrud"), what="mirror of db once exported")
    env.wcore.patch_namespaced_service("web", "crud", {"metadata": {"labels": {EXPORTED: None}}})
    wait_for(lambda: env.mirror("crud", "web-wcrud") is None, what="web's mirror to go")
    wait_for(lambda: not env.slices("crud", "web-wcrud"), what="web's slice to go")

    # Deleting a remote Service deletes its mirror; the status counts what is left.
    wait_for(lambda: (env.read_link("crud") or {}).get("status", {}).get(
        "mirroredServices") == [{"name": "db-wcrud", "namespace": "crud", "remoteName": "db",
                                 "remoteNamespace": "crud"}], what="status listing db")
    env.wcore.delete_namespaced_service("db", "crud")
    wait_for(lambda: not env.mirrors("wcrud") and not env.cluster_slices("wcrud"),
             what="every mirror of wcrud to go")
    wait_for(lambda: (env.read_link("crud") or {}).get("status", {}).get(
        "mirroredServiceCount") == 0)
    assert env.condition("crud", "Ready")["status"] == "True"
    assert c.proc.poll() is None


def test_restart_mid_sync_converges_without_duplicates(env: Env) -> None:
    names = [f"svc-{i:02d}" for i in range(40)]
    for name in names:
        env.export("resync", name, "resync")
    env.link("resync", "wrs", "resync")
    first = env.controller("resync")
    wait_for(lambda: env.mirrors("wrs"), interval=0.005, what="the first mirror")
    first.kill()  # most likely in the middle of creating the rest
    done = set(env.mirrors("wrs"))

    # While nothing runs: remote services go, come and change; a mirror loses its
    # slice and gets a stray label, as a crash between two writes could leave it.
    some = sorted(done)[0].split("/")[1]
    deleted = [n for n in reversed(names) if f"{n}-wrs" != some][:3]
    for name in deleted:
        env.wcore.delete_namespaced_service(name, "resync")
    env.export("resync", "late-1", "resync")
    env.export("resync", "late-2", "resync")
    env.wcore.patch_namespaced_service("svc-10", "resync", {"metadata": {"labels": {"v": "2"}}})
    for s in env.slices("resync", some):
        env.slices_api.delete_namespaced_endpoint_slice(s["metadata"]["name"], "resync")
    env.ecore.patch_namespaced_service(some, "resync", {"metadata": {"labels": {
        "stale": "yes"}}})

    second = env.controller("resync")  # the same identity: it holds the Lease at once
    expected = {f"resync/{n}-wrs" for n in names if n not in deleted} | {
        "resync/late-1-wrs", "resync/late-2-wrs"}
    wait_for(lambda: set(env.mirrors("wrs")) == expected, timeout=15,
             what=f"exactly the expected mirrors (had {len(done)} at the kill)")

    def converged() -> bool:
        slices = env.cluster_slices("wrs")
        owners = [s["metadata"]["labels"][SERVICE_NAME_LABEL] for s in slices]
        return sorted(owners) == sorted(k.split("/")[1] for k in expected)

    wait_for(converged, timeout=15, what="one slice per mirror")
    mirrors = env.mirrors("wrs")
    assert "stale" not in mirrors[f"resync/{some}"]["metadata"]["labels"]
    assert mirrors["resync/svc-10-wrs"]["metadata"]["labels"]["v"] == "2"
    assert second.proc.poll() is None


def test_orphans_are_collected_at_start_and_on_resync(env: Env) -> None:
    env.namespace(env.ecore, "orphans")

    def stale(name: str, cluster: str = "worph", *, mirrored: bool = True) -> None:
        labels = {CLUSTER_LABEL: cluster, **({MIRRORED_LABEL: "true"} if mirrored else {})}
        env.ecore.create_namespaced_service("orphans", {
            "metadata": {"name": name, "labels": labels, "annotations": {
                REMOTE_FQ_NAME_ANNOTATION: f"{name}.orphans.svc.cluster.local"}},
            "spec": {"ports": [{"port": 80}]}})
        env.slices_api.create_namespaced_endpoint_slice("orphans", {
            "metadata": {"name": name, "labels": {
                SERVICE_NAME_LABEL: name, "endpointslice.kubernetes.io/managed-by":
                "mirror.meshgate.io", **labels}},
            "addressType": "IPv4", "endpoints": [], "ports": []})

    stale("gone-worph")
    stale("other-cluster-svc", cluster="elsewhere")
    stale("not-a-mirror", mirrored=False)
    env.export("orphans", "live", "orphans")
    env.link("orphans", "worph", "orphans")
    env.controller("orphans", resync=0.5)

    wait_for(lambda: env.mirror("orphans", "gone-worph") is None, what="the orphan to go")
    wait_for(lambda: not env.slices("orphans", "gone-worph"), what="the orphan's slice to go")
    assert env.mirror("orphans", "live-worph") is not None
    assert env.mirror("orphans", "other-cluster-svc") is not None  # another link's
    assert env.mirror("orphans", "not-a-mirror") is not None  # not a mirror at all

    stale("appeared-later-worph")
    wait_for(lambda: env.mirror("orphans", "appeared-later-worph") is None,
             what="an orphan made while running to go")


def test_long_names_are_shortened_with_a_stable_hash(env: Env) -> None:
    long_service = "a-remarkably-long-service-name-for-the-checkout-flow"  # 52 characters
    cluster = "west-with-a-long-name"
    env.export("longnames", long_service, "longnames")
    env.link("longnames", cluster, "longnames")
    env.controller("longnames")
    name, full = mirror_name(long_service, cluster)
    assert len(full) > 63 and len(name) == 63
    svc = wait_for(lambda: env.mirror("longnames", name), what="the shortened mirror")
    assert svc["metadata"]["annotations"][FULL_NAME_ANNOTATION] == full
    assert name.rsplit("-", 1)[0] in full
    (s,) = wait_for(lambda: env.slices("longnames", name))
    assert s["metadata"]["name"] == name


def test_namespace_mapping_places_mirrors_and_moves_them(env: Env) -> None:
    env.export("mapsrc", "api", "mapping")
    env.link("mapping", "wmap", "mapping", namespaceMapping={"mapsrc": "mapped-one"})
    env.controller("mapping")
    wait_for(lambda: env.mirror("mapped-one", "api-wmap"), what="the mirror in mapped-one")
    ns = env.ecore.read_namespace("mapped-one")
    assert ns.metadata.labels[CLUSTER_LABEL] == "wmap"
    assert env.mirror("mapsrc", "api-wmap") is None

    env.custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "mapping",
        {"spec": {"namespaceMapping": {"mapsrc": "mapped-two"}}},
        _content_type="application/merge-patch+json")
    wait_for(lambda: env.mirror("mapped-two", "api-wmap"), what="the mirror in mapped-two")
    wait_for(lambda: env.mirror("mapped-one", "api-wmap") is None, what="the old mirror to go")
    assert set(env.mirrors("wmap")) == {"mapped-two/api-wmap"}


def test_deleting_the_link_removes_its_mirrors(env: Env) -> None:
    env.export("unlink", "one", "unlink")
    env.export("unlink", "two", "unlink")
    env.link("unlink", "wun", "unlink")
    env.controller("unlink")
    wait_for(lambda: len(env.mirrors("wun")) == 2 and len(env.cluster_slices("wun")) == 2,
             what="two mirrors and their slices")
    assert "mirror.meshgate.io/cleanup" in (env.read_link("unlink") or {})["metadata"][
        "finalizers"]
    env.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "unlink")
    wait_for(lambda: env.read_link("unlink") is None, what="the Link to be deleted")
    assert env.mirrors("wun") == {}
    assert env.cluster_slices("wun") == []


# -- one active controller --------------------------------------------------------------

def test_a_standby_takes_over_when_the_active_controller_dies(env: Env) -> None:
    env.export("handover", "before", "handover")
    env.link("handover", "whand", "handover")
    a = env.controller("handover", identity="mirror-a")
    a.wait_log("lease acquired")
    wait_for(lambda: env.mirror("handover", "before-whand"))
    b = env.controller("handover", identity="mirror-b")
    b.wait_log("standing by")
    lease = client.CoordinationV1Api(env.east.api()).read_namespaced_lease("mirror-handover", NS)
    assert lease.spec.holder_identity == "mirror-a"

    a.kill()
    killed = time.monotonic()
    b.wait_log("lease acquired", timeout=LEASE_DURATION + 5)
    assert time.monotonic() - killed < LEASE_DURATION + LEASE_RENEW + 2
    lease = client.CoordinationV1Api(env.east.api()).read_namespaced_lease("mirror-handover", NS)
    assert lease.spec.holder_identity == "mirror-b"
    env.export("handover", "after", "handover")
    wait_for(lambda: env.mirror("handover", "after-whand"), what="the new leader to mirror")
    assert b.logged("mirror created service=handover/before-whand") == 0  # it was there


# -- the gateway probe ------------------------------------------------------------------

def test_probe_hysteresis_marks_endpoints_not_ready_and_back(env: Env) -> None:
    target = ProbeTarget()
    target.start()
    env.export("probing", "web", "probing")
    env.link("probing", "wprobe", "probing", probeSpec={
        "port": target.port, "path": "/ready", "period": "300ms", "timeout": "250ms",
        "failureThreshold": 3, "successThreshold": 2})
    c = env.controller("probing")

    def ready() -> bool | None:
        found = env.slices("probing", "web-wprobe")
        return found[0]["endpoints"][0]["conditions"]["ready"] if found else None

    wait_for(lambda: ready() is True, what="ready endpoints")
    wait_for(lambda: c.sample("gateway_alive", target_cluster_name="wprobe") == 1)
    labels = {"target_cluster_name": "wprobe"}

    def scrape() -> tuple[float, float]:
        """(gateway_alive, failed probes) from one scrape, so they agree."""
        text = c.metrics()
        return (c.sample("gateway_alive", text, **labels),
                c.sample("gateway_probes_total", text, probe_successful="false", **labels))

    target.stop()
    failed_before = scrape()[1]
    tolerated, alive, failed = 0.0, 1.0, failed_before
    deadline = time.monotonic() + 10
    while alive and time.monotonic() < deadline:
        alive, failed = scrape()
        if alive:
            tolerated = max(tolerated, failed - failed_before)
            assert ready() is True
        time.sleep(0.03)
    assert not alive
    assert 1 <= tolerated <= 2, "one or two failed probes must not make endpoints not-ready"
    assert failed - failed_before >= 3
    wait_for(lambda: ready() is False, what="endpoints not ready")
    gone = wait_for(lambda: env.condition("probing", "GatewayAlive").get("status") == "False"
                    and env.condition("probing", "GatewayAlive"))
    assert gone["reason"] == "ProbeFailed" and "127.0.0.1" in gone["message"]

    target.start()
    wait_for(lambda: ready() is True, what="endpoints ready again")
    assert c.sample("gateway_alive", **labels) == 1
    assert c.sample("gateway_probe_latency_ms_count", **labels) >= 2
    text = c.metrics()
    assert 'gateway_probe_latency_ms_bucket{le="50.0",target_cluster_name="wprobe"}' in text
    wait_for(lambda: env.condition("probing", "GatewayAlive").get("status") == "True")
    target.stop()


# -- credentials and the remote API -----------------------------------------------------

def _forbidden_kubeconfig(env: Env) -> str:
    """A kubeconfig for west whose token belongs to a ServiceAccount with no role."""
    env.namespace(env.wcore, "nobody")
    env.wcore.create_namespaced_service_account("nobody", {"metadata": {"name": "nobody"}})
    token = env.wcore.create_namespaced_service_account_token(
        "nobody", "nobody", {"spec": {"audiences": [], "expirationSeconds": 3600}}).status.token
    doc = yaml.safe_load(env.west.kubeconfig.read_text())
    doc["users"][0]["user"] = {"token": token}
    return str(yaml.safe_dump(doc))


def test_bad_credentials_are_reported_and_mirrors_kept(env: Env) -> None:
    env.secret("creds-secret", env.west.kubeconfig.read_text())
    env.export("creds", "kept", "creds")
    env.link("creds", "wcreds", "creds", secret="creds-secret")
    c = env.controller("creds")
    wait_for(lambda: env.mirror("creds", "kept-wcreds"), what="the first mirror")

    def reason() -> str:
        return str(env.condition("creds", "CredentialsValid").get("reason"))

    env.secret("creds-secret", "clusters: [this is: not a kubeconfig")
    wait_for(lambda: reason() == "SecretMalformed", what="SecretMalformed")
    assert "meshgate/creds-secret" in env.condition("creds", "CredentialsValid")["message"]
    assert env.condition("creds", "Ready")["reason"] == "SecretMalformed"

    env.ecore.delete_namespaced_secret("creds-secret", NS)
    wait_for(lambda: reason() == "SecretNotFound", what="SecretNotFound")
    # Meanwhile the remote Service goes: without a credential nothing is compared,
    # so its mirror stays until the link works again.
    env.wcore.delete_namespaced_service("kept", "creds")
    env.export("creds", "added", "creds")
    time.sleep(1.5)  # several retries with backoff
    assert env.mirror("creds", "kept-wcreds") is not None
    assert c.logged("reason=SecretNotFound") == 1, "one log line per problem"

    env.secret("creds-secret", _forbidden_kubeconfig(env))
    wait_for(lambda: reason() == "CredentialsForbidden", what="CredentialsForbidden")
    assert env.mirror("creds", "kept-wcreds") is not None

    doc = yaml.safe_load(env.west.kubeconfig.read_text())
    doc["users"][0]["user"] = {"token": "a-token-that-expired-long-ago"}
    env.secret("creds-secret", yaml.safe_dump(doc))
    wait_for(lambda: reason() == "CredentialsRejected", what="CredentialsRejected")
    assert "401" in env.condition("creds", "CredentialsValid")["message"]

    env.secret("creds-secret", env.west.kubeconfig.read_text(), type_="Opaque")
    wait_for(lambda: reason() == "SecretWrongType", what="SecretWrongType")

    env.secret("creds-secret", env.west.kubeconfig.read_text())
    wait_for(lambda: reason() == "Verified", what="the credential to work again")
    wait_for(lambda: env.mirror("creds", "added-wcreds"), what="the new mirror")
    wait_for(lambda: env.mirror("creds", "kept-wcreds") is None, what="the stale mirror to go")
    assert c.logged("link connected again") >= 1


def test_a_remote_api_going_away_keeps_mirrors(env: Env, tmp_path: Path) -> None:
    port = free_port()
    far = start_cluster(tmp_path / "far", "--listen", f"127.0.0.1:{port}", name="far")
    try:
        env.secret("far-creds", far.kubeconfig.read_text())
        fcore = client.CoreV1Api(far.api())
        env.export("faraway", "svc", "far", core=fcore)
        env.link("far", "wfar", "far", secret="far-creds")
        c = env.controller("far")
        wait_for(lambda: env.mirror("faraway", "svc-wfar"), what="the mirror")
        far.kill()  # gone without a word, as a crashed or cut-off API server is

        def reachable() -> dict[str, Any]:
            return env.condition("far", "RemoteReachable")

        down = wait_for(lambda: reachable().get("status") == "False" and reachable(),
                        what="RemoteReachable=False")
        assert down["reason"] == "RemoteUnreachable" and f"127.0.0.1:{port}" in down["message"]
        assert env.mirror("faraway", "svc-wfar") is not None
        assert env.slices("faraway", "svc-wfar")
        assert c.logged("reason=RemoteUnreachable") == 1

        far = start_cluster(tmp_path / "far", "--listen", f"127.0.0.1:{port}", name="far")
        wait_for(lambda: reachable().get("status") == "True", timeout=40,
                 what="RemoteReachable=True again")
        fcore = client.CoreV1Api(far.api())
        fcore.patch_namespaced_service("svc", "faraway", {"metadata": {"labels": {"v": "2"}}})
        wait_for(lambda: (env.mirror("faraway", "svc-wfar") or {}).get("metadata", {}).get(
            "labels", {}).get("v") == "2", timeout=15, what="updates to flow again")
    finally:
        far.kill()
