"""The VM's mesh DNS on loopback: the real `dig` asks a MeshDnsServer that answers
the cluster's names and forwards the rest to an upstream stub (another loopback
address); glibc (`getent hosts`) resolves through a resolv.conf taken over by
vm_agent.resolver, bind-mounted over /etc/resolv.conf in a private mount
namespace (the host's file is never touched)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import dns.message
import dns.name
import dns.rcode
import pytest
from prometheus_client import CollectorRegistry

from mesh.dns import Address, Forward, Reply, Zone, address_rdatas, respond
from mesh.dnsserver import DNSServer, bind_sockets
from mesh.errors import ConfigError
from vm_agent import resolver
from vm_agent.dns import MeshDnsServer, MeshNames

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed "
                                "(make tools installs dnsutils)")

WEB = "web.default.svc.cluster.local"
MANY = [f"198.51.100.{i}" for i in range(1, 201)]  # 3 KB: too big for one datagram


def upstream_zone() -> Zone:
    zone = Zone("example.test")
    zone.add(dns.name.from_text("www.example.test"), address_rdatas(["192.0.2.10"]))
    zone.add(dns.name.from_text("big.example.test"), address_rdatas(MANY))
    return zone


def stub(zone: Zone) -> DNSServer:
    def answer(request: dns.message.Message) -> Reply | Forward:
        return respond(zone, request, synced=True, forwarding=False)
    return DNSServer(answer)


def loopback_host() -> str:
    """A loopback address of this test's own, so that parallel runs do not meet."""
    return f"127.{random.randint(64, 250)}.{random.randint(0, 255)}.{random.randint(2, 250)}"


async def dig(address: Address, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "dig", f"@{address[0]}", "-p", str(address[1]), "+time=3", "+tries=1", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await process.communicate()
    return out.decode()


async def dig_short(address: Address, *args: str) -> list[str]:
    return (await dig(address, "+short", *args)).split()


async def dig_status(address: Address, *args: str) -> str:
    out = await dig(address, *args)
    return out.split("status: ", 1)[1].split(",", 1)[0]


@pytest.fixture
async def upstream() -> AsyncIterator[DNSServer]:
    server = stub(upstream_zone())
    await server.listen(*bind_sockets(loopback_host(), 0))
    yield server
    await server.close()


@pytest.fixture
async def mesh(upstream: DNSServer) -> AsyncIterator[tuple[MeshDnsServer, CollectorRegistry]]:
    names = MeshNames()
    names.set(WEB, ["10.96.0.12"])
    registry = CollectorRegistry()
    server = MeshDnsServer(names, (loopback_host(), 0), upstreams=[upstream.address],
                           registry=registry)
    await server.start()
    yield server, registry
    await server.stop()


def answers(registry: CollectorRegistry, source: str) -> float:
    return registry.get_sample_value("dns_answers_total", {"source": source}) or 0.0


async def test_dig_gets_mesh_names_locally_and_the_rest_from_upstream(
        mesh: tuple[MeshDnsServer, CollectorRegistry]) -> None:
    server, registry = mesh
    assert await dig_short(server.address, WEB) == ["10.96.0.12"]
    assert await dig_short(server.address, "+tcp", WEB) == ["10.96.0.12"]
    assert await dig_short(server.address, "www.example.test") == ["192.0.2.10"]
    assert await dig_status(server.address, "nope.default.svc.cluster.local") == "NXDOMAIN"
    assert await dig_status(server.address, WEB, "AAAA") == "NOERROR"
    # Truncated from the upstream over UDP, so asked again over TCP; dig does the same.
    assert sorted(await dig_short(server.address, "big.example.test")) == sorted(MANY)
    assert sorted(await dig_short(server.address, "+tcp", "big.example.test")) == sorted(MANY)
    server.names.set("db.default.svc.cluster.local", ["10.96.0.99"])
    assert await dig_short(server.address, "db.default.svc.cluster.local") == ["10.96.0.99"]
    server.names.remove(WEB)
    assert await dig_status(server.address, WEB) == "NXDOMAIN"
    assert answers(registry, "local") == 6
    assert answers(registry, "forwarded") == 4  # dig asked for big.example.test 3 times


async def test_names_in_the_cluster_domain_never_reach_the_upstream(
        upstream: DNSServer) -> None:
    seen: list[str] = []

    def record(request: dns.message.Message) -> Reply:
        seen.append(str(request.question[0].name))
        return Reply(dns.message.make_response(request))

    recorder = DNSServer(record)
    await recorder.listen(*bind_sockets(loopback_host(), 0))
    server = MeshDnsServer(MeshNames(), (loopback_host(), 0), upstreams=[recorder.address])
    await server.start()
    try:
        for name in (WEB, "x.pod.cluster.local", "cluster.local", "example.com"):
            await dig(server.address, name)
        assert seen == ["example.com."]
    finally:
        await server.stop()
        await recorder.close()


async def test_a_down_upstream_is_skipped_and_all_down_is_servfail(
        upstream: DNSServer, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((loopback_host(), 0))
        down: Address = silent.getsockname()
        registry = CollectorRegistry()
        names = MeshNames()
        names.set(WEB, ["10.96.0.12"])
        fallback = MeshDnsServer(names, (loopback_host(), 0), registry=registry,
                                 upstreams=[down, upstream.address], upstream_timeout=0.3)
        stranded = MeshDnsServer(names, (loopback_host(), 0), upstreams=[down],
                                 upstream_timeout=0.3)
        await fallback.start()
        await stranded.start()
        try:
            assert await dig_short(fallback.address, "www.example.test") == ["192.0.2.10"]
            with caplog.at_level(logging.WARNING, logger="mesh.dnsserver"):
                assert await dig_status(stranded.address, "www.example.test") == "SERVFAIL"
            (line,) = [r.getMessage() for r in caplog.records if "no upstream" in r.message]
            assert f"tried={down[0]}:{down[1]}:" in line and "name=www.example.test." in line
            # It keeps serving: mesh names, and other queries while one is stuck.
            stuck = asyncio.ensure_future(dig_status(stranded.address, "+tcp", "a.example.test"))
            assert await dig_short(stranded.address, WEB) == ["10.96.0.12"]
            assert await stuck == "SERVFAIL"
            assert answers(registry, "forwarded") == 1 and answers(registry, "failed") == 0
        finally:
            await fallback.stop()
            await stranded.stop()


async def test_an_address_in_use_is_a_config_error(
        mesh: tuple[MeshDnsServer, CollectorRegistry]) -> None:
    taken = mesh[0].address
    with pytest.raises(ConfigError, match=f"cannot listen for DNS on {taken[0]}:{taken[1]}"):
        await MeshDnsServer(MeshNames(), taken, upstreams=[]).start()


def can_bind_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False)
    return done.returncode == 0


async def listen_on_port_53() -> str:
    """A loopback host whose port 53 is free (glibc asks port 53 only)."""
    for _ in range(20):
        host = loopback_host()
        try:
            for sock in bind_sockets(host, 53):
                sock.close()
        except ConfigError:
            continue
        return host
    raise AssertionError("no loopback address with port 53 free")


@pytest.mark.skipif(not can_bind_mount(), reason="needs root and unshare --mount")
async def test_glibc_resolves_through_a_taken_over_resolv_conf(tmp_path: Path) -> None:
    upstream_host, mesh_host = await listen_on_port_53(), await listen_on_port_53()
    upstream = stub(upstream_zone())
    await upstream.listen(*bind_sockets(upstream_host, 53))
    conf = tmp_path / "resolv.conf"
    original = f"nameserver {upstream_host}\nsearch example.test\noptions timeout:2\n".encode()
    conf.write_bytes(original)
    chosen = resolver.take_over(conf, tmp_path / "state", dns_address=mesh_host,
                                search=resolver.mesh_search("default"))
    names = MeshNames()
    names.set(WEB, ["10.96.0.12"])
    server = MeshDnsServer(names, (mesh_host, 53), upstreams=chosen.upstreams)
    await server.start()
    try:
        script = (f'mount --bind "{conf}" /etc/resolv.conf && '
                  "for n in web web.default web.default.svc.cluster.local www; do "
                  'getent ahostsv4 "$n" | head -n 1 || echo "$n missing"; done')
        process = await asyncio.create_subprocess_exec(
            "unshare", "--mount", "sh", "-c", script,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out = (await asyncio.wait_for(process.communicate(), 30))[0].decode().splitlines()
        assert [line.split()[0] for line in out] == ["10.96.0.12"] * 3 + ["192.0.2.10"], out
    finally:
        await server.stop()
        await upstream.close()
    assert resolver.restore(conf, tmp_path / "state")
    assert conf.read_bytes() == original
