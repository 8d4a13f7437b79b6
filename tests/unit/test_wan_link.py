"""A WAN member's link shape without namespaces: the flags' values, the settings they
make, how they are shown and handed to netem, and which member a name means."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from localcluster import wanlink
from localcluster.up import UpRequest, up
from localcluster.wan import MemberRef, Netem
from mesh.errors import ConfigError


@pytest.mark.parametrize(("text", "ms"), [("30ms", 30.0), ("2ms", 2.0), ("1s", 1000.0),
                                          ("1.5ms", 1.5), ("250us", 0.25), ("0", 0.0),
                                          (" 0.5s ", 500.0)])
def test_durations_are_read_in_milliseconds(text: str, ms: float) -> None:
    assert wanlink.parse_duration_ms(text, flag="--delay") == pytest.approx(ms)


@pytest.mark.parametrize("text", ["30", "ms", "30 ms", "1m", "1h", "abc", "", "1e3ms"])
def test_a_duration_without_a_unit_names_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--jitter .* is not a duration; give a number "
                       r"and a unit"):
        wanlink.parse_duration_ms(text, flag="--jitter")


@pytest.mark.parametrize(("text", "pct"), [("0.5%", 0.5), ("0.5", 0.5), ("100%", 100.0),
                                           ("0", 0.0)])
def test_percentages_are_read_with_or_without_the_sign(text: str, pct: float) -> None:
    assert wanlink.parse_loss_pct(text, flag="--loss") == pct


@pytest.mark.parametrize("text", ["half", "0.5%%", "%", "5 %"])
def test_a_loss_that_is_no_percentage_names_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--wan-loss .* is not a percentage"):
        wanlink.parse_loss_pct(text, flag="--wan-loss")


def test_settings_from_nothing() -> None:
    assert wanlink.settings(delay_ms=30, jitter_ms=2, loss_pct=0.5) == Netem(
        delay_ms=30, jitter_ms=2, loss_pct=0.5)
    assert wanlink.settings().empty


def test_values_left_out_keep_the_current_ones() -> None:
    current = Netem(delay_ms=30, jitter_ms=2, loss_pct=0.5)
    assert wanlink.settings(current, loss_pct=1) == Netem(delay_ms=30, jitter_ms=2,
                                                          loss_pct=1)
    assert wanlink.settings(current, jitter_ms=0) == Netem(delay_ms=30, loss_pct=0.5)


def test_a_delay_cleared_clears_its_jitter() -> None:
    current = Netem(delay_ms=30, jitter_ms=2, loss_pct=0.5)
    assert wanlink.settings(current, delay_ms=0) == Netem(loss_pct=0.5)
    assert wanlink.settings(current, delay_ms=0, loss_pct=0).empty


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"delay_ms": -1}, r"--delay -1ms is negative"),
    ({"jitter_ms": -2}, r"--jitter -2ms is negative"),
    ({"delay_ms": 61_000}, r"--delay 61000ms is more than netem holds; give at most 60s"),
    ({"loss_pct": 100.5}, r"--loss 100.5% is outside 0..100%"),
    ({"loss_pct": -1}, r"--loss -1% is outside 0..100%"),
    ({"loss_pct": float("nan")}, r"--loss must be a finite number"),
    ({"jitter_ms": 2}, r"--jitter 2ms needs a delay to vary; give --delay too"),
    ({"jitter_ms": 2, "delay_ms": 0}, r"--jitter 2ms needs a delay to vary, and --delay is 0"),
])
def test_bad_values_name_their_flag(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        wanlink.settings(**kwargs)


def test_cluster_up_names_its_own_flags() -> None:
    with pytest.raises(ConfigError, match="--wan-jitter 2ms needs a delay to vary; give "
                       "--wan-delay too"):
        wanlink.settings(jitter_ms=2, flag_prefix="wan-")


def test_a_jitter_may_be_added_to_a_recorded_delay() -> None:
    assert wanlink.settings(Netem(delay_ms=30), jitter_ms=2) == Netem(delay_ms=30,
                                                                      jitter_ms=2)


def test_settings_read_as_tc_prints_them() -> None:
    assert wanlink.describe(Netem()) == "none"
    assert wanlink.describe(Netem(delay_ms=30, jitter_ms=2, loss_pct=0.5)) == (
        "delay 30ms 2ms loss 0.5%")
    assert wanlink.describe(Netem(loss_pct=100)) == "loss 100%"


def test_netem_gets_whole_microseconds_and_a_percentage() -> None:
    assert wanlink.tc_options(Netem(delay_ms=30, jitter_ms=2.5, loss_pct=0.5)) == {
        "delay": 30_000, "jitter": 2_500, "loss": 0.5}
    assert wanlink.tc_options(Netem(delay_ms=0.25)) == {"delay": 250, "jitter": 0,
                                                        "loss": 0.0}


def _ref(kind: str, name: str, last: int) -> MemberRef:
    return MemberRef(kind=kind, name=name, address=IPv4Address(f"172.30.0.{last}"),
                     node_netns=f"mg-{name}", node_ifname="wan0", peer=f"wan{last}",
                     netem=Netem(), partitioned=False)


MEMBERS = [_ref("cluster", "east", 1), _ref("cluster", "db", 2), _ref("vm", "db", 3),
           _ref("vm", "web", 4)]


def test_a_member_is_found_by_its_name_or_kind_and_name() -> None:
    assert wanlink.resolve(MEMBERS, "east", wan="mg-wan").address == IPv4Address("172.30.0.1")
    assert wanlink.resolve(MEMBERS, "web", wan="mg-wan").kind == "vm"
    assert wanlink.resolve(MEMBERS, "vm/db", wan="mg-wan").address == IPv4Address(
        "172.30.0.3")
    assert wanlink.resolve(MEMBERS, "cluster/db", wan="mg-wan").kind == "cluster"


def test_a_name_that_a_cluster_and_a_vm_share_is_asked_about() -> None:
    with pytest.raises(ConfigError, match="both a cluster and a VM are called 'db' on the WAN "
                       "'mg-wan'; say cluster/db or vm/db"):
        wanlink.resolve(MEMBERS, "db", wan="mg-wan")


def test_an_unknown_member_names_the_members_there_are() -> None:
    with pytest.raises(wanlink.UnknownMemberError,
                       match=r"the WAN 'mg-wan' has no member 'west'; its members: cluster "
                       r"'east' \(172.30.0.1\), cluster 'db' \(172.30.0.2\), VM 'db' "
                       r"\(172.30.0.3\), VM 'web' \(172.30.0.4\)"):
        wanlink.resolve(MEMBERS, "west", wan="mg-wan")
    with pytest.raises(wanlink.UnknownMemberError, match="its members: none"):
        wanlink.resolve([], "east", wan="mg-wan")
    with pytest.raises(ConfigError, match="say cluster/NAME or vm/NAME"):
        wanlink.resolve(MEMBERS, "pod/east", wan="mg-wan")


@pytest.mark.parametrize(("flags", "message"), [
    ({"wan_delay": "30"}, "--wan-delay '30' is not a duration"),
    ({"wan_delay": "-5ms"}, "--wan-delay -5ms is negative"),
    ({"wan_jitter": "2ms"}, "--wan-jitter 2ms needs a delay to vary; give --wan-delay too"),
    ({"wan_loss": "101%"}, "--wan-loss 101% is outside 0..100%"),
])
def test_cluster_up_refuses_bad_wan_flags_before_building_anything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: dict[str, str],
        message: str) -> None:
    monkeypatch.setenv("MESHGATE_RUN_DIR", str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=message):
        up(UpRequest(name="east", state_dir=tmp_path / "east", multicluster=True, **flags))
    assert not (tmp_path / "run" / "clusters").exists()


def test_cluster_up_wan_flags_need_multicluster(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHGATE_RUN_DIR", str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="--wan-delay, --wan-jitter and --wan-loss need "
                       "--multicluster"):
        up(UpRequest(name="east", state_dir=tmp_path / "east", wan_delay="30ms"))
