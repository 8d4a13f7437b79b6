"""The Link spec: Linkerd's string-typed fields, defaults, selectors and the
errors a bad spec gets."""

from __future__ import annotations

import pytest

from mesh.structs import convert
from mirror.errors import LinkSpecError
from mirror.link import EXPORTED, LabelSelector, parse_duration, parse_spec


def _link(**spec: object) -> dict[str, object]:
    return {"metadata": {"name": "west", "namespace": "meshgate"},
            "spec": {"targetClusterName": "west", "clusterCredentialsSecret": "creds", **spec}}


def test_defaults() -> None:
    spec = parse_spec(_link())
    assert spec.selector == EXPORTED
    assert spec.selector.query() == "mirror.meshgate.io/exported=true"
    assert (spec.gateway_port, spec.target_cluster_domain) == (4143, "cluster.local")
    p = spec.probe_spec
    assert (p.path, p.port, p.period, p.failure_threshold, p.success_threshold) == (
        "/ready", 4191, 3.0, 3, 1)
    assert spec.gateway_addresses == ()


def test_linkerd_strings_are_accepted() -> None:
    spec = parse_spec(_link(gatewayPort="4143", gatewayAddress="gw.example.com, 192.0.2.1,",
                            probeSpec={"port": "4191", "period": "1m30s", "timeout": "500ms",
                                       "failureThreshold": "5"}))
    assert spec.gateway_port == 4143
    assert spec.gateway_addresses == ("gw.example.com", "192.0.2.1")
    assert (spec.probe_spec.period, spec.probe_spec.timeout) == (90.0, 0.5)
    assert spec.probe_spec.failure_threshold == 5


@pytest.mark.parametrize(("text", "seconds"), [("3s", 3.0), ("250ms", 0.25), ("1h2m", 3720.0),
                                               ("1.5s", 1.5), (2, 2.0)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "3", "s", "3 s", "-1s", "0s", "3x"])
def test_bad_durations(text: object) -> None:
    # A number is seconds; a string needs its unit, as in Go.
    with pytest.raises(ValueError):
        parse_duration(text)


def test_selector_queries() -> None:
    sel = convert({
        "matchLabels": {"b": "2", "a": "1"},
        "matchExpressions": [{"key": "tier", "operator": "In", "values": ["web", "api"]},
                             {"key": "legacy", "operator": "DoesNotExist"},
                             {"key": "zone", "operator": "Exists"}]}, LabelSelector)
    assert sel.query() == "a=1,b=2,tier in (api,web),!legacy,zone"
    assert sel.matches({"a": "1", "b": "2", "tier": "web", "zone": "z"})
    assert not sel.matches({"a": "1", "b": "2", "tier": "web", "zone": "z", "legacy": "y"})
    assert LabelSelector().query() == ""


def test_bad_specs_name_each_field() -> None:
    with pytest.raises(LinkSpecError) as info:
        parse_spec(_link(targetClusterName="West_1", gatewayPort=70000,
                         gatewayAddress="not an address",
                         namespaceMapping={"a": "Bad_NS"}))
    text = str(info.value)
    assert text.startswith("Link meshgate/west is invalid:")
    for field in ("targetClusterName", "gatewayPort", "gatewayAddress", "namespaceMapping"):
        assert f"spec.{field}" in text
    with pytest.raises(LinkSpecError, match="clusterCredentialsSecret"):
        parse_spec({"metadata": {}, "spec": {"targetClusterName": "west"}})
