"""`meshgate vm status` from a state directory, with nothing running: each dependency
named as ok or failing since when, and the exit status that says so."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest

from vm_agent import status as status_cmd
from vm_agent.agent import Health, tcp_reachable
from vm_agent.state import Phase, StateDir, VmState


def _state() -> VmState:
    return VmState(phase=Phase.JOINED, namespace="default", workload="legacy",
                   service_account="legacy", identity="legacy.default.serviceaccount.identity."
                   "meshgate.cluster.local", control_plane="https://172.30.0.2:8086",
                   address="172.30.0.9", dns_address="127.0.0.153")


def test_status_names_what_fails_and_since_when(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    sd = StateDir(tmp_path)
    state = _state()
    state.gateway = "127.0.0.1:9"
    sd.save(state)
    cause = asyncio.run(tcp_reachable("127.0.0.1:9", timeout=2))
    assert cause.startswith("127.0.0.1:9: ")  # refused: nothing listens on the discard port
    gateway = Health()
    gateway.update(False, cause)
    sd.status.write_text(json.dumps({"gateway": vars(gateway), "control_plane": {
        "ok": True, "since": "2026-12-06T03:00:00Z", "cause": ""}}))
    assert status_cmd.status(argparse.Namespace(state_dir=tmp_path)) == 1
    out = capsys.readouterr().out
    assert f"gateway 127.0.0.1:9: FAILING since {gateway.since}: {cause}" in out
    assert "control plane https://172.30.0.2:8086: ok since 2026-12-06T03:00:00Z" in out
    assert "agent:        not running" in out
