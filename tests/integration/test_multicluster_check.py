"""`meshgate multicluster gateways` and `check` between two embedded clusters on
loopback: east imports, west exports, each runs a real control plane (which
publishes its trust bundle) under one shared anchor.

Each test links west into east with `meshgate multicluster link`, in a Link
namespace of its own and with its own cluster name and selector label, so the
tests share the clusters without seeing each other's Links; then it breaks one
thing and asserts on the line `check` prints and its exit status.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from mesh.control.crds import is_established
from mesh.identity.bundle import TrustBundle
from mesh.identity.ca import IssuerDir
from mesh.identity.trustroots import TRUST_ROOTS_CONFIGMAP, TRUST_ROOTS_KEY, keep_published
from mirror.crds import crd_documents, install_crds
from mirror.link import GROUP, PLURAL, VERSION
from mirror.mirrors import CLUSTER_LABEL, MIRRORED_LABEL, REMOTE_FQ_NAME_ANNOTATION
from tests.cluster import Cluster, spawn, start_cluster, stop_process, wait_for
from tests.integration.test_mirror import ProbeTarget
from tests.meshproxy import DOMAIN, Trust, free_port

EXPORTED = "mirror.meshgate.io/exported"
CRD = "links.multicluster.meshgate.io"


def meshgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True,
                          text=True, timeout=120)


def control_plane(c: Cluster, trust: Trust) -> subprocess.Popen[str]:
    proc, _, _, _ = spawn([sys.executable, "-m", "mesh.cli", "control", "run", "--kubeconfig",
                           str(c.kubeconfig), "--identity-dir", str(trust.issuers.path),
                           "--trust-domain", DOMAIN, "--listen", "127.0.0.1:0"],
                          lambda line: "serving at" in line, what="control plane")
    return proc


@dataclass
class Env:
    east: Cluster
    west: Cluster
    gateway: ProbeTarget
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ecore = client.CoreV1Api(self.east.api())
        self.wcore = client.CoreV1Api(self.west.api())
        self.custom = client.CustomObjectsApi(self.east.api())
        self.eslices = client.DiscoveryV1Api(self.east.api())

    @staticmethod
    def namespace(core: client.CoreV1Api, name: str) -> None:
        try:
            core.create_namespace({"metadata": {"name": name}})
        except ApiException as e:
            if e.status != 409:
                raise

    def export(self, ns: str, name: str, test: str) -> None:
        self.namespace(self.wcore, ns)
        self.wcore.create_namespaced_service(ns, {
            "metadata": {"name": name, "labels": {EXPORTED: "true", "check-test": test}},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80}]}})

    def link(self, ns: str, cluster: str, **spec: Any) -> dict[str, Any]:
        """`multicluster link` for west, applied in east's namespace `ns`, with a fast
        probe of the test gateway and a selector on the test's own label."""
        self.namespace(self.ecore, ns)
        out = meshgate("multicluster", "link", "--kubeconfig", str(self.west.kubeconfig),
                       "--cluster-name", cluster, "--gateway-address", "127.0.0.1",
                       "--probe-port", str(self.gateway.port), "--namespace", ns)
        assert out.returncode == 0, out.stderr
        secret, link = yaml.safe_load_all(out.stdout)
        link["spec"].update({"probeSpec": {"port": self.gateway.port, "period": "300ms",
                                           "timeout": "250ms"},
                             "selector": {"matchLabels": {EXPORTED: "true",
                                                          "check-test": ns}}, **spec})
        self.east.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([secret, link]))
        return dict(secret)

    def controller(self, ns: str, link: str) -> subprocess.Popen[str]:
        proc, _, _, _ = spawn([sys.executable, "-m", "mesh.cli", "mirror", "run",
                               "--kubeconfig", str(self.east.kubeconfig), "--link", link,
                               "--namespace", ns, "--metrics-listen",
                               "127.0.0.1:0", "--resync", "1", "--lease-duration", "2",
                               "--lease-renew", "0.5"],
                              lambda line: "metrics at http://" in line,
                              what=f"mirror controller in {ns}")
        self.processes.append(proc)
        return proc

    def read_link(self, ns: str, name: str) -> dict[str, Any]:
        resp = self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name,
                                                        _preload_content=False)
        body: dict[str, Any] = json.loads(resp.data)
        return body

    def condition(self, ns: str, name: str, kind: str) -> dict[str, Any]:
        for c in (self.read_link(ns, name).get("status") or {}).get("conditions") or []:
            if c["type"] == kind:
                return dict(c)
        return {}

    def mirror_exists(self, ns: str, name: str) -> bool:
        try:
            self.ecore.read_namespaced_service(name, ns)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return True

    def check(self, ns: str) -> tuple[int, list[str]]:
        out = meshgate("multicluster", "check", "--kubeconfig", str(self.east.kubeconfig),
                       "--namespace", ns)
        # Shown with a failing test's captured output.
        print(f"$ check --namespace {ns}  (exit {out.returncode})\n{out.stdout}{out.stderr}")
        return out.returncode, out.stdout.splitlines()


def failure(lines: list[str], title: str) -> str:
    """The FAIL line of the check whose title starts with `title`."""
    found = [line for line in lines if line.startswith(f"FAIL  {title}")]
    assert len(found) == 1, "\n".join(lines)
    assert "; fix: " in found[0], found[0]
    return found[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = Path(tmp_path_factory.mktemp("mc-check"))
    west = start_cluster(root / "west", "--service-cidr", "10.97.0.0/16", name="west")
    east = start_cluster(root / "east", "--service-cidr", "10.96.0.0/16", name="east")
    gateway = ProbeTarget()
    gateway.start()
    e = Env(east, west, gateway)
    try:
        install_crds(east.api())
        trust = Trust.create(root)
        for c, core in ((east, e.ecore), (west, e.wcore)):
            e.namespace(core, "meshgate")
            e.processes.append(control_plane(c, trust))
        for core in (e.ecore, e.wcore):
            wait_for(lambda core=core: core.read_namespaced_config_map(  # type: ignore[misc]
                TRUST_ROOTS_CONFIGMAP, "meshgate"), what="the published trust bundle")
        yield e
    finally:
        for proc in e.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in e.processes:
            stop_process(proc)
        gateway.stop()
        east.stop()
        west.stop()


# -- a healthy link ---------------------------------------------------------------------------

def test_gateways_and_check_on_a_healthy_link(env: Env) -> None:
    env.export("shop", "web", "mc-ok")
    env.export("shop", "cart", "mc-ok")
    env.link("mc-ok", "wok")
    env.controller("mc-ok", "wok")
    wait_for(lambda: env.mirror_exists("shop", "web-wok") and env.mirror_exists(
        "shop", "cart-wok"), what="the mirrors")
    wait_for(lambda: (env.read_link("mc-ok", "wok").get("status") or {}).get(
        "gatewayLatency"), what="probe latency in the Link's status")
    wait_for(lambda: (env.read_link("mc-ok", "wok").get("status") or {}).get(
        "mirroredServiceCount") == 2, what="the status to count both mirrors")

    out = meshgate("multicluster", "gateways", "--kubeconfig", str(env.east.kubeconfig),
                   "--namespace", "mc-ok")
    print(out.stdout)
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    assert header.split() == ["CLUSTER", "ALIVE", "P50", "P95", "P99", "MIRRORED"]
    assert re.fullmatch(r"wok\s+True(\s+\d+\.\dms){3}\s+2", row), row

    code, lines = env.check("mc-ok")
    assert code == 0, "\n".join(lines)
    assert all(line.startswith("ok    ") for line in lines[:-1]), "\n".join(lines)
    assert lines[-1] == "every check passed"
    for title in (f"the CustomResourceDefinition {CRD} is installed",
                  "Link wok: credentials Secret mc-ok/cluster-credentials-wok exists",
                  "Link wok: the API of cluster wok at https://127.0.0.1:",
                  "Link wok: the credential is accepted and may read Services",
                  "Link wok: the credential is read-only",
                  "Link wok: a mirror controller is serving it",
                  "Link wok: the gateway of cluster wok is alive",
                  "Link wok: every mirror has endpoints (2 mirrors)",
                  "Link wok: this cluster and wok share a trust anchor",
                  "Link wok: no orphaned mirrors",
                  "Link wok: no mirror name collisions",
                  "every mirror Service belongs to a Link"):
        assert any(line.startswith(f"ok    {title}") for line in lines), (title, lines)

    empty = meshgate("multicluster", "gateways", "--kubeconfig", str(env.east.kubeconfig),
                     "--namespace", "nothing-here")
    assert empty.returncode == 0 and empty.stdout == "no Links in namespace nothing-here\n"


# -- five broken setups ---------------------------------------------------------------------

def test_check_names_a_missing_or_outdated_crd(tmp_path: Path) -> None:
    bare = start_cluster(tmp_path / "bare", name="bare")
    try:
        out = meshgate("multicluster", "check", "--kubeconfig", str(bare.kubeconfig))
        assert out.returncode == 1, out.stdout + out.stderr
        line = failure(out.stdout.splitlines(),
                       f"the CustomResourceDefinition {CRD} is installed")
        assert "deploy/crds/multicluster.yaml" in line
        assert out.stdout.splitlines()[-1] == "1 check failed"

        # An older CRD: its status does not declare the probe latency yet.
        (older,) = crd_documents()
        del older["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"][
            "properties"]["gatewayLatency"]
        extensions = client.ApiextensionsV1Api(bare.api())
        extensions.create_custom_resource_definition(older)
        wait_for(lambda: is_established(json.loads(extensions.read_custom_resource_definition(
            CRD, _preload_content=False).data)), what="the older CRD established")
        out = meshgate("multicluster", "check", "--kubeconfig", str(bare.kubeconfig))
    finally:
        bare.stop()
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert f"ok    the CustomResourceDefinition {CRD} is installed" in lines
    line = failure(lines, f"the CustomResourceDefinition {CRD} is established and current")
    assert "differs from the one this meshgate ships" in line


def test_check_names_a_missing_or_malformed_secret(env: Env) -> None:
    secret = env.link("mc-secret", "wsecret")
    env.ecore.delete_namespaced_secret("cluster-credentials-wsecret", "mc-secret")
    code, lines = env.check("mc-secret")
    assert code == 1
    line = failure(lines, "Link wsecret: credentials Secret mc-secret/cluster-credentials-wsecret")
    assert "does not exist" in line and "meshgate multicluster link" in line
    assert not any("credential is accepted" in line for line in lines), "checks that need " \
        "the credential are left out"

    secret["data"]["kubeconfig"] = base64.b64encode(b"clusters: [not: a kubeconfig").decode()
    env.east.kubectl("apply", "-f", "-", input=yaml.safe_dump(secret))
    code, lines = env.check("mc-secret")
    assert code == 1
    assert "is not a kubeconfig" in failure(lines, "Link wsecret: credentials Secret")


def _kubeconfig_with(env: Env, token: str) -> str:
    doc = yaml.safe_load(env.west.kubeconfig.read_text())
    doc["users"][0]["user"] = {"token": token}
    return base64.b64encode(yaml.safe_dump(doc).encode()).decode()


def test_check_names_a_credential_that_is_refused_forbidden_or_too_strong(env: Env) -> None:
    secret = env.link("mc-cred", "wcred")
    name = "cluster-credentials-wcred"

    def use(kubeconfig_b64: str) -> list[str]:
        env.ecore.patch_namespaced_secret(name, "mc-cred", {"data": {
            "kubeconfig": kubeconfig_b64}})
        code, lines = env.check("mc-cred")
        assert code == 1
        return lines

    lines = use(_kubeconfig_with(env, "a-token-that-expired-long-ago"))
    line = failure(lines, "Link wcred: the credential is accepted")
    assert "401 Unauthorized" in line and "expired or been revoked" in line
    assert any(x.startswith("ok    Link wcred: the API of cluster wcred") for x in lines)

    env.namespace(env.wcore, "nobody")
    try:
        env.wcore.create_namespaced_service_account("nobody", {"metadata": {"name": "nobody"}})
    except ApiException as e:
        assert e.status == 409
    token = env.wcore.create_namespaced_service_account_token(
        "nobody", "nobody", {"spec": {"expirationSeconds": 3600}}).status.token
    line = failure(use(_kubeconfig_with(env, token)), "Link wcred: the credential is accepted")
    assert "403 Forbidden" in line and "get, list and watch" in line

    admin = base64.b64encode(env.west.kubeconfig.read_bytes()).decode()
    line = failure(use(admin), "Link wcred: the credential is read-only")
    assert "may also create services" in line and "list secrets" in line

    use(secret["data"]["kubeconfig"])  # the link's own credential again
    _, lines = env.check("mc-cred")
    assert not any("Link wcred: the credential" in x and x.startswith("FAIL") for x in lines)


def test_check_names_a_gateway_that_is_not_alive(env: Env) -> None:
    target = ProbeTarget()  # this Link's own gateway, which goes away
    env.export("gw", "web", "mc-gw")
    env.link("mc-gw", "wgw", probeSpec={"port": target.port, "period": "300ms",
                                        "timeout": "250ms", "failureThreshold": 2})
    env.controller("mc-gw", "wgw")
    wait_for(lambda: env.condition("mc-gw", "wgw", "GatewayAlive").get("status") == "False",
             what="GatewayAlive=False")
    code, lines = env.check("mc-gw")
    assert code == 1
    line = failure(lines, "Link wgw: the gateway of cluster wgw is alive")
    assert "no gateway address answers its probe" in line and f"port {target.port}" in line
    assert any(x.startswith("ok    Link wgw: a mirror controller is serving it") for x in lines)

    target.start()
    try:
        wait_for(lambda: env.condition("mc-gw", "wgw", "GatewayAlive").get("status") == "True",
                 what="GatewayAlive=True")
        _, lines = env.check("mc-gw")
        assert any(x.startswith("ok    Link wgw: the gateway of cluster wgw is alive")
                   for x in lines), lines
    finally:
        target.stop()


def test_check_finds_orphans_collisions_and_mirrors_without_endpoints(env: Env) -> None:
    for name in ("web", "gone", "quiet"):
        env.export("orph", name, "mc-orph")
    env.export("orph", "api", "mc-orph")
    env.link("mc-orph", "worph")
    controller = env.controller("mc-orph", "worph")
    wait_for(lambda: all(env.mirror_exists("orph", f"{n}-worph")
                         for n in ("web", "gone", "quiet", "api")), what="the mirrors")
    stop_process(controller)  # nothing repairs what follows
    out = meshgate("multicluster", "gateways", "--kubeconfig", str(env.east.kubeconfig),
                   "--namespace", "mc-orph")
    assert out.stdout.splitlines()[1].split()[:2] == ["worph", "Unknown"], \
        "without a controller, what the status says of the gateway is stale"

    env.wcore.delete_namespaced_service("gone", "orph")
    env.wcore.patch_namespaced_service("quiet", "orph", {"metadata": {"labels": {
        EXPORTED: None}}})
    env.eslices.delete_collection_namespaced_endpoint_slice(
        "orph", label_selector="kubernetes.io/service-name=web-worph")
    env.ecore.delete_namespaced_service("api-worph", "orph")
    env.ecore.create_namespaced_service("orph", {"metadata": {"name": "api-worph"},
                                                 "spec": {"ports": [{"port": 80}]}})
    code, lines = env.check("mc-orph")
    assert code == 1
    line = failure(lines, "Link worph: no orphaned mirrors")
    assert "orph/gone-worph: remote Service orph/gone no longer exists in worph" in line
    assert "orph/quiet-worph: remote Service orph/quiet is no longer exported" in line
    line = failure(lines, "Link worph: every mirror has endpoints")
    assert "orph/web-worph: it has no EndpointSlice" in line
    line = failure(lines, "Link worph: no mirror name collisions")
    assert ("Service orph/api-worph is a Service that is not a mirror, so remote Service "
            "orph/api of worph is not mirrored") in line
    assert "nothing holds its Lease" in failure(lines, "Link worph: a mirror controller")
    assert not any("gateway of cluster worph" in x for x in lines), "without a controller " \
        "the GatewayAlive condition is stale and not reported"

    # A mirror whose Link is gone, in any namespace, is an orphan too.
    env.ecore.create_namespaced_service("orph", {"metadata": {
        "name": "old-ghost", "labels": {MIRRORED_LABEL: "true", CLUSTER_LABEL: "ghost"},
        "annotations": {REMOTE_FQ_NAME_ANNOTATION: "old.orph.svc.cluster.local"}},
        "spec": {"ports": [{"port": 80}]}})
    try:
        _, lines = env.check("mc-orph")
        line = failure(lines, "every mirror Service belongs to a Link")
        assert "orph/old-ghost (cluster ghost)" in line
        assert "meshgate multicluster unlink --kubeconfig IMPORTING --cluster-name ghost" in line
    finally:
        env.ecore.delete_namespaced_service("old-ghost", "orph")


def test_check_names_trust_anchors_that_are_not_shared(env: Env, tmp_path: Path) -> None:
    env.link("mc-trust", "wtrust")
    other = IssuerDir(tmp_path / "other")
    other.init(DOMAIN, anchor_lifetime=dt.timedelta(days=1), issuer_lifetime=dt.timedelta(
        hours=1), now=dt.datetime.now(dt.UTC))
    published = env.wcore.read_namespaced_config_map(TRUST_ROOTS_CONFIGMAP, "meshgate")
    env.wcore.patch_namespaced_config_map(TRUST_ROOTS_CONFIGMAP, "meshgate", {"data": {
        TRUST_ROOTS_KEY: (other.path / "trust-bundle.pem").read_text()}})
    try:
        code, lines = env.check("mc-trust")
    finally:
        env.wcore.patch_namespaced_config_map(TRUST_ROOTS_CONFIGMAP, "meshgate", {
            "data": published.data})
    assert code == 1
    line = failure(lines, "Link wtrust: this cluster and wtrust share a trust anchor")
    assert "no anchor in common" in line and "sha256" in line


# -- the importing cluster itself ---------------------------------------------------------------

def test_check_without_a_usable_importing_cluster(env: Env, tmp_path: Path) -> None:
    out = meshgate("multicluster", "check", "--kubeconfig", str(tmp_path / "missing"))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "kubeconfig" in out.stderr

    doc = yaml.safe_load(env.east.kubeconfig.read_text())
    doc["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{free_port()}"
    away = tmp_path / "away"
    away.write_text(yaml.safe_dump(doc))
    for command in ("check", "gateways"):
        out = meshgate("multicluster", command, "--kubeconfig", str(away))
        assert out.returncode == 2, out.stdout
        assert out.stderr.count("\n") == 1, out.stderr
        assert "cannot be reached" in out.stderr and "Connection refused" in out.stderr


# -- the published trust bundle --------------------------------------------------------------

async def test_the_published_bundle_follows_rotations(env: Env, tmp_path: Path) -> None:
    """What the control plane runs: the ConfigMap is created, then replaced when the
    bundle gains an anchor, as `identity rotate` makes it do."""
    first, second = IssuerDir(tmp_path / "a"), IssuerDir(tmp_path / "b")
    for d in (first, second):
        d.init(DOMAIN, anchor_lifetime=dt.timedelta(days=1), issuer_lifetime=dt.timedelta(
            hours=1), now=dt.datetime.now(dt.UTC))
    old = TrustBundle.from_pem((first.path / "trust-bundle.pem").read_bytes())
    both = old.with_anchor(second.load_anchor().cert)
    current = [old]
    env.namespace(env.ecore, "publish-test")
    task = asyncio.create_task(keep_published(env.east.api(), "publish-test",
                                              lambda: current[0], interval=0.05))

    async def published() -> str:
        def read() -> str:
            try:
                cm = env.ecore.read_namespaced_config_map(TRUST_ROOTS_CONFIGMAP, "publish-test")
            except ApiException:
                return ""
            return str((cm.data or {}).get(TRUST_ROOTS_KEY))
        return await asyncio.to_thread(read)

    try:
        deadline = asyncio.get_running_loop().time() + 10
        while await published() != old.to_pem().decode():
            assert asyncio.get_running_loop().time() < deadline, "the bundle was not published"
            await asyncio.sleep(0.02)
        current[0] = both
        while await published() != both.to_pem().decode():
            assert asyncio.get_running_loop().time() < deadline, "the rotation was not published"
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
