"""Trust-anchor rotation with traffic flowing: two workloads renew through the
real identity service while a client opens new mTLS connections to a server
without pause; the operator runs the three `meshgate identity rotate` steps.
Not one handshake may fail, and at the end only the new anchor is trusted."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
import time
import uuid
from pathlib import Path

from aiohttp import web
from kubernetes import client

from mesh.identity.bundle import TrustBundle
from mesh.identity.ca import IssuerDir
from mesh.identity.certstore import CertStore
from mesh.identity.client import HttpRequester
from mesh.identity.names import Identity
from mesh.identity.service import AUDIENCE, IdentityService
from mesh.identity.tls import check_peer
from tests.cluster import Cluster

DOMAIN = "cluster.local"
LEAF = 3.0  # seconds: short leaves make the procedure take seconds, not days


def _rotate(directory: Path, step: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", "identity", "rotate", step,
                           "--dir", str(directory), "--leaf-lifetime", f"{LEAF}s", "--wait"],
                          capture_output=True, text=True, timeout=120)


async def test_rotation_under_traffic_has_no_failed_handshake(cluster: Cluster,
                                                              tmp_path: Path) -> None:
    issuers = IssuerDir(tmp_path / "trust")
    issuers.init(DOMAIN, anchor_lifetime=dt.timedelta(days=30),
                 issuer_lifetime=dt.timedelta(days=7), now=dt.datetime.now(dt.UTC))
    old_anchor = issuers.load_bundle().anchors[0]
    service = IdentityService(issuers.path, cluster.api(), trust_domain=DOMAIN,
                              leaf_lifetime=dt.timedelta(seconds=LEAF))
    runner = web.AppRunner(service.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=service.server_context())
    await site.start()
    url = f"https://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    maintain = asyncio.create_task(service.maintain(interval=0.1))

    ns = f"r-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(cluster.api())
    core.create_namespace({"metadata": {"name": ns}})
    stores = {}
    for sa in ("server", "client"):
        core.create_namespaced_service_account(ns, {"metadata": {"name": sa}})
        token = core.create_namespaced_service_account_token(sa, ns, {"spec": {
            "audiences": [AUDIENCE], "expirationSeconds": 3600}}).status.token
        bundle_pem = issuers.load_bundle().to_pem()
        stores[sa] = CertStore(
            Identity(ns, sa, DOMAIN),
            HttpRequester(url, bundle_pem=bundle_pem, trust_domain=DOMAIN,
                          token=lambda t=token: t),
            bundle=TrustBundle.from_pem(bundle_pem))
        await stores[sa].start()
    renewers = [asyncio.create_task(s.run()) for s in stores.values()]

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.start_tls(stores["server"].server_context())
            writer.write(await reader.readexactly(4))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    counts = {"ok": 0, "failed": 0}
    failures: list[str] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        deadline = time.monotonic() + 90
        while not stop.is_set() and time.monotonic() < deadline and counts["ok"] < 100_000:
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=stores["client"].client_context(),
                    server_hostname="server")
                check_peer(writer.get_extra_info("ssl_object"), expected=stores["server"].identity,
                           side="server", peer=f"127.0.0.1:{port}")
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                writer.close()
                counts["ok"] += 1
            except Exception as e:  # every failure is counted and reported below
                counts["failed"] += 1
                failures.append(f"{type(e).__name__}: {e}")
            await asyncio.sleep(0.01)

    load = asyncio.create_task(traffic())
    try:
        for step in ("add-anchor", "reissue-issuer", "remove-anchor"):
            out = await asyncio.to_thread(_rotate, issuers.path, step)
            assert out.returncode == 0, out.stderr
        await asyncio.sleep(LEAF)  # let both workloads renew under the final bundle
        stop.set()
        await load
    finally:
        stop.set()
        for s in stores.values():
            s.stop()
        await asyncio.gather(*renewers, return_exceptions=True)
        maintain.cancel()
        server.close()
        await runner.cleanup()

    assert counts["failed"] == 0, failures[:5]
    assert counts["ok"] > 200
    final = issuers.load_bundle()
    assert len(final.anchors) == 1 and not final.contains(old_anchor)
    for store in stores.values():
        final.verify(list(store.certificates), now=dt.datetime.now(dt.UTC))
        assert not store.bundle.contains(old_anchor)
