"""The proxy's and the gateway's config files as a person writes them: what a bad one
is told (each field path and reason, on one line), what a good one becomes, and the
discovery JSON the control plane serves, byte for byte."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import msgspec
import pytest

from mesh.authz import AccessPolicy
from mesh.config import GatewayConfig, InboundConfig, ProxyConfig, load_model
from mesh.errors import ConfigError
from mesh.proxy.discovery import EndpointSpec, ServiceSpec
from mesh.structs import FieldError

IDENTITY = ("identity: {name: web.default.serviceaccount.identity.meshgate.cluster.local, "
            "trustBundle: /b, certFile: /c, keyFile: /k}\n")


def problem(tmp_path: Path, text: str, model: type = ProxyConfig) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_model(path, model, what="proxy config")
    message = str(info.value)
    assert "\n" not in message
    return message.removeprefix(f"proxy config {path} is invalid: ")


def test_a_bad_address_names_the_field_and_the_value(tmp_path: Path) -> None:
    assert problem(tmp_path, IDENTITY + "inbound: {listen: '1.2.3.4:99999'}\n") == \
        "inbound.listen: '1.2.3.4:99999' is not HOST:PORT"


@pytest.mark.parametrize(("text", "expected"), [
    ("outbound: {redirect: maybe}", "outbound.redirect: expected true or false, got 'maybe'"),
    ("outbound: {opaquePorts: [25, smtp]}",
     "outbound.opaquePorts[1]: expected an integer, got 'smtp'"),
    ("detectTimeout: 5x", "detectTimeout: duration '5x' is not a duration such as 90s"),
    ("detectTimeout: [1]", "detectTimeout: [1] is not a duration"),
    ("inbound: {lisen: '0.0.0.0:4143'}",
     "inbound.lisen: unknown field (check its spelling and indentation)"),
    ("inbound: {trustedGateways: ['*']}", "inbound.trustedGateways[0]: '*' is not an identity"),
    ("outbound: {gateway: {address: 'gw:4143'}}",
     "outbound.gateway.identity: required field is missing"),
    ("outbound: {gateway: {address: gw, identity: x}}",
     "outbound.gateway.address: 'gw' is not HOST:PORT"),
    ("workload: {namespace: a, pod: p}",
     "<top level>: workload needs destination: its policy comes from the control plane"),
    ("workload: {namespace: a}\ndestination: {server: 'https://cp:8086'}",
     "workload: give exactly one of pod and externalWorkload"),
])
def test_each_bad_field_is_named_with_its_reason(tmp_path: Path, text: str,
                                                 expected: str) -> None:
    assert problem(tmp_path, IDENTITY + text + "\n").startswith(expected)


def test_every_bad_field_of_a_file_is_named_on_one_line(tmp_path: Path) -> None:
    message = problem(tmp_path, "listen: nowhere\nadmin: '0.0.0.0:99999'\n"
                      "clusterDomain: Cluster.Local\ndefaultPolicy: open\n", GatewayConfig)
    assert message.split("; ") == [
        "identity: required field is missing",
        "kubeconfig: required field is missing",
        "listen: 'nowhere' is not HOST:PORT",
        "admin: '0.0.0.0:99999' is not HOST:PORT",
        "clusterDomain: 'Cluster.Local' is not a lowercase DNS name such as cluster.local",
        "defaultPolicy: expected one of 'deny', 'all-authenticated', 'all-unauthenticated', "
        "got 'open'",
    ]


def test_a_good_file_reads_durations_paths_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(IDENTITY + "detectTimeout: 3\noutbound: {connectTimeout: 1h30m}\n"
                    "discovery: /etc/discovery.yaml\n")
    cfg = load_model(path, ProxyConfig, what="proxy config")
    assert cfg.detect_timeout == timedelta(seconds=3)
    assert cfg.outbound.connect_timeout == timedelta(hours=1, minutes=30)
    assert cfg.outbound.request_timeout == timedelta(seconds=10)
    assert cfg.discovery == Path("/etc/discovery.yaml")
    assert cfg.identity.cert_file == Path("/c") and not cfg.identity.renewed_files
    assert cfg.inbound.listen == "0.0.0.0:4143" and type(cfg.inbound.listen) is str
    assert 3306 in cfg.outbound.opaque_ports


def test_a_config_built_in_code_is_checked_too() -> None:
    with pytest.raises(FieldError, match=r"^listen: 'x' is not HOST:PORT$"):
        InboundConfig(listen="x")
    assert GatewayConfig.__struct_config__.frozen
    assert InboundConfig().trusted_gateways == []
    assert AccessPolicy("deny") is AccessPolicy.DENY


def test_services_are_served_as_json_byte_for_byte_as_before() -> None:
    # The destination stream's form before the models were msgspec Structs (pydantic's
    # model_dump_json(by_alias=True)): every field, in order, nulls included.
    spec = ServiceSpec(
        name="web.default.svc.cluster.local", address="10.96.0.1:80", opaque=True,
        failback_s=30.0, endpoints=[
            EndpointSpec(address="10.0.0.1:4143", target_port=8080,
                         identity="web.default.serviceaccount.identity.meshgate.cluster.local",
                         zone="a", cluster="c", authority="x.y"),
            EndpointSpec(address="[::1]:80", target_port=80)])
    assert msgspec.json.encode(spec) == (
        b'{"name":"web.default.svc.cluster.local","address":"10.96.0.1:80","opaque":true,'
        b'"endpoints":[{"address":"10.0.0.1:4143","targetPort":8080,"identity":'
        b'"web.default.serviceaccount.identity.meshgate.cluster.local","weight":1,'
        b'"priority":0,"zone":"a","cluster":"c","authorityOverride":"x.y"},'
        b'{"address":"[::1]:80","targetPort":80,"identity":null,"weight":1,"priority":0,'
        b'"zone":"","cluster":"","authorityOverride":null}],"failbackSeconds":30.0}')
    assert msgspec.json.decode(msgspec.json.encode(spec), type=ServiceSpec) == spec
