"""The VM agent's pure parts: join tokens as the VM reads them, the route plan,
the state directory's record and lock, and the files join writes."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from mesh.identity import jointoken
from vm_agent import routes, systemd
from vm_agent.state import AgentError, AlreadyRunning, Change, Phase, StateDir, VmState


def test_token_names_namespace_and_service_account_in_the_clear() -> None:
    parts = jointoken.parse("mgjoin.db.legacy.api.0123abcd.s3cr3t-_x")
    assert (parts.namespace, parts.service_account, parts.token_id, parts.secret) == (
        "db", "legacy.api", "0123abcd", "s3cr3t-_x")


@pytest.mark.parametrize("token", ["", "mgjoin", "mgjoin.db.id.secret", "other.db.sa.id.s",
                                   "mgjoin.db..id.secret", "mgjoin.db.sa.id."])
def test_malformed_tokens_are_refused_with_the_expected_shape(token: str) -> None:
    with pytest.raises(jointoken.JoinTokenRefused) as e:
        jointoken.parse(token)
    assert e.value.reason == "malformed-token"
    assert "mgjoin.<namespace>.<service-account>.<id>.<secret>" in str(e.value)


def test_route_plan_adds_missing_and_removes_stale_host_routes() -> None:
    have = [ipaddress.ip_network("10.96.0.10/32"), ipaddress.ip_network("10.96.0.99/32")]
    todo = routes.plan(have, ["10.96.0.10", "10.96.0.11", "fd00::a"])
    assert [str(n) for n in todo.add] == ["10.96.0.11/32", "fd00::a/128"]
    assert [str(n) for n in todo.remove] == ["10.96.0.99/32"]
    assert routes.plan(have, ["10.96.0.10", "10.96.0.99"]) == routes.RoutePlan((), ())


def _state() -> VmState:
    return VmState(phase=Phase.JOINING, namespace="default", workload="legacy",
                   service_account="legacy", identity="legacy.default.serviceaccount.identity."
                   "meshgate.cluster.local", control_plane="https://172.30.0.2:8086",
                   address="172.30.0.9", dns_address="127.0.0.153")


def test_state_records_each_change_before_it_is_made(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "state")
    assert sd.load() is None
    state = _state()
    sd.save(state)
    sd.begin(state, Change.IDENTITY)
    sd.begin(state, Change.REGISTRATION)
    sd.begin(state, Change.IDENTITY)
    loaded = sd.load()
    assert loaded is not None and loaded.changes == [Change.IDENTITY, Change.REGISTRATION]
    assert json.loads(sd.record.read_text())["controlPlane"] == "https://172.30.0.2:8086"


def test_a_damaged_record_says_how_to_recover(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    sd.record.write_text("{not json")
    with pytest.raises(AgentError, match="meshgate vm leave --state-dir"):
        sd.load()


def test_the_state_directory_has_one_owner_at_a_time(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "s")
    assert sd.holder() is None
    with sd.locked("meshgate vm join"):
        assert sd.holder() is not None and sd.holder_pid() is not None
        with pytest.raises(AlreadyRunning, match=r"in use by meshgate vm join \(pid \d+\)"), \
                StateDir(tmp_path / "s").locked("meshgate vm join"):
            pass
        assert oct(sd.path.stat().st_mode & 0o777) == "0o700"
    assert sd.holder() is None
    # It made the directory and nothing was joined into it: it is gone again.
    assert not sd.path.exists()


def test_the_unit_runs_the_agent_of_its_state_directory() -> None:
    text = systemd.unit_text(Path("/var/lib/meshgate"))
    assert "vm run --state-dir /var/lib/meshgate" in text
    assert "Restart=always" in text and "WantedBy=multi-user.target" in text


