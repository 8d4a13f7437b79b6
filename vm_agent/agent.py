"""The running agent on a joined VM (`vm join --foreground`, or `vm run` under
systemd): it keeps the proxy running, the service addresses local, mesh names
answered, and the ExternalWorkload's heartbeat fresh.

- The proxy is a child process (``meshgate proxy run``), restarted with
  doubling waits when it exits; the agent's own imports (the kubernetes
  client) stay out of the data path.
- One destination stream from the control plane, over mTLS with the VM's
  certificate, tells every service's name and address: the names feed the DNS
  server, the addresses the AnyIP routes.
- Every heartbeat interval, while the proxy answers ``/ready``, the Ready
  condition is written with a fresh ``lastProbeTime``.
- What works and what does not, and since when, goes to ``status.json`` for
  `vm status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from mesh.files import write_atomic
from mesh.identity.names import Identity, service_identity
from mesh.identity.tls import load_identity
from vm_agent import routes
from vm_agent.registration import Registration, RegistrationUnreachable
from vm_agent.state import AgentError, Change, Phase, StateDir, VmState, now_text

log = logging.getLogger(__name__)

HEARTBEAT = 10.0
ADMIN = ("127.0.0.1", 4191)
RESTART_FIRST, RESTART_LONGEST = 1.0, 30.0


@dataclass
class Health:
    """One dependency's state: fine, or failing since a time and why."""

    ok: bool = False
    since: str = field(default_factory=now_text)
    cause: str = "not checked yet"

    def update(self, ok: bool, cause: str = "") -> None:
        if ok != self.ok:
            self.since = now_text()
        self.ok, self.cause = ok, "" if ok else cause


@dataclass
class AgentStatus:
    pid: int = field(default_factory=os.getpid)
    control_plane: Health = field(default_factory=Health)
    gateway: Health = field(default_factory=Health)
    api_server: Health = field(default_factory=Health)
    proxy: Health = field(default_factory=Health)
    proxy_restarts: int = 0
    last_heartbeat: str | None = None
    services: int = 0
    routes: int = 0


class ProxyProcess:
    """``meshgate proxy run`` as a child, restarted when it dies."""

    def __init__(self, state_dir: StateDir, status: AgentStatus) -> None:
        self.state_dir = state_dir
        self.status = status
        self.proc: asyncio.subprocess.Process | None = None
        self._stopping = False

    async def run(self) -> None:
        wait = RESTART_FIRST
        log_path = self.state_dir.path / "proxy.log"
        while not self._stopping:
            with open(log_path, "ab") as out:
                self.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "mesh.cli", "proxy", "run", "--config",
                    str(self.state_dir.proxy_config), stdout=out, stderr=out,
                    stdin=asyncio.subprocess.DEVNULL)
            started = time.monotonic()
            code = await self.proc.wait()
            if self._stopping:
                return
            self.status.proxy_restarts += 1
            self.status.proxy.update(False, f"the proxy exited with status {code}; see "
                                     f"{log_path}")
            log.warning("proxy exited status=%s restart_in=%.0fs log=%s", code, wait, log_path)
            wait = RESTART_FIRST if time.monotonic() - started > 60 else wait
            await asyncio.sleep(wait)
            wait = min(wait * 2, RESTART_LONGEST)

    async def stop(self) -> None:
        self._stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def http_ready(host: str, port: int, path: str = "/ready", timeout: float = 2.0) -> bool:
    """Whether a plain-HTTP admin endpoint answers 200."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                             .encode())
                line = await reader.readline()
            finally:
                writer.close()
        return line.split(b" ")[1:2] == [b"200"]
    except (OSError, TimeoutError, IndexError):
        return False


async def tcp_reachable(address: str, timeout: float = 3.0) -> str:
    """"" when a TCP connection to HOST:PORT opens, else why not."""
    host, _, port = address.rpartition(":")
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        writer.close()
        return ""
    except TimeoutError:
        return f"no answer from {address} within {timeout:.0f}s"
    except OSError as e:
        return f"{address}: {e.strerror or e}"


class Agent:
    def __init__(self, state_dir: StateDir, state: VmState, *,
                 heartbeat: float = HEARTBEAT) -> None:
        self.state_dir = state_dir
        self.state = state
        self.heartbeat_every = heartbeat
        self.status = AgentStatus()
        self.proxy = ProxyProcess(state_dir, self.status)
        self.registration = Registration(
            server=state.api_server, token_file=state_dir.agent_token,
            ca_file=state_dir.api_ca, namespace=state.namespace, name=state.workload)
        self.joined = asyncio.Event()
        self._ctx: tuple[float, ssl.SSLContext] | None = None
        self._routes_dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    # -- TLS with the certificate the proxy keeps renewed ---------------------------

    def client_context(self) -> ssl.SSLContext:
        mtime = self.state_dir.chain.stat().st_mtime
        if self._ctx is None or self._ctx[0] != mtime:
            ctx = ssl.create_default_context(cafile=str(self.state_dir.anchor))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.check_hostname = False  # the stream checks the control plane's identity
            load_identity(ctx, self.state_dir.chain.read_bytes(),
                          self.state_dir.key.read_bytes())
            self._ctx = (mtime, ctx)
        return self._ctx[1]

    # -- running ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        from mesh.discovery.client import WatchDiscovery
        from vm_agent import dns, resolver

        me = Identity.parse(self.state.identity)
        watch = WatchDiscovery(self.state.control_plane, context=self.client_context,
                               server_identity=service_identity(me.trust_domain,
                                                                me.control_ns))
        names = dns.MeshNames(self.state.cluster_domain)

        def changed(_: Any) -> None:
            table: dict[str, set[str]] = {}
            for spec in watch.services():
                table.setdefault(spec.name, set()).add(spec.host_port[0])
            for gone in set(names.table()) - set(table):
                names.remove(gone)
            for name, hosts in table.items():
                names.set(name, sorted(hosts))
            self.status.services = len(table)
            self._routes_dirty.set()

        watch.subscribe(changed)
        watch.start()
        # Fill the names before answering, or the first lookups would get NXDOMAIN.
        await watch.wait_ready(10.0)
        changed(None)
        self.state_dir.begin(self.state, Change.ROUTES)
        self.state_dir.begin(self.state, Change.RESOLVER)
        taken = await asyncio.to_thread(
            resolver.take_over, self.state.resolver_file, self.state_dir.resolver,
            dns_address=self.state.dns_address, cluster_domain=self.state.cluster_domain,
            search=resolver.mesh_search(self.state.namespace, self.state.cluster_domain))
        server = dns.MeshDnsServer(names, listen=(self.state.dns_address, 53),
                                   upstreams=taken.upstreams)
        await server.start()
        self._tasks = [asyncio.create_task(self.proxy.run()),
                       asyncio.create_task(self._keep_routes(watch)),
                       asyncio.create_task(self._heartbeats(watch))]
        try:
            await stop.wait()
        finally:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self.proxy.stop()
            await watch.stop()
            await server.stop()
            self._write_status()

    async def _keep_routes(self, watch: Any) -> None:
        while True:
            await self._routes_dirty.wait()
            self._routes_dirty.clear()
            addresses = {spec.host_port[0] for spec in watch.services()}
            try:
                await asyncio.to_thread(routes.sync, addresses)
                self.status.routes = len(addresses)
            except Exception as e:  # netlink: report, keep the rest of the agent going
                log.warning("service routes not changed cause=%s", e)

    async def _heartbeats(self, watch: Any) -> None:
        while True:
            await self._beat(watch)
            self._write_status()
            # Until the first ready heartbeat, look again soon: callers wait on it.
            await asyncio.sleep(self.heartbeat_every if self.joined.is_set()
                                else min(self.heartbeat_every, 0.25))

    async def _beat(self, watch: Any) -> None:
        st = self.status
        st.control_plane.update(bool(watch.connected), str(watch.last_error or
                                                           "connecting"))
        if self.state.gateway:
            st.gateway.update(*_reach(await tcp_reachable(self.state.gateway)))
        ready = await http_ready(*ADMIN)
        st.proxy.update(ready, st.proxy.cause if not ready and st.proxy_restarts else
                        "the proxy does not answer /ready yet")
        try:
            await asyncio.to_thread(
                self.registration.heartbeat, ready=ready,
                reason="Heartbeat" if ready else "ProxyNotReady",
                message=f"agent pid {os.getpid()}" if ready else st.proxy.cause)
        except RegistrationUnreachable as e:
            st.api_server.update(False, str(e))
            log.warning("heartbeat failed cause=%s", e)
            return
        except AgentError as e:
            st.api_server.update(False, str(e))
            log.error("heartbeat refused cause=%s", e)
            return
        st.api_server.update(True)
        st.last_heartbeat = now_text()
        if ready and watch.connected and not self.joined.is_set():
            if self.state.phase != Phase.JOINED:
                self.state.phase = Phase.JOINED
                self.state.joined_at = now_text()
                self.state_dir.save(self.state)
            self.joined.set()

    def _write_status(self) -> None:
        try:
            write_atomic(self.state_dir.status, json.dumps(asdict(self.status), indent=2)
                         .encode(), mode=0o644)
        except OSError as e:
            log.warning("status not written path=%s cause=%s", self.state_dir.status,
                        e.strerror)


def _reach(cause: str) -> tuple[bool, str]:
    return (not cause, cause)

