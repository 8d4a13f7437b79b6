"""Benchmark workload identity.

1. Certificates signed per second by `meshgate identity serve` (a real
   process, checking ServiceAccount tokens with TokenReview against a real
   embedded cluster, and renewing over mTLS).
2. New mTLS handshakes per second accepted through a CertStore's server
   context, against `openssl s_server` serving the same certificate, key and
   trust bundle, both driven by the same `openssl s_time -new` in one run.

    .venv/bin/python bench/identity.py [--requests 300] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes import client, config

from mesh.identity import ca
from mesh.identity.bundle import TrustBundle
from mesh.identity.certstore import CertStore
from mesh.identity.client import HttpRequester
from mesh.identity.names import Identity
from mesh.identity.service import AUDIENCE, service_identity
from mesh.identity.tls import load_identity

DOMAIN = "cluster.local"


async def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing listens on 127.0.0.1:{port}") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: list[str], ready: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "mesh.cli", "--log-level", "warning", *args],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if ready in line:
            return proc, line
    raise SystemExit(f"{args[0]} did not start")


async def sign_rate(url: str, token: str, me: Identity, bundle_pem: bytes, n: int,
                    renew_with: tuple[bytes, bytes] | None) -> float:
    """Certificates per second over ``n`` requests from 8 concurrent clients."""
    ctx = ssl.create_default_context(cadata=bundle_pem.decode())
    if renew_with:
        load_identity(ctx, *renew_with)
    csrs = []
    for _ in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        csrs.append(ca.make_csr(key, me).public_bytes(serialization.Encoding.PEM).decode())
    queue: asyncio.Queue[str] = asyncio.Queue()
    for c in csrs:
        queue.put_nowait(c)
    name = service_identity(DOMAIN, "meshgate").dns_name

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            body = {"csr": queue.get_nowait()}
            if not renew_with:
                body["token"] = token
            async with session.post(f"{url}/v1/certify", json=body, ssl=ctx,
                                    server_hostname=name) as resp:
                assert resp.status == 200, await resp.text()

    async with aiohttp.ClientSession() as session:
        t = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(8)))
        return n / (time.perf_counter() - t)


def s_time(port: int, files: dict[str, Path], seconds: int) -> float:
    out = subprocess.run(["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new",
                          "-time", str(seconds), "-cert", str(files["leaf"]), "-key",
                          str(files["key"]), "-CAfile", str(files["bundle"])],
                         capture_output=True, text=True, timeout=seconds + 30)
    m = re.search(r"(\d+) connections in ([\d.]+) real seconds", out.stdout)
    if not m:
        raise SystemExit(f"s_time failed: {out.stdout}\n{out.stderr}")
    return int(m.group(1)) / float(m.group(2))


async def certstore_server(store: CertStore, port: int, stop: asyncio.Event) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=store.server_context())
    async with server:
        await stop.wait()


async def handshake_rates(store: CertStore, files: dict[str, Path], seconds: int
                          ) -> tuple[float, float]:
    port = free_port()
    stop = asyncio.Event()
    task = asyncio.create_task(certstore_server(store, port, stop))
    await wait_port(port)
    ours = await asyncio.to_thread(s_time, port, files, seconds)
    stop.set()
    await task
    port = free_port()
    baseline = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{port}",
                                 "-cert", str(files["leaf"]), "-cert_chain",
                                 str(files["issuer"]), "-key", str(files["key"]), "-CAfile",
                                 str(files["bundle"]), "-Verify", "1", "-tls1_3", "-quiet",
                                 "-www"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_port(port)
        theirs = await asyncio.to_thread(s_time, port, files, seconds)
    finally:
        baseline.send_signal(signal.SIGTERM)
        baseline.wait()
    return ours, theirs


async def run(args: argparse.Namespace, tmp: Path) -> None:
    cluster, _ = start(["cluster", "serve", "--name", "bench", "--state-dir",
                        str(tmp / "cluster")], "kubeconfig:")
    trust = tmp / "trust"
    subprocess.run([sys.executable, "-m", "mesh.cli", "identity", "init", "--trust-domain",
                    DOMAIN, "--out", str(trust)], check=True, capture_output=True)
    port = free_port()
    service, _ = start(["identity", "serve", "--kubeconfig", str(tmp / "cluster/kubeconfig"),
                        "--issuer-dir", str(trust), "--listen", f"127.0.0.1:{port}"],
                       "serving at")
    url = f"https://127.0.0.1:{port}"
    try:
        core = client.CoreV1Api(config.new_client_from_config(str(tmp / "cluster/kubeconfig")))
        core.create_namespaced_service_account("default", {"metadata": {"name": "bench"}})
        token = core.create_namespaced_service_account_token("bench", "default", {"spec": {
            "audiences": [AUDIENCE]}}).status.token
        me = Identity("default", "bench", DOMAIN)
        bundle_pem = (trust / "trust-bundle.pem").read_bytes()
        store = CertStore(me, HttpRequester(url, bundle_pem=bundle_pem, trust_domain=DOMAIN,
                                            token=lambda: token),
                          bundle=TrustBundle.from_pem(bundle_pem))
        await store.start()
        assert store.chain is not None
        by_token = await sign_rate(url, token, me, bundle_pem, args.requests, None)
        by_renewal = await sign_rate(url, token, me, bundle_pem, args.requests,
                                     (store.chain, store.key_pem))
        certs = store.certificates
        files = {"leaf": tmp / "leaf.pem", "issuer": tmp / "issuer.pem",
                 "key": tmp / "key.pem", "bundle": trust / "trust-bundle.pem"}
        files["leaf"].write_bytes(ca.cert_pem(certs[0]))
        files["issuer"].write_bytes(b"".join(ca.cert_pem(c) for c in certs[1:]))
        ca.write_private(files["key"], store.key_pem)
        ours, theirs = await handshake_rates(store, files, args.seconds)
    finally:
        for proc in (service, cluster):
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
    print(f"certificates signed/s (ServiceAccount token + TokenReview)  {by_token:,.0f}")
    print(f"certificates signed/s (renewal over mTLS)                   {by_renewal:,.0f}")
    print(f"new mTLS handshakes/s, CertStore context (asyncio)          {ours:,.0f}")
    print(f"new mTLS handshakes/s, openssl s_server, same certificates  {theirs:,.0f}")
    print(f"ratio (CertStore / openssl s_server)                        {ours / theirs:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with tempfile.TemporaryDirectory(prefix="meshgate-bench-") as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
