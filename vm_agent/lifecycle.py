"""`vm join`, `vm run` and `vm leave`: enrolling the VM, running its agent, and
undoing exactly what was done.

Join records each change in ``state.json`` before making it (vm_agent.state),
in this order: identity files, registration, unit, then (in the running
agent) resolver and routes. Leave undoes the recorded changes in reverse. A
join that finds a half-done one undoes it first, so a join killed at any
point leaves the VM either as it was or fully joined, never in between.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

from mesh.files import discard_partial_writes, write_atomic
from mesh.identity.names import GATEWAY_SERVICE_ACCOUNT, Identity
from mesh.proxy.listeners import bind_failure
from vm_agent import routes, systemd
from vm_agent.agent import Agent
from vm_agent.enroll import Anchors, Enrolled, enroll, identity_of
from vm_agent.registration import Registration, RegistrationUnreachable
from vm_agent.state import (
    UNIT_NAME,
    AgentError,
    Change,
    Phase,
    StateDir,
    VmState,
)

log = logging.getLogger(__name__)

DNS_ADDRESS = "127.0.0.153"
JOIN_TIMEOUT = 120.0
STOP_TIMEOUT = 20.0


def source_address(url: str) -> str:
    """The VM's address on the path to the control plane: what callers dial."""
    split = urlsplit(url)
    host = split.hostname or ""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, split.port or 443))
        except OSError as e:
            raise AgentError(f"no route from this VM to the control plane {url}: "
                             f"{e.strerror or e}") from e
        return str(s.getsockname()[0])


def proxy_config(sd: StateDir, state: VmState) -> dict[str, object]:
    outbound: dict[str, object] = {"listen": "127.0.0.1:4140", "redirect": True}
    inbound: dict[str, object] = {"listen": "0.0.0.0:4143", "appHost": "127.0.0.1"}
    if state.gateway and state.gateway_identity:
        outbound["gateway"] = {"address": state.gateway, "identity": state.gateway_identity}
        # Another VM of the cluster calls this one through the gateway, which names it.
        inbound["trustedGateways"] = [state.gateway_identity]
    return {
        "identity": {"name": state.identity, "trustBundle": str(sd.anchor),
                     "server": state.control_plane, "certFile": str(sd.chain),
                     "keyFile": str(sd.key)},
        "destination": {"server": state.control_plane},
        "workload": {"namespace": state.namespace, "externalWorkload": state.workload},
        "inbound": inbound,
        "outbound": outbound,
        "admin": {"listen": "127.0.0.1:4191"},
    }


def preflight(*, dns_address: str, resolver_file: Path = Path("/etc/resolv.conf")) -> None:
    """What would stop the agent later, checked before the single-use token is spent:
    a resolver file it cannot read, ports another process holds."""
    from vm_agent import resolver

    try:
        resolver.ResolvConf.parse(resolver_file.read_bytes(), source=str(resolver_file))
    except OSError as e:
        raise AgentError(f"cannot read {resolver_file}: {e.strerror or e}") from e
    for host, port, kind, what in ((dns_address, 53, socket.SOCK_DGRAM, "the mesh DNS"),
                                   ("0.0.0.0", 4143, socket.SOCK_STREAM, "the proxy's inbound"),
                                   ("127.0.0.1", 4140, socket.SOCK_STREAM,
                                    "the proxy's outbound"),
                                   ("127.0.0.1", 4191, socket.SOCK_STREAM,
                                    "the proxy's admin")):
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:  # as the proxy binds: TIME_WAIT is no conflict
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                cause = (bind_failure(e, f"{host}:{port}") if kind == socket.SOCK_STREAM
                         else e.strerror or str(e))
                raise AgentError(f"{what} needs {host}:{port}, which is not free ({cause}); "
                                 "stop what holds it"
                                 + (", or choose another --dns-address" if port == 53 else "")
                                 ) from e


def join(args: argparse.Namespace) -> int:
    sd = StateDir(args.state_dir)
    if not args.foreground and not systemd.running():
        raise AgentError("systemd is not running on this machine, so the agent cannot be "
                         "installed as a service; pass --foreground to run it in this "
                         "terminal (containers, tests)")
    anchors = Anchors.load(args.trust_anchor)
    me = identity_of(args.token, anchors)
    made = not sd.path.exists()
    with sd.locked("meshgate vm join"):
        before = sd.load()
        if before is not None and before.phase == Phase.JOINED:
            raise AgentError(f"this VM already joined as ExternalWorkload {before.namespace}/"
                             f"{before.workload} (state in {sd.path}); see `meshgate vm "
                             "status`, or run `meshgate vm leave` first")
        if before is not None:
            log.warning("a previous join stopped half way; undoing what it did first")
            undo(sd, before)
        address = args.address or source_address(args.control_plane)
        preflight(dns_address=args.dns_address)  # before the token is spent
        enrolled = asyncio.run(enroll(args.control_plane, args.token, anchors,
                                      deadline=time.monotonic() + args.timeout))
        if enrolled.agent is None:
            raise AgentError("the join token carries no agent credential; mint it with "
                             "`meshgate vm token`")
        gateway_identity = args.gateway_identity or (Identity(
            me.control_ns, GATEWAY_SERVICE_ACCOUNT, me.trust_domain, me.control_ns).dns_name
            if args.gateway else None)
        state = VmState(phase=Phase.JOINING, namespace=enrolled.namespace,
                        workload=enrolled.workload, service_account=me.service_account,
                        identity=me.dns_name, control_plane=args.control_plane,
                        gateway=args.gateway, gateway_identity=gateway_identity,
                        api_server=enrolled.agent.server, address=address,
                        cluster_domain=args.cluster_domain, dns_address=args.dns_address,
                        made_state_dir=made)
        sd.save(state)
        try:
            agent = _set_up(sd, state, anchors, enrolled, heartbeat=args.heartbeat)
        except BaseException:
            problems = undo(sd, state)
            for p in problems:
                log.error("join rolled back incompletely cause=%s", p)
            raise
        print(f"enrolled as {me} (ExternalWorkload {state.namespace}/{state.workload}, "
              f"address {address})", flush=True)
        if args.foreground:
            return _run_in_foreground(agent, announce=True)
        sd.begin(state, Change.UNIT)
        state.unit_file = str(systemd.UNIT_DIR / UNIT_NAME)
        sd.save(state)
    systemd.install(sd.path)
    return _wait_joined(sd, args.timeout)


def _set_up(sd: StateDir, state: VmState, anchors: Anchors, enrolled: Enrolled, *,
            heartbeat: float) -> Agent:
    assert enrolled.agent is not None
    sd.begin(state, Change.IDENTITY)
    for directory in (sd.key.parent, sd.agent_token.parent):
        directory.mkdir(mode=0o700, exist_ok=True)
    write_atomic(sd.anchor, anchors.pem, mode=0o644)
    write_atomic(sd.key, enrolled.key_pem, mode=0o600)
    write_atomic(sd.chain, enrolled.chain_pem, mode=0o644)
    write_atomic(sd.agent_token, enrolled.agent.token.encode(), mode=0o600)
    write_atomic(sd.api_ca, enrolled.agent.certificate_authority.encode(), mode=0o644)
    write_atomic(sd.proxy_config, json.dumps(proxy_config(sd, state), indent=2).encode(),
                 mode=0o644)
    sd.begin(state, Change.REGISTRATION)
    agent = Agent(sd, state, heartbeat=heartbeat)
    agent.registration.register(state.address)
    return agent


def run(args: argparse.Namespace) -> int:
    """The agent of a VM that joined before (what the systemd unit runs)."""
    sd = StateDir(args.state_dir)
    with sd.locked("meshgate vm run"):
        state = sd.load()
        if state is None or Change.IDENTITY not in state.changes:
            raise AgentError(f"nothing joined from {sd.path}; run `meshgate vm join` first")
        return _run_in_foreground(Agent(sd, state, heartbeat=args.heartbeat), announce=False)


def _run_in_foreground(agent: Agent, *, announce: bool) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        async def tell() -> None:
            await agent.joined.wait()
            if announce:
                print(f"joined: {agent.state.identity} is ready and heartbeating; "
                      f"`meshgate vm status --state-dir {agent.state_dir.path}`", flush=True)

        told = asyncio.create_task(tell())
        try:
            await agent.run(stop)
        finally:
            told.cancel()

    asyncio.run(main())
    return 0


def _wait_joined(sd: StateDir, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = sd.load()
        if state is not None and state.phase == Phase.JOINED:
            print(f"joined: {state.identity}; the agent runs as {state.unit_file}")
            return 0
        time.sleep(0.5)
    raise AgentError(f"the agent did not report ready within {timeout:.0f}s; see "
                     f"`meshgate vm status --state-dir {sd.path}` and `journalctl -u "
                     "meshgate-vm`")


def leave(args: argparse.Namespace) -> int:
    sd = StateDir(args.state_dir)
    state = sd.load()
    if state is None:
        print(f"nothing to undo: no join recorded in {sd.path}")
        return 0
    _stop_agent(sd, state)
    with sd.locked("meshgate vm leave"):
        state = sd.load()
        if state is None:
            print(f"nothing to undo: no join recorded in {sd.path}")
            return 0
        state.phase = Phase.LEAVING
        sd.save(state)
        problems = undo(sd, state)
    if problems:
        for p in problems:
            print(f"meshgate: {p}", flush=True)
        return 1
    if state.made_state_dir:
        with contextlib.suppress(OSError):
            sd.path.rmdir()
    print(f"left: routes, resolver, registration and files of {state.identity} removed")
    return 0


def _stop_agent(sd: StateDir, state: VmState) -> None:
    if state.unit_file:
        systemd.remove(Path(state.unit_file))
    pid = sd.holder_pid()
    if pid is None or pid == os.getpid():
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while sd.holder() is not None:
        if time.monotonic() > deadline:
            raise AgentError(f"the agent (pid {pid}) did not stop within "
                             f"{STOP_TIMEOUT:.0f}s; stop it and run `meshgate vm leave` again")
        time.sleep(0.1)


def undo(sd: StateDir, state: VmState) -> list[str]:
    """Undo every recorded change, newest first; what could not be undone."""
    from vm_agent import resolver

    problems: list[str] = []
    for change in reversed(list(state.changes)):
        try:
            if change == Change.UNIT and state.unit_file:
                systemd.remove(Path(state.unit_file))
            elif change == Change.RESOLVER:
                resolver.restore(state.resolver_file, sd.resolver)
                with contextlib.suppress(OSError):
                    sd.resolver.rmdir()
            elif change == Change.ROUTES:
                routes.remove_all()
            elif change == Change.REGISTRATION:
                _withdraw(sd, state)
            elif change == Change.IDENTITY:
                _remove_files(sd)
        except (AgentError, RegistrationUnreachable, OSError) as e:
            problems.append(f"could not undo {change}: {e}")
            continue
        state.changes.remove(change)
        sd.save(state)
    if not problems:
        for path in (sd.record, sd.status, sd.path / "proxy.log"):
            path.unlink(missing_ok=True)
        discard_partial_writes(sd.path)  # a join killed in the middle of writing one
    return problems


def _withdraw(sd: StateDir, state: VmState) -> None:
    if not sd.agent_token.exists():
        return
    try:
        Registration(server=state.api_server, token_file=sd.agent_token, ca_file=sd.api_ca,
                     namespace=state.namespace, name=state.workload).withdraw()
    except RegistrationUnreachable as e:
        raise AgentError(f"{e}; the control plane drops the VM from its Services after "
                         "missed heartbeats anyway. Run `meshgate vm leave` again once the "
                         "API server is reachable to withdraw it now") from e


def _remove_files(sd: StateDir) -> None:
    for path in (sd.key, sd.chain, sd.agent_token, sd.api_ca, sd.proxy_config, sd.anchor):
        path.unlink(missing_ok=True)
    for directory in (sd.key.parent, sd.agent_token.parent):
        shutil.rmtree(directory, ignore_errors=True)
