"""What ``meshgate control run`` makes of its flags, and the proxy's choice between
serving a pod and serving an ExternalWorkload (a VM), without starting anything."""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from msgspec import ValidationError

from mesh.cli import build_parser, control_settings
from mesh.config import WorkloadConfig
from mesh.control.run import ControlSettings
from mesh.identity.names import service_identity
from mesh.proxy.policy import PolicyWatch
from mesh.structs import convert

BASE = ["control", "run", "--kubeconfig", "k", "--identity-dir", "d", "--trust-domain",
        "cluster.local"]


def settings(*flags: str) -> ControlSettings:
    return control_settings(build_parser().parse_args([*BASE, *flags]))


def test_listen_defaults_to_every_address_on_8086() -> None:
    s = settings()
    assert s.listen == (("0.0.0.0", 8086),)
    assert (s.workload_heartbeat, s.workload_missed_heartbeats) == (10.0, 3)


def test_listen_repeats() -> None:
    s = settings("--listen", "10.0.0.5:8086", "--listen", "[fd00::5]:8086")
    assert s.listen == (("10.0.0.5", 8086), ("fd00::5", 8086))


@pytest.mark.parametrize(("text", "seconds"), [("10s", 10.0), ("500ms", 0.5), ("2m", 120.0),
                                               ("1.5", 1.5)])
def test_workload_heartbeat_takes_durations(text: str, seconds: float) -> None:
    assert settings("--workload-heartbeat", text).workload_heartbeat == seconds


@pytest.mark.parametrize("flags", [("--workload-heartbeat", "0s"),
                                   ("--workload-heartbeat", "soon"),
                                   ("--workload-missed-heartbeats", "0")])
def test_bad_workload_flags_are_refused(flags: tuple[str, str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        settings(*flags)
    assert flags[0] in capsys.readouterr().err


def test_a_proxy_serves_a_pod_or_an_external_workload() -> None:
    vm = convert({"namespace": "legacy", "externalWorkload": "vm1"}, WorkloadConfig)
    assert (vm.pod, vm.external_workload) == (None, "vm1")
    for both_or_neither in ({"namespace": "a"}, {"namespace": "a", "pod": "p",
                                                 "externalWorkload": "vm1"}):
        with pytest.raises(ValidationError, match="exactly one of pod and externalWorkload"):
            convert(both_or_neither, WorkloadConfig)


def test_the_policy_watch_asks_for_what_it_serves() -> None:
    options: dict[str, Any] = {"context": ssl.create_default_context,
                               "server_identity": service_identity("cluster.local")}

    def query(watch: PolicyWatch) -> dict[str, list[str]]:
        return parse_qs(urlsplit(watch.stream_path).query)

    vm = PolicyWatch("https://127.0.0.1:8086", namespace="legacy", external_workload="vm1",
                     **options)
    assert query(vm) == {"namespace": ["legacy"], "externalworkload": ["vm1"]}
    pod = PolicyWatch("https://127.0.0.1:8086", namespace="shop", pod="web-1", **options)
    assert query(pod) == {"namespace": ["shop"], "pod": ["web-1"]}
    with pytest.raises(ValueError):
        PolicyWatch("https://127.0.0.1:8086", namespace="shop", **options)
