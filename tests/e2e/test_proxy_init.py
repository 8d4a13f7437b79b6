"""`meshgate proxy init` (the injected meshgate-init container) and `meshgate proxy run`
configured by the injector's environment, in a network namespace of their own
(`mgi-<random>`): the service CIDR made local, skipped ports routed past the proxy,
idempotence, the one-line failure without NET_ADMIN, and a proxy that starts from the
environment an injected pod gives it."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from mesh import redirect
from tests.cluster import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@pytest.fixture
def pod_netns() -> Iterator[str]:
    """A namespace like a pod's: lo, and an eth0 (one end of a veth pair whose other end
    stays in it too) with an address and a default route."""
    name = f"mgi-{secrets.token_hex(3)}"
    pyroute2_netns.create(name)
    try:
        with IPRoute(netns=name, flags=0) as ipr:
            ipr.link("add", ifname="eth0", kind="veth", peer="eth0-peer")
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=ipr.link_lookup(ifname="eth0-peer")[0], state="up")
            ipr.addr("add", index=eth0, address="10.244.0.5", prefixlen=24)
            ipr.link("set", index=eth0, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway="10.244.0.1")
        yield name
    finally:
        pyroute2_netns.remove(name)


def in_netns(name: str, *argv: str, env: dict[str, str] | None = None,
             prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    nsenter = shutil.which("nsenter") or "nsenter"
    return subprocess.run([nsenter, f"--net=/var/run/netns/{name}", "--", *prefix, *argv],
                          capture_output=True, text=True, timeout=60,
                          env=env if env is not None else dict(os.environ))


def meshgate_init(name: str, *args: str, prefix: tuple[str, ...] = ()
                  ) -> subprocess.CompletedProcess[str]:
    return in_netns(name, sys.executable, "-m", "mesh.cli", "proxy", "init", *args,
                    prefix=prefix)


def route_type(name: str, dst: str, port: int) -> str:
    """What `ip route get DST ipproto tcp dport PORT` says the kernel does: local or via."""
    out = in_netns(name, "ip", "route", "get", dst, "ipproto", "tcp", "dport", str(port))
    assert out.returncode == 0, out.stderr
    return "local" if out.stdout.startswith("local ") else "via"


def test_init_makes_the_service_cidr_local_and_is_idempotent(pod_netns: str) -> None:
    for _ in range(2):
        proc = meshgate_init(pod_netns, "--service-cidr", "10.96.0.0/16,10.100.0.0/24")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [
            "meshgate-init: 10.96.0.0/16 is local (AnyIP route on lo)",
            "meshgate-init: 10.100.0.0/24 is local (AnyIP route on lo)"]
    assert sorted(map(str, redirect.local_routes(netns=pod_netns))) == [
        "10.100.0.0/24", "10.96.0.0/16"]
    assert route_type(pod_netns, "10.96.3.4", 80) == "local"
    assert route_type(pod_netns, "10.244.0.9", 80) == "via"


def test_skipped_outbound_ports_leave_by_the_main_table(pod_netns: str) -> None:
    for _ in range(2):
        proc = meshgate_init(pod_netns, "--service-cidr", "10.96.0.0/16",
                             "--skip-outbound-ports", "6379,8000-8099")
        assert proc.returncode == 0, proc.stderr
    assert route_type(pod_netns, "10.96.0.10", 6379) == "via"
    assert route_type(pod_netns, "10.96.0.10", 8050) == "via"
    assert route_type(pod_netns, "10.96.0.10", 80) == "local"
    assert route_type(pod_netns, "10.244.0.5", 6379) == "local", "the pod's own address"
    rules = in_netns(pod_netns, "ip", "rule").stdout
    assert [line for line in rules.splitlines() if "lookup local" in line] == [
        "200:\tfrom all lookup local"]
    assert rules.count("dport 6379") == 1, rules


def test_without_net_admin_init_fails_in_one_line(pod_netns: str) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    drop = (setpriv, "--inh-caps=-all", "--bounding-set=-net_admin", "--")
    proc = meshgate_init(pod_netns, "--service-cidr", "10.96.0.0/16", prefix=drop)
    assert proc.returncode == 1
    assert proc.stderr == (
        "meshgate proxy init: cannot make 10.96.0.0/16 local in this network namespace: "
        "Operation not permitted: the meshgate-init container needs the NET_ADMIN "
        "capability (securityContext.capabilities.add: [NET_ADMIN]); a policy may have "
        "removed it\n")
    assert redirect.local_routes(netns=pod_netns) == [], "nothing half done"


def test_a_bad_cidr_or_port_is_named(pod_netns: str) -> None:
    proc = meshgate_init(pod_netns, "--service-cidr", "10.96.0.1/16")
    assert proc.returncode == 1
    assert proc.stderr.startswith("meshgate proxy init: --service-cidr '10.96.0.1/16' is not "
                                  "a CIDR")
    proc = meshgate_init(pod_netns, "--service-cidr", "10.96.0.0/16",
                         "--skip-outbound-ports", "http")
    assert proc.returncode == 1
    assert proc.stderr == ("meshgate proxy init: --skip-outbound-ports: 'http' is not a port "
                           "(1-65535) or a range such as 8000-8099\n")
    assert redirect.local_routes(netns=pod_netns) == []


def test_the_proxy_runs_from_the_injected_environment(pod_netns: str, tmp_path: Path) -> None:
    """A proxy started as the injector starts it, with the identity service away, writes
    the trust bundle where its config reads it and keeps trying; with a variable
    missing it names it and stops."""
    from mesh.identity.ca import IssuerDir

    ids = IssuerDir(tmp_path / "id")
    proc = subprocess.run([sys.executable, "-m", "mesh.cli", "identity", "init",
                           "--trust-domain", "example.org", "--out", str(ids.path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    pem = ids.load_bundle().to_pem().decode()
    (tmp_path / "token").write_text("not-a-real-token")
    env = {**os.environ,
           "MESHGATE_PROXY_IDENTITY_LOCAL_NAME":
               "web.default.serviceaccount.identity.meshgate.example.org",
           "MESHGATE_PROXY_IDENTITY_TRUST_ANCHORS": pem,
           "MESHGATE_PROXY_IDENTITY_DIR": str(tmp_path / "end-entity"),
           "MESHGATE_PROXY_IDENTITY_TOKEN_FILE": str(tmp_path / "token"),
           "MESHGATE_PROXY_IDENTITY_SVC_ADDR": "127.0.0.1:1",
           "MESHGATE_PROXY_DESTINATION_SVC_ADDR": "127.0.0.1:1",
           "MESHGATE_PROXY_POD_NAMESPACE": "default", "MESHGATE_PROXY_POD_NAME": "web-1"}
    run = [sys.executable, "-m", "mesh.cli", "proxy", "run"]
    nsenter = shutil.which("nsenter") or "nsenter"
    proxy = subprocess.Popen([nsenter, f"--net=/var/run/netns/{pod_netns}", "--", *run],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bundle = tmp_path / "end-entity" / "trust-bundle.pem"
    try:
        wait_for(lambda: bundle.exists() and bundle.read_text() == pem, timeout=30,
                 what="the proxy to write its trust bundle")
        assert proxy.poll() is None, "it keeps asking the identity service"
    finally:
        proxy.kill()
        proxy.wait()
    del env["MESHGATE_PROXY_POD_NAME"]
    missing = in_netns(pod_netns, *run, env=env)
    assert missing.returncode == 2
    assert missing.stderr.strip().endswith(
        "the proxy has no --config and its environment lacks MESHGATE_PROXY_POD_NAME; inject "
        "the workload with `meshgate inject` or give --config FILE")
