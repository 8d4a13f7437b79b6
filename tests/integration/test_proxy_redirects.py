"""Redirected listeners on 127.0.0.1: one whose address another process holds is
reported with that process (on /redirects and in the log) and binds once it lets
go, while the proxy serves the other services; one whose address is not local
yet binds anyway (IP_FREEBIND)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.errors import ConfigError
from mesh.proxy.listeners import listen
from tests.cluster import spawn, stop_process, wait_for
from tests.meshproxy import (
    ProxyProcess,
    Trust,
    call,
    echo_app,
    endpoint,
    free_port,
    service,
    services_file,
    start_proxy,
)

FOREIGN = """
import socket, sys, time
s = socket.socket()
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print("listening", flush=True)
time.sleep(600)
"""


def foreign_listener(host: str, port: int) -> subprocess.Popen[str]:
    """Another program listening on host:port (without SO_REUSEPORT), as an app on a VM."""
    proc, _, _, _ = spawn([sys.executable, "-c", FOREIGN, host, str(port)],
                          lambda line: "listening" in line, what="the foreign listener")
    return proc


def command_name(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def redirects(proxy: ProxyProcess) -> dict[str, dict[str, Any]]:
    with urllib.request.urlopen(f"{proxy.admin}/redirects", timeout=5) as resp:
        return {r["address"]: r for r in json.loads(resp.read())}


@pytest.fixture(scope="module")
def trust(tmp_path_factory: pytest.TempPathFactory) -> Trust:
    return Trust.create(tmp_path_factory.mktemp("trust"))


@pytest.fixture(scope="module")
def target(trust: Trust) -> Iterator[tuple[ProxyProcess, int]]:
    app = echo_app()
    proxy = start_proxy(trust.root, "target", {"identity": trust.workload("default", "web")})
    yield proxy, app.server_address[1]
    proxy.stop()
    app.shutdown()


def test_a_held_address_names_its_holder_and_binds_once_released(
        trust: Trust, target: tuple[ProxyProcess, int]) -> None:
    proxy, app_port = target
    port = free_port()
    web, api, far = f"127.0.2.50:{port}", f"127.0.2.51:{port}", f"198.51.100.7:{port}"
    ep = endpoint(proxy.inbound[1], app_port, "web")
    discovery = services_file(trust.root / "redirect-services.yaml",
                              service("web", web, ep, opaque=True),
                              service("api", api, ep, opaque=True),
                              service("far", far, ep, opaque=True))
    foreign = foreign_listener("127.0.2.51", port)
    holder = f"address in use by pid {foreign.pid} ({command_name(foreign.pid)})"
    caller = start_proxy(trust.root, "caller", {
        "identity": trust.workload("default", "client"), "discovery": str(discovery)})
    try:
        state = redirects(caller)
        assert state[api]["state"] == "failed" and state[api]["cause"] == holder
        assert state[api]["service"] == "api.default.svc.cluster.local"
        assert state[web]["state"] == "bound" and state[web]["cause"] is None
        assert state[far]["state"] == "bound"  # not a local address: IP_FREEBIND
        wait_for(lambda: any(
            "redirected listener failed service=api.default.svc.cluster.local "
            f"address={api} cause={holder}" in line for line in caller.output),
            what="a warning naming the holder")
        assert call(("127.0.2.50", port), b"meanwhile") == b"meanwhile"

        stop_process(foreign)
        wait_for(lambda: redirects(caller)[api]["state"] == "bound", timeout=20,
                 what="the redirected listener to bind once the address is free")
        assert call(("127.0.2.51", port), b"now mine") == b"now mine"
        assert any(f"redirected listener bound service=api.default.svc.cluster.local "
                   f"address={api}" in line for line in caller.output)
    finally:
        caller.stop()
        stop_process(foreign)


async def test_a_listener_that_cannot_start_names_the_holder() -> None:
    port = free_port()
    foreign = foreign_listener("127.0.0.1", port)
    try:
        with pytest.raises(ConfigError, match=rf"inbound listener cannot bind 127\.0\.0\.1:"
                           rf"{port}: address in use by pid {foreign.pid} \("):
            await listen(lambda: None, f"127.0.0.1:{port}", "inbound")  # type: ignore
    finally:
        stop_process(foreign)
