"""A real `meshgate control run` for tests: started as a process against a test
cluster, with helpers to wait for things and to call it over mTLS."""

from __future__ import annotations

import asyncio
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import aiohttp

from mesh.identity.names import service_identity
from tests.cluster import Cluster, spawn, stop_process
from tests.meshproxy import DOMAIN, Trust

T = TypeVar("T")
SERVER = service_identity(DOMAIN)
"""The identity the control plane presents."""


@dataclass
class ControlProcess:
    proc: subprocess.Popen[str]
    url: str
    output: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    """Every address it serves at (``url`` is the first)."""

    def stop(self) -> None:
        stop_process(self.proc)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_control(cluster: Cluster, trust: Trust, *, port: int = 0,
                  timeout: float = 30.0, extra: Sequence[str] = ()) -> ControlProcess:
    """`extra` are more arguments of ``control run`` (another ``--listen`` adds an
    address)."""
    proc, output, _, line = spawn(
        [sys.executable, "-m", "mesh.cli", "control", "run", "--kubeconfig",
         str(cluster.kubeconfig), "--identity-dir", str(trust.issuers.path), "--trust-domain",
         DOMAIN, "--listen", f"127.0.0.1:{port}", "--heartbeat", "0.5",
         "--cluster-name", "test", *extra], lambda line: "serving at https://" in line,
        what="control plane", timeout=timeout)
    url = re.search(r"serving at (https://\S+)", line)
    assert url is not None
    return ControlProcess(proc, url.group(1), output,
                          re.findall(r"(https://\S+)", line.split(" as ")[0]))


async def eventually(predicate: Callable[[], T], *, timeout: float = 10.0,
                     what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def get(url: str, ctx: ssl.SSLContext) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url, ssl=ctx,
                                                   server_hostname=SERVER.dns_name) as resp:
        return resp.status, await resp.text()
