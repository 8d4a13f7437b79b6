"""Static discovery: valid files in YAML and JSON, one message line per invalid
field naming its path, and reloads that keep the last good data."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from mesh.errors import ConfigError
from mesh.proxy.discovery import (
    Discovery,
    DiscoveryFile,
    EndpointSpec,
    ServiceSpec,
    StaticDiscovery,
    split_host_port,
)
from mesh.structs import convert

WEB_ID = "web.default.serviceaccount.identity.meshgate.cluster.local"
WEB_WEST_ID = "web.default.serviceaccount.identity.meshgate.west.local"
API_ID = "api.prod.serviceaccount.identity.meshgate.cluster.local"

YAML_TEXT = f"""\
services:
  - name: web.default.svc.cluster.local
    address: 10.96.0.10:80
    endpoints:
      - address: 10.244.1.5:4143
        targetPort: 8080
        identity: {WEB_ID}
        zone: east-a
      - address: 10.244.2.9:4143
        targetPort: 8080
        identity: {WEB_ID}
        weight: 3
      - address: gateway.west.example:4143
        targetPort: 8080
        identity: {WEB_WEST_ID}
        priority: 1
  - name: api.prod.svc.cluster.local
    address: "[fd00::10]:8443"
    opaque: true
    endpoints:
      - address: "[fd00:1::7]:4143"
        targetPort: 8443
        identity: {API_ID}
  - name: legacy.default.svc.cluster.local
    address: 10.96.0.20:5432
    endpoints:
      - address: 192.168.1.50:5432
        targetPort: 5432
"""


def valid() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(YAML_TEXT)
    return data


def write(tmp_path: Path, data: Any, name: str = "discovery.yaml") -> Path:
    path = tmp_path / name
    text = json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data)
    path.write_text(text)
    return path


def errors_of(tmp_path: Path, data: Any, name: str = "discovery.yaml") -> list[str]:
    path = write(tmp_path, data, name)
    with pytest.raises(ConfigError) as info:
        StaticDiscovery.load(path)
    lines = str(info.value).splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    return [line.removeprefix(f"{path}: ") for line in lines]


def check_loaded(d: Discovery) -> None:
    web = d.resolve(("10.96.0.10", 80))
    assert web is not None
    assert web.name == "web.default.svc.cluster.local"
    assert not web.opaque
    first, second, remote = web.endpoints
    assert first == EndpointSpec(address="10.244.1.5:4143", target_port=8080, identity=WEB_ID,
                                 zone="east-a")
    assert (first.target_port, first.weight, first.priority, first.host_port) == (
        8080, 1, 0, ("10.244.1.5", 4143))
    assert second.weight == 3
    assert (remote.priority, remote.host_port) == (1, ("gateway.west.example", 4143))

    api = d.resolve(("fd00:0::10", 8443))  # any spelling of the address
    assert api is not None
    assert api.opaque
    assert api.endpoints[0].host_port == ("fd00:1::7", 4143)

    legacy = d.resolve(("10.96.0.20", 5432))
    assert legacy is not None
    assert legacy.endpoints[0].identity is None
    assert not legacy.endpoints[0].meshed

    assert d.resolve(("10.96.0.10", 81)) is None
    assert [s.name for s in d.services()] == [
        "web.default.svc.cluster.local", "api.prod.svc.cluster.local",
        "legacy.default.svc.cluster.local"]


def test_valid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "discovery.yaml"
    path.write_text(YAML_TEXT)
    check_loaded(StaticDiscovery.load(path))


def test_valid_json(tmp_path: Path) -> None:
    check_loaded(StaticDiscovery.load(write(tmp_path, valid(), "discovery.json")))


def test_models_round_trip_with_the_file_names() -> None:
    model = convert(valid(), DiscoveryFile)
    dumped = msgspec.to_builtins(model)
    assert dumped["services"][0]["endpoints"][0]["targetPort"] == 8080
    assert convert(dumped, DiscoveryFile) == model


def test_models_are_frozen() -> None:
    ep = EndpointSpec(address="10.0.0.1:4143", target_port=80)
    with pytest.raises(AttributeError, match="immutable"):
        ep.weight = 2  # type: ignore[misc]


def test_resolve_by_authority(tmp_path: Path) -> None:
    data = valid()
    data["services"].append({"name": "web.default.svc.cluster.local",
                             "address": "10.96.0.10:8080", "endpoints": []})
    data["services"].append({"name": "admin.default.svc.cluster.local",
                             "address": "10.96.0.30:9000", "endpoints": []})
    d = StaticDiscovery.load(write(tmp_path, data))

    def name_and_port(authority: str) -> tuple[str, int] | None:
        svc = d.resolve_name(authority)
        return None if svc is None else (svc.name, svc.host_port[1])

    web = "web.default.svc.cluster.local"
    assert name_and_port(f"{web}:8080") == (web, 8080)
    assert name_and_port(f"{web}:80") == (web, 80)
    assert name_and_port(web) == (web, 80)  # two ports: a bare name means HTTP's 80
    assert name_and_port("WEB.Default.svc.cluster.local.:80") == (web, 80)
    assert name_and_port("admin.default.svc.cluster.local") == (
        "admin.default.svc.cluster.local", 9000)  # the only one of that name
    assert name_and_port("10.96.0.20:5432") == ("legacy.default.svc.cluster.local", 5432)
    assert name_and_port("[fd00::10]:8443") == ("api.prod.svc.cluster.local", 8443)
    assert name_and_port("10.96.0.10") == (web, 80)
    assert name_and_port("fd00::10:8443") is None  # IPv6 must be bracketed
    for unknown in ("nope.svc:80", f"{web}:81", "", "web:abc", "[fd00::10]", "[fd00::10]x",
                    f"{web}:99999", ":80", "[fd00::10"):
        assert d.resolve_name(unknown) is None, unknown


def test_empty_discovery_knows_nothing() -> None:
    d = StaticDiscovery.empty()
    assert d.services() == []
    assert d.resolve(("10.0.0.1", 80)) is None
    with pytest.raises(ConfigError, match="nothing to reload"):
        d.reload()


# --- one line per error, naming the field path ---------------------------------------------


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    """Set `value` at a dotted path such as ``services.0.endpoints.1.address``."""
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is _DELETE:
        del node[int(last) if last.isdigit() else last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value


_DELETE = object()

CASES = [
    ("services.0.endpoints.1.address", "10.244.2.9",
     "services[0].endpoints[1].address: '10.244.2.9' is not host:port"),
    ("services.0.endpoints.1.address", "10.244.2.9:0",
     "services[0].endpoints[1].address: '10.244.2.9:0': port 0 is outside 1..65535"),
    ("services.0.endpoints.1.address", "10.244.2.9:65536",
     "services[0].endpoints[1].address: '10.244.2.9:65536': port 65536 is outside"),
    ("services.0.endpoints.1.address", "10.244.2.9:http",
     "services[0].endpoints[1].address: '10.244.2.9:http': port 'http' is not a number"),
    ("services.0.endpoints.1.address", "300.1.1.1:80",
     "services[0].endpoints[1].address: '300.1.1.1:80': '300.1.1.1' is not an IPv4 address"),
    ("services.0.endpoints.1.address", "bad_host:80",
     "services[0].endpoints[1].address: 'bad_host:80': 'bad_host' is neither an IP address"),
    ("services.0.endpoints.1.address", "fd00::1:80",
     "services[0].endpoints[1].address: 'fd00::1:80': an IPv6 host must be in brackets"),
    ("services.0.endpoints.1.address", "[fd00::zz]:80",
     "services[0].endpoints[1].address: '[fd00::zz]:80': 'fd00::zz' is not an IPv6 address"),
    ("services.0.endpoints.1.address", "[fd00::1]",
     "services[0].endpoints[1].address: '[fd00::1]' is not host:port"),
    ("services.0.endpoints.1.address", 4143,
     "services[0].endpoints[1].address: expected a string, got 4143"),
    ("services.0.endpoints.2.targetPort", _DELETE,
     "services[0].endpoints[2].targetPort: required field is missing"),
    ("services.0.endpoints.2.targetPort", 0,
     "services[0].endpoints[2].targetPort: must be from 1 to 65535, got 0"),
    ("services.0.endpoints.2.targetPort", 70000,
     "services[0].endpoints[2].targetPort: must be from 1 to 65535, got 70000"),
    ("services.0.endpoints.2.targetPort", "http",
     "services[0].endpoints[2].targetPort: expected an integer, got 'http'"),
    ("services.0.endpoints.0.identity", "web.default.svc",
     "services[0].endpoints[0].identity: 'web.default.svc' is not an identity name"),
    ("services.0.endpoints.0.identity", "Web.default.serviceaccount.identity.meshgate.x",
     "services[0].endpoints[0].identity: service account 'Web' must be a lowercase DNS label"),
    ("services.0.endpoints.1.weight", 0,
     "services[0].endpoints[1].weight: must be >= 1, got 0"),
    ("services.0.endpoints.2.priority", -1,
     "services[0].endpoints[2].priority: must be >= 0, got -1"),
    ("services.0.endpoints.0.target_port2", 1,
     "services[0].endpoints[0].target_port2: unknown field"),
    ("services.1.port", 1, "services[1].port: unknown field"),
    ("version", 2, "version: unknown field"),
    ("services.2.name", "Legacy", "services[2].name: 'Legacy' is not a lowercase DNS name"),
    ("services.2.name", _DELETE, "services[2].name: required field is missing"),
    ("services.2.address", "legacy.example:5432",
     "services[2].address: 'legacy.example:5432': a service address is the IP and port"),
    ("services.2.address", "10.96.0.20",
     "services[2].address: '10.96.0.20' is not host:port"),
    ("services.2.opaque", "maybe", "services[2].opaque: expected true or false, got 'maybe'"),
    ("services.2.endpoints", _DELETE, "services[2].endpoints: required field is missing"),
    ("services.2.endpoints", {"address": "x"},
     "services[2].endpoints: expected a list, got a mapping"),
    ("services.1", "api", "services[1]: expected a mapping, got 'api'"),
    ("services", _DELETE, "services: required field is missing"),
    ("services.2.address", "10.96.0.10:80",
     "services[2].address: 10.96.0.10:80 is already the address of services[0] "
     "(web.default.svc.cluster.local)"),
    ("services.0.endpoints.1.address", "10.244.1.5:4143",
     "services[0].endpoints[1]: endpoint 10.244.1.5:4143 targetPort 8080 is already listed "
     "as endpoints[0]"),
]


@pytest.mark.parametrize(("path", "value", "expected"), CASES,
                         ids=[f"{c[0]}={c[1]!r}" for c in CASES])
@pytest.mark.parametrize("name", ["discovery.yaml", "discovery.json"])
def test_each_invalid_field_is_named_with_its_path(tmp_path: Path, name: str, path: str,
                                                   value: Any, expected: str) -> None:
    data = valid()
    _set(data, path, value)
    assert [e for e in errors_of(tmp_path, data, name) if e.startswith(expected)] != [], (
        expected, errors_of(tmp_path, data, name))


def test_one_name_and_port_is_one_service(tmp_path: Path) -> None:
    data = valid()
    data["services"][2]["name"] = "web.default.svc.cluster.local"
    data["services"][2]["address"] = "10.96.0.21:80"
    assert errors_of(tmp_path, data) == [
        "services[2].name: web.default.svc.cluster.local port 80 is already served by "
        "services[0] (10.96.0.10:80)"]


def test_duplicate_services_in_ipv6_spelling_are_caught(tmp_path: Path) -> None:
    data = valid()
    data["services"][2]["address"] = "[fd00:0:0::10]:8443"
    assert errors_of(tmp_path, data) == [
        "services[2].address: [fd00:0:0::10]:8443 is already the address of services[1] "
        "(api.prod.svc.cluster.local)"]


def test_every_error_is_reported_one_per_line(tmp_path: Path) -> None:
    data = valid()
    _set(data, "services.0.endpoints.0.address", "nowhere")
    _set(data, "services.0.endpoints.2.weight", -3)
    _set(data, "services.1.endpoints.0.identity", "nobody")
    _set(data, "services.2.colour", "blue")
    errors = errors_of(tmp_path, data)
    assert [e.split(":")[0] for e in errors] == [
        "services[0].endpoints[0].address", "services[0].endpoints[2].weight",
        "services[1].endpoints[0].identity", "services[2].colour"]


def test_long_values_are_shortened_in_messages(tmp_path: Path) -> None:
    data = valid()
    _set(data, "services.0.endpoints.0.weight", "x" * 500)
    (error,) = errors_of(tmp_path, data)
    assert error.endswith("...") and len(error) < 200


@pytest.mark.parametrize(("text", "expected"), [
    ("", "expected a mapping with a 'services' list at the top, got NoneType"),
    ("- 1\n- 2\n", "expected a mapping with a 'services' list at the top, got list"),
    ("services: [\n  {name: web\n", "invalid YAML"),
])
def test_unparseable_yaml(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "discovery.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)) as info:
        StaticDiscovery.load(path)
    assert expected in str(info.value)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "discovery.yaml"
    path.write_text("services:\n  - name: web\n    address: [oops\n")
    with pytest.raises(ConfigError, match=rf"^{path}:\d+:\d+: invalid YAML"):
        StaticDiscovery.load(path)


def test_json_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "discovery.json"
    path.write_text('{"services": [\n  {"name": "web",}\n]}')
    with pytest.raises(ConfigError, match=rf"^{path}:2:18: invalid JSON"):
        StaticDiscovery.load(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=rf"^{path}: cannot read discovery file"):
        StaticDiscovery.load(path)


@pytest.mark.parametrize(("text", "expected"), [
    ("10.0.0.1:4143", ("10.0.0.1", 4143)),
    ("[::1]:4143", ("::1", 4143)),
    ("Gateway.West.example:1", ("Gateway.West.example", 1)),
    ("localhost:65535", ("localhost", 65535)),
])
def test_split_host_port(text: str, expected: tuple[str, int]) -> None:
    assert split_host_port(text) == expected


@pytest.mark.parametrize("text", [
    "", ":80", "host:", "host:+80", "host:٣", "[::1]80", "a..b:80", "-a.b:80",
    f"{'a' * 64}.example:80", "1.2.3:80",
])
def test_split_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        split_host_port(text)


# --- reload and subscribers ------------------------------------------------------------------


@pytest.fixture
def loaded(tmp_path: Path) -> tuple[StaticDiscovery, Path, list[ServiceSpec]]:
    path = write(tmp_path, valid())
    d = StaticDiscovery.load(path)
    seen: list[ServiceSpec] = []
    d.subscribe(seen.append)
    return d, path, seen


def test_reload_announces_only_what_changed(
        loaded: tuple[StaticDiscovery, Path, list[ServiceSpec]]) -> None:
    d, path, seen = loaded
    assert d.reload()
    assert seen == []  # same file, nothing to announce

    data = valid()
    data["services"][0]["endpoints"].pop(1)  # web loses an endpoint
    legacy = data["services"].pop(2)  # legacy goes away
    data["services"].append({"name": "new.default.svc.cluster.local",
                             "address": "10.96.0.40:80", "endpoints": []})
    write(path.parent, data)
    assert d.reload()
    assert [(s.name, len(s.endpoints)) for s in seen] == [
        ("web.default.svc.cluster.local", 2),
        ("new.default.svc.cluster.local", 0),
        ("legacy.default.svc.cluster.local", 0),  # gone: announced empty, so it drains
    ]
    assert seen[2].address == legacy["address"]
    assert d.resolve(("10.96.0.20", 5432)) is None
    assert d.resolve_name("new.default.svc.cluster.local") is not None
    web = d.resolve(("10.96.0.10", 80))
    assert web is not None and len(web.endpoints) == 2


@pytest.mark.parametrize("breakage", ["invalid", "unparseable", "missing"])
def test_reload_keeps_the_last_good_data(
        loaded: tuple[StaticDiscovery, Path, list[ServiceSpec]], breakage: str,
        caplog: pytest.LogCaptureFixture) -> None:
    d, path, seen = loaded
    if breakage == "invalid":
        data = valid()
        _set(data, "services.0.endpoints.0.address", "nowhere")
        _set(data, "services.1.endpoints.0.weight", 0)
        write(path.parent, data)
    elif breakage == "unparseable":
        path.write_text("services: [")
    else:
        path.unlink()
    before = d.services()
    with caplog.at_level(logging.WARNING, logger="mesh.proxy.discovery"):
        assert not d.reload()
    assert d.services() == before
    assert seen == []
    check_loaded(d)
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message
    assert f"discovery reload failed file={path} cause=" in message
    assert "keeping the last good data" in message
    if breakage == "invalid":
        assert "services[0].endpoints[0].address" in message
        assert "services[1].endpoints[0].weight" in message

    data = valid()
    data["services"][0]["opaque"] = True
    write(path.parent, data)
    assert d.reload()  # fixed: picked up again
    assert [s.name for s in seen] == ["web.default.svc.cluster.local"]
    assert seen[0].opaque


def test_unsubscribe_and_failing_subscribers(
        loaded: tuple[StaticDiscovery, Path, list[ServiceSpec]],
        caplog: pytest.LogCaptureFixture) -> None:
    d, path, seen = loaded
    others: list[ServiceSpec] = []

    def broken(svc: ServiceSpec) -> None:
        raise RuntimeError("subscriber bug")

    d.subscribe(broken)
    stop = d.subscribe(others.append)
    data = valid()
    data["services"][1]["opaque"] = False
    write(path.parent, data)
    with caplog.at_level(logging.ERROR, logger="mesh.proxy.discovery"):
        assert d.reload()
    assert len(seen) == len(others) == 1  # the broken one did not stop the next
    assert any("discovery subscriber failed" in r.getMessage() for r in caplog.records)

    stop()
    stop()  # twice is harmless
    data["services"][1]["opaque"] = True
    write(path.parent, data)
    assert d.reload()
    assert len(seen) == 2
    assert len(others) == 1


def test_static_discovery_is_a_discovery() -> None:
    d: Discovery = StaticDiscovery(DiscoveryFile(services=[]))
    assert d.services() == []


def test_models_validate_in_code_too() -> None:
    with pytest.raises(ValueError, match="already the address"):
        DiscoveryFile(services=[
            ServiceSpec(name="a", address="10.0.0.1:80", endpoints=[]),
            ServiceSpec(name="b", address="10.0.0.1:80", endpoints=[]),
        ])
