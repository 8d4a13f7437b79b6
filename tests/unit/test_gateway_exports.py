"""The gateway's decisions without sockets: who the caller is (field 100), which
Services may be reached, which endpoint, and whether its pod port admits the caller;
and the gateway's configuration file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.exports import Exports, Reason, Refused, Route, Target
from mesh.authz import AccessPolicy
from mesh.cli import main
from mesh.config import GatewayConfig, InboundConfig, load_model
from mesh.control.policy import AUTHORIZATION_POLICY, MESH_TLS_AUTHENTICATION, SERVER
from mesh.errors import ConfigError
from mesh.identity.names import Identity
from mesh.informer import ADDED, DELETED
from mesh.proxy.inbound import BadCaller, Caller, ForgedCaller, caller_of
from mesh.proxy.transport_header import TransportHeader
from mesh.structs import convert

DOMAIN = "cluster.local"
GATEWAY = Identity("multicluster", "gateway", DOMAIN)
WEST = Identity("multicluster", "west-gateway", DOMAIN).dns_name
CALLER = Identity("east", "client", DOMAIN).dns_name
OTHER = Identity("east", "other", DOMAIN).dns_name
WEB = Identity("default", "web", DOMAIN).dns_name
EXPORTED = {"mirror.meshgate.io/exported": "true"}


# -- field 100 --------------------------------------------------------------------------


def test_without_field_100_the_caller_is_the_peer() -> None:
    assert caller_of(CALLER, "", [WEST]) == Caller(CALLER)


def test_a_trusted_gateway_forwards_its_caller() -> None:
    assert caller_of(WEST, CALLER, [WEST]) == Caller(CALLER, gateway=WEST)
    suffix = "*.multicluster.serviceaccount.identity.meshgate.cluster.local"
    assert caller_of(WEST, CALLER, [suffix]) == Caller(CALLER, gateway=WEST)


def test_field_100_from_any_other_peer_is_forged() -> None:
    with pytest.raises(ForgedCaller, match=f"{OTHER} named caller {CALLER}"):
        caller_of(OTHER, CALLER, [WEST])
    with pytest.raises(ForgedCaller):
        caller_of(OTHER, CALLER, [])


def test_a_trusted_gateway_must_forward_an_identity() -> None:
    with pytest.raises(BadCaller, match="not an identity name"):
        caller_of(WEST, "web.default.svc.cluster.local", [WEST])


# -- the cluster, as events ----------------------------------------------------------------


def service(name: str, labels: dict[str, str], *, ip: str = "10.96.0.10",
            selector: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {"clusterIP": ip, "ports": [{"port": 80, "targetPort": 8080}]}
    if selector:
        spec["selector"] = {"app": name}
    return {"metadata": {"namespace": "default", "name": name, "labels": labels}, "spec": spec}


def pod(name: str, app: str, *, meshed: bool = True) -> dict[str, Any]:
    annotations = {"meshgate.io/inbound-port": "4143"} if meshed else {}
    return {"metadata": {"namespace": "default", "name": name, "labels": {"app": app},
                         "annotations": annotations},
            "spec": {"serviceAccountName": "web", "containers": [
                {"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]}}


def endpoint_slice(svc: str, pods: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"namespace": "default", "name": f"{svc}-abc",
                         "labels": {"kubernetes.io/service-name": svc}},
            "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True},
                           "targetRef": {"kind": "Pod", "namespace": "default", "name": name}}
                          for name, ip in pods.items()]}


def policy(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"namespace": "default", "name": name,
                         "creationTimestamp": "2024-01-01T00:00:00Z"}, "spec": spec}


@pytest.fixture
def exports() -> Exports:
    e = Exports(GATEWAY, trusted_gateways=[WEST])
    e.service_event(ADDED, service("web", EXPORTED))
    e.service_event(ADDED, service("secret", {}, ip="10.96.0.11"))
    e.service_event(ADDED, service("web-west", {**EXPORTED,
                                                "mirror.meshgate.io/mirrored-service": "true"},
                                   ip="10.96.0.12", selector=False))
    e.pod_event(ADDED, pod("web-1", "web"))
    e.pod_event(ADDED, pod("secret-1", "secret"))
    e.slice_event(ADDED, endpoint_slice("web", {"web-1": "10.244.0.5"}))
    e.slice_event(ADDED, endpoint_slice("secret", {"secret-1": "10.244.0.6"}))
    return e


def header(name: str, *, port: int = 80, caller: str = "") -> TransportHeader:
    return TransportHeader(port=port, name=f"{name}.default.svc.{DOMAIN}" if name else "",
                           caller=caller)


def refused(result: object) -> Refused:
    assert isinstance(result, Refused), result
    return result


def route(result: object) -> Route:
    assert isinstance(result, Route), result
    return result


# -- route ------------------------------------------------------------------------------


def test_an_exported_service_is_routed_as_the_peer(exports: Exports) -> None:
    r = route(exports.route(CALLER, header("web")))
    assert r.service.name == f"web.default.svc.{DOMAIN}" and r.key == ("default", "web")
    assert r.caller == Caller(CALLER)


@pytest.mark.parametrize(("peer", "name", "port", "caller", "reason"), [
    (CALLER, "secret", 80, "", Reason.NOT_EXPORTED),
    (CALLER, "nope", 80, "", Reason.UNKNOWN_SERVICE),
    (CALLER, "", 80, "", Reason.UNKNOWN_SERVICE),
    (CALLER, "web", 81, "", Reason.UNKNOWN_PORT),
    (OTHER, "web", 80, CALLER, Reason.FORGED_CALLER),
    (WEST, "web", 80, "nobody", Reason.BAD_CALLER),
    (WEST, "web-west", 80, CALLER, Reason.LOOP),
    (str(GATEWAY), "web-west", 80, "", Reason.LOOP),
])
def test_refused_routes(exports: Exports, peer: str, name: str, port: int, caller: str,
                        reason: Reason) -> None:
    assert refused(exports.route(peer, header(name, port=port, caller=caller))).reason is reason


def test_only_existing_services_are_metric_labels(exports: Exports) -> None:
    assert refused(exports.route(CALLER, header("nope"))).service == ""
    assert refused(exports.route(CALLER, header("secret"))).service == \
        f"secret.default.svc.{DOMAIN}"


def test_names_outside_the_cluster_domain_are_unknown(exports: Exports) -> None:
    bad = TransportHeader(port=80, name="web.default.svc.other.example")
    assert refused(exports.route(CALLER, bad)).reason is Reason.UNKNOWN_SERVICE
    assert exports.service_key("web.default.svc.cluster.local.") is None
    assert exports.service_key("web.svc.cluster.local") is None


def test_a_mirror_reached_by_a_workload_is_no_loop(exports: Exports) -> None:
    # Not from a gateway: the mirror is routed like any exported Service.
    assert route(exports.route(CALLER, header("web-west"))).key == ("default", "web-west")


def test_a_trusted_gateway_is_routed_as_its_caller(exports: Exports) -> None:
    assert route(exports.route(WEST, header("web", caller=CALLER))).caller == \
        Caller(CALLER, gateway=WEST)


def test_the_exported_label_is_configurable() -> None:
    e = Exports(GATEWAY, exported_label="team/public=yes")
    e.service_event(ADDED, service("web", EXPORTED))
    e.service_event(ADDED, service("api", {"team/public": "yes"}, ip="10.96.0.20"))
    assert refused(e.route(CALLER, header("web"))).reason is Reason.NOT_EXPORTED
    assert route(e.route(CALLER, header("api"))).key == ("default", "api")


VM = Identity("default", "legacy-vm", DOMAIN).dns_name


def external_workload(name: str, identity: str) -> dict[str, Any]:
    return {"metadata": {"namespace": "default", "name": name},
            "spec": {"meshTLS": {"identity": identity, "serverName": name},
                     "workloadIPs": [{"ip": "192.0.2.7"}]}}


def test_a_vm_of_this_cluster_reaches_every_service(exports: Exports) -> None:
    assert refused(exports.route(VM, header("secret"))).reason is Reason.NOT_EXPORTED
    exports.workload_event(ADDED, external_workload("legacy", VM))
    r = route(exports.route(VM, header("secret")))
    assert r.key == ("default", "secret") and r.caller == Caller(VM)
    # Still subject to the pod port's policy.
    target = exports.choose(r)
    assert isinstance(target, Target) and target.pod == ("default", "secret-1")
    admit_only_other(exports)
    assert refused(exports.choose(route(exports.route(VM, header("web"))))).reason is \
        Reason.UNAUTHORIZED
    # Other callers keep the exported-label rule.
    assert refused(exports.route(CALLER, header("secret"))).reason is Reason.NOT_EXPORTED
    # Once the workload is gone, so is the VM's way in.
    exports.workload_event(DELETED, external_workload("legacy", VM))
    assert refused(exports.route(VM, header("secret"))).reason is Reason.NOT_EXPORTED


def test_a_vm_identity_forwarded_by_a_gateway_gets_no_more_than_exports(
        exports: Exports) -> None:
    exports.workload_event(ADDED, external_workload("legacy", VM))
    assert refused(exports.route(WEST, header("secret", caller=VM))).reason is \
        Reason.NOT_EXPORTED
    assert route(exports.route(WEST, header("web", caller=VM))).caller == \
        Caller(VM, gateway=WEST)


def workload_slice(svc: str, workload: str, ip: str) -> dict[str, Any]:
    return {"metadata": {"namespace": "default", "name": f"{svc}-vm",
                         "labels": {"kubernetes.io/service-name": svc}},
            "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True},
                           "targetRef": {"kind": "ExternalWorkload", "namespace": "default",
                                         "name": workload}}]}


def test_a_vm_reaches_a_service_of_vms_under_their_policy(exports: Exports) -> None:
    vm = external_workload("legacy", VM)
    vm["metadata"]["labels"] = {"app": "legacy"}
    vm["spec"]["ports"] = [{"name": "http", "port": 8080}]
    exports.service_event(ADDED, service("legacy", EXPORTED, ip="10.96.0.13"))
    exports.slice_event(ADDED, workload_slice("legacy", "legacy", "192.0.2.7"))
    # Until the gateway knows the workload, its endpoint has no identity to dial it by.
    r = route(exports.route(CALLER, header("legacy")))
    assert refused(exports.choose(r)).reason is Reason.NO_ENDPOINTS
    exports.workload_event(ADDED, vm)
    target = exports.choose(route(exports.route(VM, header("legacy"))))
    assert isinstance(target, Target), target
    assert target.pod == ("default", "legacy")
    assert target.pick.endpoint.spec.address == "192.0.2.7:4143"
    assert target.pick.endpoint.spec.identity == VM
    target.pick.released()
    # A Server selecting the workload decides, as on the VM's own proxy.
    exports.policy_event(SERVER, ADDED, policy(SERVER, "legacy", {
        "externalWorkloadSelector": {"matchLabels": {"app": "legacy"}}, "port": "http",
        "accessPolicy": "deny"}))
    denied = refused(exports.choose(route(exports.route(VM, header("legacy")))))
    assert denied.reason is Reason.UNAUTHORIZED
    assert "externalworkload default/legacy port 8080" in denied.detail
    # Gone, the workload's endpoint is no longer dialled.
    exports.workload_event(DELETED, vm)
    exports.policy_event(SERVER, DELETED, policy(SERVER, "legacy", {}))
    assert refused(exports.choose(route(exports.route(CALLER, header("legacy"))))) \
        .reason is Reason.NO_ENDPOINTS


# -- choose -----------------------------------------------------------------------------


def test_an_endpoint_and_its_pod_are_chosen(exports: Exports) -> None:
    target = exports.choose(route(exports.route(CALLER, header("web"))))
    assert isinstance(target, Target)
    assert target.pod == ("default", "web-1")
    assert target.pick.endpoint.spec.address == "10.244.0.5:4143"
    assert target.pick.endpoint.spec.identity == WEB
    assert target.decision.allowed
    target.pick.succeeded(0.001)


def test_unmeshed_endpoints_are_never_chosen(exports: Exports) -> None:
    exports.pod_event(ADDED, pod("web-1", "web", meshed=False))
    r = route(exports.route(CALLER, header("web")))
    assert refused(exports.choose(r)).reason is Reason.NO_ENDPOINTS


def admit_only_other(exports: Exports) -> None:
    """Policy resources (three events) that let only OTHER reach web's http port."""
    exports.policy_event(SERVER, ADDED, policy(SERVER, "web", {
        "podSelector": {"matchLabels": {"app": "web"}}, "port": "http"}))
    exports.policy_event(MESH_TLS_AUTHENTICATION, ADDED, policy(
        MESH_TLS_AUTHENTICATION, "others", {"identities": [OTHER]}))
    exports.policy_event(AUTHORIZATION_POLICY, ADDED, policy(AUTHORIZATION_POLICY, "web", {
        "targetRef": {"group": "policy.meshgate.io", "kind": "Server", "name": "web"},
        "requiredAuthenticationRefs": [{"group": "policy.meshgate.io",
                                        "kind": "MeshTLSAuthentication", "name": "others"}]}))


def test_a_pod_policy_that_names_another_caller_refuses(exports: Exports) -> None:
    admit_only_other(exports)
    denied = refused(exports.choose(route(exports.route(CALLER, header("web")))))
    assert denied.reason is Reason.UNAUTHORIZED
    assert "Server default/web" in denied.detail and CALLER in denied.detail
    # The refused attempt gave its endpoint back.
    allowed = exports.choose(route(exports.route(OTHER, header("web"))))
    assert isinstance(allowed, Target) and allowed.pick.endpoint.pending == 1
    # Forwarded by a trusted gateway, the caller is what the policy judges.
    forwarded = exports.choose(route(exports.route(WEST, header("web", caller=OTHER))))
    assert isinstance(forwarded, Target)
    assert isinstance(exports.choose(route(exports.route(WEST, header("web", caller=CALLER)))),
                      Refused)


def test_a_relayed_connection_is_rechecked_against_what_changed(exports: Exports) -> None:
    changes: list[int] = []
    exports.subscribe(lambda: changes.append(1))
    target = exports.choose(route(exports.route(CALLER, header("web"))))
    assert isinstance(target, Target)
    endpoint = target.pick.endpoint.spec
    assert exports.recheck(CALLER, header("web"), endpoint) is None
    # A policy that leaves the caller out, then the Service unexported: each is a reason.
    admit_only_other(exports)
    assert refused(exports.recheck(CALLER, header("web"), endpoint)).reason is \
        Reason.UNAUTHORIZED
    assert exports.recheck(OTHER, header("web"), endpoint) is None
    exports.service_event(ADDED, service("web", {}))
    assert refused(exports.recheck(OTHER, header("web"), endpoint)).reason is \
        Reason.NOT_EXPORTED
    assert len(changes) == 4  # every event (three policy resources, a Service) told it


def test_the_default_policy_decides_ports_no_server_selects() -> None:
    e = Exports(GATEWAY, default_policy=AccessPolicy.DENY)
    e.service_event(ADDED, service("web", EXPORTED))
    e.pod_event(ADDED, pod("web-1", "web"))
    e.slice_event(ADDED, endpoint_slice("web", {"web-1": "10.244.0.5"}))
    denied = refused(e.choose(route(e.route(CALLER, header("web")))))
    assert denied.reason is Reason.UNAUTHORIZED and "default policy deny" in denied.detail


def test_a_deleted_service_is_forgotten(exports: Exports) -> None:
    r = route(exports.route(CALLER, header("web")))
    exports.service_event(DELETED, service("web", EXPORTED))
    assert refused(exports.route(CALLER, header("web"))).reason is Reason.UNKNOWN_SERVICE
    assert refused(exports.choose(r)).reason is Reason.NO_ENDPOINTS


# -- configuration ----------------------------------------------------------------------


def _identity(tmp_path: Path) -> dict[str, str]:
    return {"name": str(GATEWAY), "trustBundle": str(tmp_path / "bundle.pem"),
            "certFile": str(tmp_path / "tls.crt"), "keyFile": str(tmp_path / "tls.key")}


def test_gateway_config_defaults(tmp_path: Path) -> None:
    cfg = convert({"identity": _identity(tmp_path),
                                        "kubeconfig": "/k"}, GatewayConfig)
    assert (cfg.listen, cfg.admin) == ("0.0.0.0:4143", "0.0.0.0:4191")
    assert cfg.exported_label == "mirror.meshgate.io/exported=true"
    assert cfg.cluster_domain == "cluster.local" and cfg.trusted_gateways == []


@pytest.mark.parametrize(("field", "value", "where"), [
    ("trustedGateways", ["*"], "trustedGateways[0]"),
    ("trustedGateways", [WEST, "web.default.svc"], "trustedGateways[1]"),
    ("exportedLabel", "exported", "exportedLabel"),
    ("listen", "4143", "listen"),
    ("clusterDomain", "Cluster.Local", "clusterDomain"),
    ("headerTimeout", "soon", "headerTimeout"),
    ("extra", 1, "extra"),
])
def test_gateway_config_errors_name_the_field(tmp_path: Path, field: str, value: Any,
                                              where: str) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"identity": _identity(tmp_path), "kubeconfig": "/k",
                                    field: value}))
    with pytest.raises(ConfigError, match=re.escape(f"{where}: ")):
        load_model(path, GatewayConfig, what="gateway config")


def test_inbound_trusted_gateways_take_names_and_suffixes() -> None:
    cfg = convert({"trustedGateways": [
        WEST, "*.multicluster.serviceaccount.identity.meshgate.cluster.local"]}, InboundConfig)
    assert len(cfg.trusted_gateways) == 2
    with pytest.raises(ValueError, match="trustedGateways"):
        convert({"trustedGateways": ["*"]}, InboundConfig)


def test_gateway_run_refuses_a_bad_config(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("identity: {name: x}\nlisten: nowhere\n")
    assert main(["gateway", "run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "gateway config" in err and "listen:" in err and "kubeconfig:" in err
    assert "identity.trustBundle:" in err
