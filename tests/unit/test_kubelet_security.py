"""localcluster.kubelet.security: the capabilities a container gets, as containerd
computes them from its securityContext, the setpriv command line that applies them,
and which Pod sysctls are written in its network namespace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from localcluster.kubelet.security import (
    DEFAULT_CAPABILITIES,
    capabilities,
    confine,
    net_sysctls,
    write_sysctls,
)


def with_caps(**caps: Any) -> dict[str, Any]:
    return {"name": "c", "securityContext": {"capabilities": caps}}


@pytest.mark.parametrize(("container", "expected"), [
    ({"name": "c"}, DEFAULT_CAPABILITIES),
    (with_caps(drop=["ALL"]), frozenset()),
    (with_caps(drop=["ALL"], add=["NET_ADMIN"]), frozenset({"NET_ADMIN"})),
    (with_caps(add=["CAP_NET_ADMIN"], drop=["NET_RAW", "KILL"]),
     DEFAULT_CAPABILITIES - {"NET_RAW", "KILL"} | {"NET_ADMIN"}),
    (with_caps(add=["ALL"]), None),
    ({"name": "c", "securityContext": {"privileged": True}}, None),
])
def test_capabilities_as_containerd_computes_them(container: dict[str, Any],
                                                  expected: frozenset[str] | None) -> None:
    assert capabilities(container) == expected


def test_confine_limits_the_bounding_and_inheritable_sets() -> None:
    argv = confine(with_caps(drop=["ALL"], add=["NET_ADMIN"]), ["meshgate", "proxy", "init"],
                   setpriv="/usr/bin/setpriv")
    assert argv == ["/usr/bin/setpriv", "--inh-caps=-all,+net_admin",
                    "--bounding-set=-all,+net_admin", "--", "meshgate", "proxy", "init"]
    assert confine(with_caps(drop=["ALL"]), ["x"], setpriv="sp")[:3] == [
        "sp", "--inh-caps=-all", "--bounding-set=-all"]
    assert confine({"name": "c", "securityContext": {"privileged": True}}, ["x"],
                   setpriv="sp") == ["x"]


def test_only_network_sysctls_are_written(tmp_path: Path) -> None:
    pod = {"spec": {"securityContext": {"sysctls": [
        {"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"},
        {"name": "kernel.shm_rmid_forced", "value": "1"}]}}}
    sysctls = net_sysctls(pod)
    assert sysctls == [("net.ipv4.ip_unprivileged_port_start", "0")]
    (tmp_path / "net" / "ipv4").mkdir(parents=True)
    write_sysctls(sysctls, tmp_path)
    assert (tmp_path / "net/ipv4/ip_unprivileged_port_start").read_text() == "0\n"
    assert net_sysctls({"spec": {}}) == []
