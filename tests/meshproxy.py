"""Test helpers: a trust domain with workload certificates on disk, proxies run
as real `meshgate proxy run` processes, and their metrics scraped over HTTP."""

from __future__ import annotations

import datetime as dt
import socket
import socketserver
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.parser import text_string_to_metric_families

from mesh.identity import ca
from mesh.identity.ca import IssuerDir
from mesh.identity.names import Identity
from tests.cluster import spawn, stop_process

DOMAIN = "cluster.local"


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


def echo_app() -> socketserver.ThreadingTCPServer:
    """A TCP echo server on 127.0.0.1, serving from a daemon thread; shut it down after."""
    app = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    app.daemon_threads = True
    threading.Thread(target=app.serve_forever, daemon=True).start()
    return app


def call(address: tuple[str, int], payload: bytes, timeout: float = 5) -> bytes:
    """Send ``payload`` and read until as many bytes came back (or the connection ended)."""
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def endpoint(proxy_port: int, target_port: int, service_account: str, *,
             priority: int = 0) -> dict[str, Any]:
    """A discovery endpoint: a proxy's inbound port on 127.0.0.1 serving default/SA."""
    return {"address": f"127.0.0.1:{proxy_port}", "targetPort": target_port,
            "identity": Identity("default", service_account, DOMAIN).dns_name,
            "priority": priority}


def service(name: str, address: str, *endpoints: dict[str, Any],
            opaque: bool = False) -> dict[str, Any]:
    """A discovery service ``<name>.default.svc`` at ``address`` (VIP:port)."""
    return {"name": f"{name}.default.svc.{DOMAIN}", "address": address, "opaque": opaque,
            "endpoints": list(endpoints)}


def services_file(path: Path, *services: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"services": list(services)}))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Trust:
    root: Path
    issuers: IssuerDir

    @classmethod
    def create(cls, root: Path) -> Trust:
        issuers = IssuerDir(root / "trust")
        issuers.init(DOMAIN, anchor_lifetime=dt.timedelta(days=30),
                     issuer_lifetime=dt.timedelta(days=7), now=dt.datetime.now(dt.UTC))
        return cls(root, issuers)

    @property
    def bundle(self) -> Path:
        return self.issuers.path / "trust-bundle.pem"

    def workload(self, ns: str, sa: str, *, issuer: ca.CertKey | None = None,
                 lifetime: dt.timedelta = dt.timedelta(hours=1),
                 now: dt.datetime | None = None) -> dict[str, Any]:
        """Certificate files for ns/sa; returns the proxy config's identity section."""
        identity = Identity(ns, sa, DOMAIN)
        issuer = issuer or self.issuers.load_issuer()
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = ca.sign_leaf(issuer, key.public_key(), identity,
                            now=now or dt.datetime.now(dt.UTC), lifetime=lifetime)
        d = self.root / f"{ns}-{sa}"
        d.mkdir(exist_ok=True)
        (d / "tls.crt").write_bytes(ca.cert_pem(leaf) + ca.cert_pem(issuer.cert))
        ca.write_private(d / "tls.key", ca.key_pem(key))
        return {"name": identity.dns_name, "trustBundle": str(self.bundle),
                "certFile": str(d / "tls.crt"), "keyFile": str(d / "tls.key")}


@dataclass
class ProxyProcess:
    name: str
    config: dict[str, Any]
    proc: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)

    @property
    def admin(self) -> str:
        return f"http://{self.config['admin']['listen']}"

    @property
    def inbound(self) -> tuple[str, int]:
        host, _, port = self.config["inbound"]["listen"].rpartition(":")
        return host, int(port)

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        with urllib.request.urlopen(f"{self.admin}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
        return out

    def metric(self, name: str, **labels: str) -> float:
        return sum(v for lbls, v in self.metrics().get(name, [])
                   if all(lbls.get(k) == want for k, want in labels.items()))

    def stop(self) -> None:
        stop_process(self.proc)


def start_proxy(root: Path, name: str, config: dict[str, Any], *,
                timeout: float = 30.0, extra: tuple[str, ...] = ()) -> ProxyProcess:
    config.setdefault("admin", {"listen": f"127.0.0.1:{free_port()}"})
    config.setdefault("inbound", {}).setdefault("listen", f"127.0.0.1:{free_port()}")
    config.setdefault("outbound", {}).setdefault("listen", f"127.0.0.1:{free_port()}")
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc, output, _, _ = spawn([sys.executable, "-m", "mesh.cli", "proxy", "run", "--config",
                                str(path), *extra], lambda line: " ready (pid" in line,
                               what=f"proxy {name}", timeout=timeout)
    return ProxyProcess(name, config, proc, output)
