"""`meshgate vm status`: what the agent made and whether it works, read from the
state directory, the kernel, the resolver files and the proxy's admin port.

Exit status 0 when the VM is joined and everything works, 1 when something
does not (each line says what and since when), 2 when nothing was joined.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
from typing import Any

from mesh.identity import ca
from vm_agent import routes
from vm_agent.agent import ADMIN, http_ready
from vm_agent.state import AgentError, Phase, StateDir


def status(args: argparse.Namespace) -> int:
    from vm_agent import resolver

    sd = StateDir(args.state_dir)
    state = sd.load()
    if state is None:
        raise AgentError(f"this VM has not joined the mesh (no state in {sd.path}); run "
                         "`meshgate vm join`")
    healthy = state.phase == Phase.JOINED
    lines = [f"phase:        {state.phase}"
             + (f" (since {state.joined_at})" if state.joined_at else "")]
    lines.append(f"workload:     ExternalWorkload {state.namespace}/{state.workload}, "
                 f"address {state.address}")
    ok, text = _certificate(sd)
    healthy &= ok
    lines.append(f"identity:     {state.identity}; {text}")
    agent = _read_status(sd)
    holder = sd.holder()
    if holder is None:
        healthy = False
        lines.append("agent:        not running (start it: `systemctl start meshgate-vm`, or "
                     "`meshgate vm run`)")
    else:
        lines.append(f"agent:        {holder}")
    for key, label in (("control_plane", f"control plane {state.control_plane}"),
                       ("api_server", f"API server {state.api_server}"),
                       ("gateway", f"gateway {state.gateway}"), ("proxy", "proxy")):
        if key == "gateway" and not state.gateway:
            continue
        health = agent.get(key) or {}
        if health.get("ok"):
            lines.append(f"{label + ':':<14} ok since {health.get('since')}")
        else:
            healthy = False
            lines.append(f"{label + ':':<14} FAILING since {health.get('since', '?')}: "
                         f"{health.get('cause', 'no report from the agent')}")
    lines.append(f"heartbeat:    last {agent.get('last_heartbeat') or 'never'}")
    live = asyncio.run(http_ready(*ADMIN))
    healthy &= live
    lines.append(f"proxy admin:  {'ready' if live else 'not answering'} on "
                 f"{ADMIN[0]}:{ADMIN[1]}")
    try:
        found = routes.current()
        lines.append(f"routes:       {len(found)} service addresses local (AnyIP, proto "
                     f"{routes.redirect.RTPROT_MESHGATE}), {agent.get('services', 0)} services "
                     "known")
    except Exception as e:  # netlink: show it, it is not fatal to the rest of the report
        healthy = False
        lines.append(f"routes:       cannot read: {e}")
    lines.append(f"dns:          {resolver.describe(state.resolver_file, sd.resolver)}")
    print("\n".join(lines))
    return 0 if healthy else 1


def _certificate(sd: StateDir) -> tuple[bool, str]:
    try:
        leaf = ca.load_certs(sd.chain.read_bytes())[0]
    except Exception as e:  # unreadable, or not a certificate: say which
        return False, f"no usable certificate ({e})"
    left = leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)
    if left.total_seconds() <= 0:
        return False, f"certificate EXPIRED at {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
    return True, (f"certificate valid until {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ} "
                  f"({left.total_seconds() / 3600:.1f} h left)")


def _read_status(sd: StateDir) -> dict[str, Any]:
    try:
        doc = json.loads(sd.status.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}
