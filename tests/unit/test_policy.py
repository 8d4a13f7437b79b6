"""Authorization policy: which clients a pod port admits, from Server,
MeshTLSAuthentication and AuthorizationPolicy objects as the API returns them."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localcluster.crd import validate_crd
from mesh.authz import (
    AccessPolicy,
    Authorization,
    Decision,
    PortPolicy,
    ProxyProtocol,
    Requirement,
    identity_matches,
)
from mesh.control.crds import crd_documents
from mesh.control.policy import (
    _PORT_NAME,
    ADDED,
    AUTHORIZATION_POLICY,
    DELETED,
    GROUP,
    MESH_TLS_AUTHENTICATION,
    MODIFIED,
    SERVER,
    PolicyIndex,
    Workload,
)
from mesh.errors import ProtocolError

TD = "cluster.local"
SUFFIX = f"serviceaccount.identity.meshgate.{TD}"


def sa(name: str, ns: str = "default") -> str:
    return f"{name}.{ns}.{SUFFIX}"


WEB = {"app": "web"}
CLIENT = sa("web-client")


def meta(name: str, ns: str, created: str = "2024-01-01T00:00:00Z") -> dict[str, Any]:
    return {"name": name, "namespace": ns, "creationTimestamp": created,
            "resourceVersion": "1"}


def server(name: str, port: int | str = 8080, *, ns: str = "default",
           labels: dict[str, str] | None = None, expressions: list[dict[str, Any]] | None = None,
           created: str = "2024-01-01T00:00:00Z", **spec: Any) -> dict[str, Any]:
    selector: dict[str, Any] = {"matchLabels": WEB if labels is None else labels}
    if expressions is not None:
        selector["matchExpressions"] = expressions
    return {"apiVersion": f"{GROUP}/v1alpha1", "kind": SERVER,
            "metadata": meta(name, ns, created),
            "spec": {"podSelector": selector, "port": port, **spec}}


def authn(name: str, *, ns: str = "default", identities: list[str] | None = None,
          refs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if identities is not None:
        spec["identities"] = identities
    if refs is not None:
        spec["identityRefs"] = refs
    return {"kind": MESH_TLS_AUTHENTICATION, "metadata": meta(name, ns), "spec": spec}


def mtls(name: str, ns: str | None = None) -> dict[str, Any]:
    ref = {"group": GROUP, "kind": MESH_TLS_AUTHENTICATION, "name": name}
    return ref if ns is None else {**ref, "namespace": ns}


def policy(name: str, target: str, *refs: dict[str, Any], ns: str = "default",
           target_kind: str = "Server") -> dict[str, Any]:
    target_ref = {"kind": target_kind, "name": target}
    if target_kind == "Server":
        target_ref["group"] = GROUP
    return {"kind": AUTHORIZATION_POLICY, "metadata": meta(name, ns),
            "spec": {"targetRef": target_ref, "requiredAuthenticationRefs": list(refs)}}


def index(*objs: dict[str, Any], **kwargs: Any) -> PolicyIndex:
    idx = PolicyIndex(TD, **kwargs)
    for obj in objs:
        idx.apply(obj["kind"], ADDED, obj)
    assert idx.invalid == []
    return idx


def allowed(p: PortPolicy, identity: str | None) -> bool:
    return p.allows(identity).allowed


# ---------------------------------------------------------------- defaults


@pytest.mark.parametrize(("default", "meshed", "unmeshed"), [
    (AccessPolicy.ALL_AUTHENTICATED, True, False),
    (AccessPolicy.ALL_UNAUTHENTICATED, True, True),
    (AccessPolicy.DENY, False, False),
])
def test_ports_without_server_follow_the_default(default: AccessPolicy, meshed: bool,
                                                 unmeshed: bool) -> None:
    p = index(default_policy=default).for_port("default", WEB, 8080)
    assert p == PortPolicy(port=8080, access=default)
    assert allowed(p, CLIENT) is meshed
    assert allowed(p, None) is unmeshed
    assert allowed(p, "") is unmeshed


def test_the_default_default_is_all_authenticated() -> None:
    p = PolicyIndex(TD).for_port("default", {}, 80)
    assert p.allows(None) == Decision(False, "denied: no Server selects port 80; the default "
                                             "policy all-authenticated refuses an "
                                             "unauthenticated client")
    assert p.allows(CLIENT) == Decision(True, "allowed: no Server selects port 80; the default "
                                              f"policy all-authenticated admits {CLIENT}")


# ---------------------------------------------------------------- servers


def test_server_without_authorization_denies_everyone() -> None:
    idx = index(server("web-http", proxyProtocol="HTTP/1"),
                default_policy=AccessPolicy.ALL_UNAUTHENTICATED)
    p = idx.for_port("default", {"app": "web", "extra": "x"}, 8080)
    assert p.server == "default/web-http" and p.protocol is ProxyProtocol.HTTP1
    assert p.access is AccessPolicy.DENY and p.authorizations == ()
    decision = p.allows(CLIENT)
    assert not decision.allowed
    assert decision.reason == (f"denied: no AuthorizationPolicy on Server default/web-http "
                               f"authorizes {CLIENT} (policies: the Server has none; "
                               "accessPolicy deny)")
    assert not allowed(p, None)
    # Other ports and other pods are not the Server's.
    assert idx.for_port("default", WEB, 9090).server is None
    assert idx.for_port("default", {"app": "api"}, 8080).server is None
    assert idx.for_port("other", WEB, 8080).server is None


@pytest.mark.parametrize(("access", "meshed", "unmeshed"), [
    ("all-authenticated", True, False), ("all-unauthenticated", True, True), ("deny", False, False),
])
def test_server_access_policy_decides_what_no_policy_authorizes(access: str, meshed: bool,
                                                                unmeshed: bool) -> None:
    p = index(server("web-http", accessPolicy=access)).for_port("default", WEB, 8080)
    assert allowed(p, CLIENT) is meshed and allowed(p, None) is unmeshed
    if meshed:
        assert p.allows(CLIENT).reason == (
            f"allowed: no AuthorizationPolicy on Server default/web-http authorizes {CLIENT}, "
            f"but its accessPolicy {access} admits it")


def test_authorization_policy_on_server() -> None:
    idx = index(server("web-http"), authn("clients", identities=[CLIENT]),
                policy("web-allow", "web-http", mtls("clients")))
    p = idx.for_port("default", WEB, 8080)
    assert p.identities == {CLIENT}
    assert p.allows(CLIENT) == Decision(True, "allowed: AuthorizationPolicy default/web-allow "
                                              f"on Server default/web-http authorizes {CLIENT}")
    other = sa("intruder")
    assert p.allows(other) == Decision(False, "denied: no AuthorizationPolicy on Server "
                                              f"default/web-http authorizes {other} (policies: "
                                              "default/web-allow; accessPolicy deny)")
    assert not allowed(p, None)


def test_policy_for_another_server_does_not_apply() -> None:
    idx = index(server("web-http"), server("admin", 9990), authn("clients", identities=["*"]),
                policy("admin-allow", "admin", mtls("clients")))
    assert not allowed(idx.for_port("default", WEB, 8080), CLIENT)
    assert allowed(idx.for_port("default", WEB, 9990), CLIENT)


def test_namespace_policy_applies_to_every_server_of_the_namespace() -> None:
    idx = index(server("web-http"), server("web-admin", 9990), server("web-http", ns="prod"),
                authn("clients", identities=[CLIENT]),
                policy("everything", "default", mtls("clients"), target_kind="Namespace"))
    for port in (8080, 9990):
        p = idx.for_port("default", WEB, port)
        assert p.allows(CLIENT).reason.startswith("allowed: AuthorizationPolicy "
                                                  "default/everything on Server default/web-")
    assert not allowed(idx.for_port("prod", WEB, 8080), CLIENT)
    # It does not touch ports that no Server selects: those keep the default.
    assert idx.for_port("default", WEB, 7000).allows(None).reason.startswith(
        "denied: no Server selects port 7000")


def test_namespace_target_must_be_the_policys_own_namespace() -> None:
    idx = index(server("web-http"), authn("clients", identities=["*"]))
    assert idx.apply(AUTHORIZATION_POLICY, ADDED,
                     policy("elsewhere", "prod", mtls("clients"),
                            target_kind="Namespace")) == set()
    [bad] = idx.invalid
    assert bad.reasons == ('spec.targetRef.name: a Namespace target must be the policy\'s own '
                           'namespace default (got "prod")',)
    assert not allowed(idx.for_port("default", WEB, 8080), CLIENT)


# ---------------------------------------------------------------- identities


@pytest.mark.parametrize(("pattern", "identity", "matches"), [
    ("*", sa("anyone", "anywhere"), True),
    (f"*.default.{SUFFIX}", sa("web"), True),
    (f"*.default.{SUFFIX}", sa("web", "prod"), False),
    (f"*.default.{SUFFIX}", f"default.{SUFFIX}", False),
    (f"*.default.{SUFFIX}", f".default.{SUFFIX}", False),
    (f"*.{TD}", sa("web", "prod"), True),
    (sa("web"), sa("web"), True),
    (sa("web"), sa("web2"), False),
    (sa("web"), "x" + sa("web"), False),
])
def test_identity_patterns(pattern: str, identity: str, matches: bool) -> None:
    assert identity_matches(pattern, identity) is matches


def test_wildcard_identities_never_admit_unauthenticated_clients() -> None:
    idx = index(server("web-http"), authn("any", identities=["*"]),
                policy("allow", "web-http", mtls("any")))
    p = idx.for_port("default", WEB, 8080)
    assert allowed(p, sa("x", "y"))
    assert not allowed(p, None)


def test_suffix_wildcard_admits_one_namespace() -> None:
    idx = index(server("web-http"), authn("ns", identities=[f"*.prod.{SUFFIX}"]),
                policy("allow", "web-http", mtls("ns")))
    p = idx.for_port("default", WEB, 8080)
    assert allowed(p, sa("a", "prod")) and allowed(p, sa("b", "prod"))
    assert not allowed(p, sa("a", "default"))


def test_identity_refs_become_identity_names() -> None:
    idx = index(server("web-http"),
                authn("refs", refs=[
                    {"kind": "ServiceAccount", "name": "web-client"},
                    {"kind": "ServiceAccount", "name": "batch", "namespace": "jobs"},
                    {"kind": "ServiceAccount", "namespace": "ops"},
                    {"kind": "Namespace", "name": "monitoring"}]),
                policy("allow", "web-http", mtls("refs")))
    p = idx.for_port("default", WEB, 8080)
    assert p.identities == {CLIENT, sa("batch", "jobs"), f"*.ops.{SUFFIX}",
                            f"*.monitoring.{SUFFIX}"}
    assert allowed(p, CLIENT) and allowed(p, sa("batch", "jobs"))
    assert allowed(p, sa("anything", "ops")) and allowed(p, sa("prometheus", "monitoring"))
    assert not allowed(p, sa("web-client", "jobs"))


def test_identity_refs_use_the_trust_domain_and_control_namespace() -> None:
    idx = PolicyIndex("east.example", control_ns="mesh-system")
    idx.apply(SERVER, ADDED, server("web-http"))
    idx.apply(MESH_TLS_AUTHENTICATION, ADDED,
              authn("refs", refs=[{"kind": "ServiceAccount", "name": "web-client"}]))
    idx.apply(AUTHORIZATION_POLICY, ADDED, policy("allow", "web-http", mtls("refs")))
    p = idx.for_port("default", WEB, 8080)
    assert p.identities == {"web-client.default.serviceaccount.identity.mesh-system.east.example"}


def test_service_account_as_required_authentication() -> None:
    idx = index(server("web-http"),
                policy("allow", "web-http", {"kind": "ServiceAccount", "name": "web-client"},
                       ns="default"))
    p = idx.for_port("default", WEB, 8080)
    assert p.authorizations == (Authorization("default/allow", (
        Requirement("ServiceAccount default/web-client", (CLIENT,)),)),)
    assert allowed(p, CLIENT) and not allowed(p, sa("other"))


def test_every_required_authentication_must_hold() -> None:
    idx = index(server("web-http"), authn("in-default", identities=[f"*.default.{SUFFIX}"]),
                authn("clients", identities=[CLIENT, sa("client", "prod")]),
                policy("both", "web-http", mtls("in-default"), mtls("clients")))
    p = idx.for_port("default", WEB, 8080)
    assert allowed(p, CLIENT)
    assert not allowed(p, sa("client", "prod"))  # not in default
    assert not allowed(p, sa("other"))  # not a client


def test_no_required_authentication_authorizes_every_client() -> None:
    idx = index(server("web-http"), policy("open", "web-http"))
    p = idx.for_port("default", WEB, 8080)
    assert p.allows(None) == Decision(True, "allowed: AuthorizationPolicy default/open on "
                                            "Server default/web-http authorizes an "
                                            "unauthenticated client")


def test_missing_authentication_authorizes_no_one_until_it_appears() -> None:
    idx = index(server("web-http"), policy("allow", "web-http", mtls("clients", "shared"),
                                           ns="default"))
    assert not allowed(idx.for_port("default", WEB, 8080), CLIENT)
    assert idx.problems() == [
        "AuthorizationPolicy default/allow: spec.requiredAuthenticationRefs[0]: "
        "MeshTLSAuthentication shared/clients does not exist or is invalid, so the policy "
        "authorizes no one"]
    # The authentication lives in another namespace; the policy's namespace is affected.
    assert idx.apply(MESH_TLS_AUTHENTICATION, ADDED,
                     authn("clients", ns="shared", identities=[CLIENT])) == {"default"}
    assert allowed(idx.for_port("default", WEB, 8080), CLIENT)
    assert idx.problems() == []
    assert idx.apply(MESH_TLS_AUTHENTICATION, DELETED, authn("clients", ns="shared")) == {
        "default"}
    assert not allowed(idx.for_port("default", WEB, 8080), CLIENT)


def test_policy_for_a_missing_server_is_a_problem() -> None:
    idx = index(policy("allow", "nowhere"))
    assert idx.problems() == ["AuthorizationPolicy default/allow: spec.targetRef: Server "
                              "default/nowhere does not exist, so the policy has no effect"]


# ---------------------------------------------------------------- selection


def test_conflicting_servers_oldest_wins_and_the_conflict_is_reported() -> None:
    idx = index(server("young", created="2024-03-01T00:00:00Z", accessPolicy="all-authenticated"),
                server("old", "http", created="2024-01-01T00:00:00Z"),
                server("also-old", created="2024-01-01T00:00:00Z"),
                server("other-port", 9090, created="2023-01-01T00:00:00Z"))
    p = idx.for_port("default", WEB, 8080, port_names={"http": 8080})
    assert p.server == "default/also-old"  # same age as "old": the name decides
    assert p.conflicts == ("default/old", "default/young")
    assert not allowed(p, CLIENT)
    idx.apply(SERVER, DELETED, server("also-old"))
    idx.apply(SERVER, DELETED, server("old"))
    p = idx.for_port("default", WEB, 8080, port_names={"http": 8080})
    assert (p.server, p.conflicts) == ("default/young", ())
    assert allowed(p, CLIENT)


def vm_server(name: str, port: int | str = 8080, **spec: Any) -> dict[str, Any]:
    obj = server(name, port, **spec)
    obj["spec"]["externalWorkloadSelector"] = obj["spec"].pop("podSelector")
    return obj


def test_a_server_selects_pods_or_external_workloads_never_both() -> None:
    idx = index(server("pods", accessPolicy="all-unauthenticated"),
                vm_server("vms", "http"), policy("vm-clients", "vms", mtls("clients")),
                authn("clients", identities=[CLIENT]))
    on_pod = idx.for_port("default", WEB, 8080, port_names={"http": 8080})
    on_vm = idx.for_port("default", WEB, 8080, port_names={"http": 8080},
                         kind=Workload.EXTERNAL)
    assert (on_pod.server, on_vm.server) == ("default/pods", "default/vms")
    assert allowed(on_pod, None) and not allowed(on_vm, None)
    assert allowed(on_vm, CLIENT) and not allowed(on_vm, sa("other"))
    # A VM's named ports are its spec.ports: without the name, no Server selects it.
    assert idx.for_port("default", WEB, 8080, kind=Workload.EXTERNAL).server is None
    assert [p.server for p in idx.pod_policies("default", WEB, port_names={"http": 8080},
                                               kind=Workload.EXTERNAL)] == ["default/vms"]
    assert [p.server for p in idx.pod_policies("default", WEB)] == ["default/pods"]


@pytest.mark.parametrize("selectors", [{}, {"podSelector": {}, "externalWorkloadSelector": {}}],
                         ids=["neither", "both"])
def test_a_server_needs_exactly_one_selector(selectors: dict[str, Any]) -> None:
    idx = PolicyIndex(TD)
    obj = {"kind": SERVER, "metadata": meta("odd", "default"),
           "spec": {"port": 8080, **selectors}}
    idx.apply(SERVER, ADDED, obj)
    [bad] = idx.invalid
    assert "exactly one of podSelector and externalWorkloadSelector" in str(bad)


def test_named_ports_match_through_the_pods_port_names() -> None:
    idx = index(server("web-http", "http"))
    assert idx.for_port("default", WEB, 8080, port_names={"http": 8080}).server == \
        "default/web-http"
    assert idx.for_port("default", WEB, 8080, port_names={"http": 9090}).server is None
    assert idx.for_port("default", WEB, 8080, port_names={"admin": 8080}).server is None
    assert idx.for_port("default", WEB, 8080).server is None


@pytest.mark.parametrize(("expressions", "labels", "selected"), [
    ([{"key": "tier", "operator": "In", "values": ["front", "edge"]}], {"tier": "edge"}, True),
    ([{"key": "tier", "operator": "In", "values": ["front"]}], {"tier": "back"}, False),
    ([{"key": "tier", "operator": "In", "values": ["front"]}], {}, False),
    ([{"key": "env", "operator": "NotIn", "values": ["dev"]}], {"env": "prod"}, True),
    ([{"key": "env", "operator": "NotIn", "values": ["dev"]}], {}, True),
    ([{"key": "env", "operator": "NotIn", "values": ["dev"]}], {"env": "dev"}, False),
    ([{"key": "canary", "operator": "Exists"}], {"canary": ""}, True),
    ([{"key": "canary", "operator": "Exists"}], {}, False),
    ([{"key": "canary", "operator": "DoesNotExist"}], {}, True),
    ([{"key": "canary", "operator": "DoesNotExist"}], {"canary": "1"}, False),
    ([{"key": "tier", "operator": "In", "values": ["front"]},
      {"key": "canary", "operator": "DoesNotExist"}], {"tier": "front", "canary": "1"}, False),
])
def test_label_expressions(expressions: list[dict[str, Any]], labels: dict[str, str],
                           selected: bool) -> None:
    idx = index(server("s", labels={}, expressions=expressions))
    assert (idx.for_port("default", labels, 8080).server is not None) is selected


def test_match_labels_and_expressions_are_anded_and_empty_selects_all() -> None:
    idx = index(server("s", expressions=[{"key": "env", "operator": "In", "values": ["prod"]}]))
    assert idx.for_port("default", {"app": "web", "env": "prod"}, 8080).server == "default/s"
    assert idx.for_port("default", {"app": "web", "env": "dev"}, 8080).server is None
    assert idx.for_port("default", {"env": "prod"}, 8080).server is None
    every = index(server("all", labels={}))
    assert every.for_port("default", {}, 8080).server == "default/all"


# ---------------------------------------------------------------- invalid resources


def _with(obj: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {**obj, "spec": {**obj["spec"], **spec}}


@pytest.mark.parametrize(("obj", "reason"), [
    (server("s", 70000), "spec.port: must be a port number from 1 to 65535, got 70000"),
    (server("s", 0), "spec.port: must be a port number from 1 to 65535, got 0"),
    (server("s", "80"), "spec.port: must be a port name of at most 15"),
    (server("s", "Http"), "spec.port: must be a port name"),
    (server("s", "a-very-long-port-name"), "spec.port: must be a port name"),
    (server("s", True), "spec.port: expected an integer or a string, got true"),
    (server("s", proxyProtocol="HTTP/3"),
     "spec.proxyProtocol: expected one of 'unknown', 'HTTP/1', 'HTTP/2', 'gRPC', 'opaque', "
     "'TLS', got 'HTTP/3'"),
    (server("s", accessPolicy="open"), "spec.accessPolicy: expected one of 'deny', "),
    (server("s", expressions=[{"key": "a", "operator": "In"}]),
     "spec.podSelector.matchExpressions[0].values: must not be empty when operator is In"),
    (server("s", expressions=[{"key": "a", "operator": "Exists", "values": ["x"]}]),
     "spec.podSelector.matchExpressions[0].values: must be empty when operator is Exists"),
    (server("s", expressions=[{"key": "a", "operator": "Gt", "values": ["1"]}]),
     "spec.podSelector.matchExpressions[0].operator: expected one of"),
    ({**server("s"), "spec": None}, "spec: required"),
    ({"kind": SERVER, "metadata": {"namespace": "default"}, "spec": {}},
     "metadata.name: required"),
    (_with(server("s"), podSelector=None),
     "spec: give exactly one of podSelector and externalWorkloadSelector"),
    (authn("a"), "spec: identities or identityRefs must name at least one identity"),
    (authn("a", identities=[], refs=[]),
     "spec: identities or identityRefs must name at least one identity"),
    (authn("a", identities=["Web.default"]), "spec.identities[0]: must be an identity name"),
    (authn("a", identities=["web.*.cluster.local"]), "spec.identities[0]: must be an identity"),
    (authn("a", refs=[{"kind": "ServiceAccount", "name": "Bad_Name"}]),
     "spec.identityRefs[0]: service account 'Bad_Name' must be a lowercase DNS label"),
    (authn("a", refs=[{"kind": "Namespace"}]),
     "spec.identityRefs[0].name: required when kind is Namespace"),
    (authn("a", refs=[{"kind": "Pod", "name": "x"}]), "spec.identityRefs[0].kind: expected"),
    ({**policy("p", "web"), "spec": {"requiredAuthenticationRefs": []}},
     "spec.targetRef: required field is missing"),
    (policy("p", "web", {"kind": "NetworkAuthentication", "name": "x"}),
     "spec.requiredAuthenticationRefs[0].kind: expected 'MeshTLSAuthentication' or "
     "'ServiceAccount', got 'NetworkAuthentication'"),
    (policy("p", "web", {"group": GROUP, "kind": "ServiceAccount", "name": "x"}),
     "spec.requiredAuthenticationRefs[0].group: must be empty when kind is ServiceAccount"),
    (policy("p", "web", {"kind": "ServiceAccount", "name": "x", "namespace": "Bad"}),
     "namespace 'Bad' must be a lowercase DNS label"),
    ({**policy("p", "default", target_kind="Namespace"),
      "spec": {"targetRef": {"group": GROUP, "kind": "Namespace", "name": "default"},
               "requiredAuthenticationRefs": []}},
     "spec.targetRef.group: must be empty when kind is Namespace"),
])
def test_invalid_resources_are_reported_not_raised(obj: dict[str, Any], reason: str) -> None:
    idx = PolicyIndex(TD, default_policy=AccessPolicy.DENY)
    assert idx.apply(obj["kind"], ADDED, obj) == set()
    [invalid] = idx.invalid
    assert invalid.kind == obj["kind"]
    assert any(r.startswith(reason) for r in invalid.reasons), invalid.reasons
    assert "\n" not in str(invalid)
    assert str(invalid) in idx.problems()
    assert idx.for_port("default", WEB, 8080) == PortPolicy(port=8080, access=AccessPolicy.DENY)


def test_an_invalid_update_removes_the_resource_and_a_fix_restores_it() -> None:
    idx = index(server("web-http", accessPolicy="all-authenticated"))
    assert allowed(idx.for_port("default", WEB, 8080), CLIENT)
    assert idx.apply(SERVER, MODIFIED, server("web-http", 70000)) == {"default"}
    assert [i.name for i in idx.invalid] == ["web-http"]
    assert idx.for_port("default", WEB, 8080).server is None
    assert idx.apply(SERVER, MODIFIED, server("web-http")) == {"default"}
    assert idx.invalid == []
    idx.apply(SERVER, MODIFIED, server("web-http", 70000))
    assert idx.apply(SERVER, DELETED, server("web-http", 70000)) == set()
    assert idx.invalid == []


def test_nulls_are_dropped_as_kube_drops_them() -> None:
    idx = index(server("web-http", proxyProtocol=None, accessPolicy=None))
    p = idx.for_port("default", WEB, 8080)
    assert (p.protocol, p.access) == (ProxyProtocol.UNKNOWN, AccessPolicy.DENY)


# ---------------------------------------------------------------- changes


def test_apply_returns_the_namespaces_whose_policies_changed() -> None:
    idx = PolicyIndex(TD)
    assert idx.apply(SERVER, ADDED, server("web-http", ns="prod")) == {"prod"}
    # A new resourceVersion or a status change alone changes no decision.
    same = server("web-http", ns="prod")
    same["metadata"]["resourceVersion"] = "2"
    same["status"] = {"conditions": [{"type": "Accepted", "status": "True"}]}
    assert idx.apply(SERVER, MODIFIED, same) == set()
    assert idx.apply(SERVER, MODIFIED, server("web-http", 9090, ns="prod")) == {"prod"}
    # An authentication no policy uses affects no proxy.
    assert idx.apply(MESH_TLS_AUTHENTICATION, ADDED,
                     authn("clients", ns="prod", identities=["*"])) == set()
    assert idx.apply(AUTHORIZATION_POLICY, ADDED,
                     policy("allow", "web-http", mtls("clients"), ns="prod")) == {"prod"}
    assert idx.apply(AUTHORIZATION_POLICY, ADDED,
                     policy("allow", "web-http", mtls("clients", "prod"),
                            ns="staging")) == {"staging"}
    assert idx.apply(MESH_TLS_AUTHENTICATION, MODIFIED,
                     authn("clients", ns="prod", identities=[CLIENT])) == {"prod", "staging"}
    assert idx.apply(SERVER, DELETED, server("web-http", ns="prod")) == {"prod"}
    assert idx.apply(SERVER, DELETED, server("never-seen", ns="prod")) == set()


def test_programming_errors_raise() -> None:
    idx = PolicyIndex(TD)
    with pytest.raises(ValueError, match="ServiceAccount"):
        idx.apply("ServiceAccount", ADDED, {})
    with pytest.raises(ValueError, match="BOOKMARK"):
        idx.apply(SERVER, "BOOKMARK", server("s"))


# ---------------------------------------------------------------- the JSON form


def test_json_form() -> None:
    idx = index(server("web-http", "http", proxyProtocol="gRPC"),
                server("younger", created="2025-01-01T00:00:00Z"),
                authn("clients", identities=[CLIENT]), policy("allow", "web-http", mtls("clients")))
    p = idx.for_port("default", WEB, 8080, port_names={"http": 8080})
    assert json.loads(p.to_json()) == {
        "v": 1, "port": 8080, "server": "default/web-http", "protocol": "gRPC", "access": "deny",
        "authorizations": [{"policy": "default/allow", "require": [
            {"ref": "MeshTLSAuthentication default/clients", "identities": [CLIENT]}]}],
        "conflicts": ["default/younger"]}
    assert '": ' not in p.to_json() and '", ' not in p.to_json()  # compact
    assert PortPolicy.from_json(p.to_json()) == p
    assert PortPolicy.from_json(p.to_json().encode()) == p


def test_from_json_ignores_fields_it_does_not_know() -> None:
    wire = json.loads(PortPolicy(port=80, access=AccessPolicy.DENY).to_json())
    wire["routes"] = [{"path": "/"}]
    assert PortPolicy.from_json(json.dumps(wire)) == PortPolicy(port=80)


@pytest.mark.parametrize(("data", "message"), [
    ("not json", "malformed"),
    ('{"v":2,"port":80,"server":null,"protocol":"unknown","access":"deny"}', "v: expected 1"),
    ('{"v":1,"port":80,"server":null,"protocol":"unknown","access":"maybe"}', "access:"),
    ('{"v":1,"port":80,"server":null,"protocol":"unknown","access":"deny",'
     '"authorizations":[{"policy":"p"}]}', "authorizations[0].require: required field is missing"),
])
def test_from_json_refuses_malformed_policies(data: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message.replace("[", r"\[").replace("]", r"\]")):
        PortPolicy.from_json(data)


_NAMES = st.sampled_from(["web", "api", "web-client", "a"])
_NAMESPACES = st.sampled_from(["default", "prod"])
_IDENTITIES = st.builds(sa, _NAMES, _NAMESPACES)
_PATTERNS = st.one_of(_IDENTITIES, st.just("*"), st.just(f"*.{TD}"),
                      st.builds(lambda ns: f"*.{ns}.{SUFFIX}", _NAMESPACES))
_REQUIREMENTS = st.builds(Requirement, st.text(max_size=20),
                          st.lists(_PATTERNS, max_size=3).map(tuple))
_AUTHORIZATIONS = st.builds(Authorization, st.text(max_size=20),
                            st.lists(_REQUIREMENTS, max_size=3).map(tuple))
_POLICIES = st.builds(
    PortPolicy, port=st.integers(1, 65535),
    server=st.one_of(st.none(), st.text(min_size=1, max_size=20)),
    protocol=st.sampled_from(ProxyProtocol), access=st.sampled_from(AccessPolicy),
    authorizations=st.lists(_AUTHORIZATIONS, max_size=3).map(tuple),
    conflicts=st.lists(st.text(max_size=10), max_size=2).map(tuple))


@settings(max_examples=300, deadline=None)
@given(_POLICIES, st.one_of(st.none(), st.just(""), _IDENTITIES, st.text(max_size=40)))
def test_from_json_rebuilds_the_same_decisions(p: PortPolicy, identity: str | None) -> None:
    back = PortPolicy.from_json(p.to_json())
    assert back.allows(identity) == p.allows(identity)
    assert back == p


# ---------------------------------------------------------------- the CRDs


def test_crds_are_structural_and_name_the_three_kinds() -> None:
    docs = crd_documents("policy")
    assert [d["spec"]["names"]["kind"] for d in docs] == [
        SERVER, MESH_TLS_AUTHENTICATION, AUTHORIZATION_POLICY]
    for doc in docs:
        assert doc["spec"]["group"] == GROUP
        assert validate_crd(doc) == []
        [version] = doc["spec"]["versions"]
        assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}


def test_crd_enums_match_the_evaluation() -> None:
    server_crd = crd_documents("policy")[0]
    spec = server_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    props = spec["properties"]
    assert props["proxyProtocol"]["enum"] == [str(p) for p in ProxyProtocol]
    assert props["accessPolicy"]["enum"] == [str(a) for a in AccessPolicy]
    assert props["port"]["pattern"] == _PORT_NAME.pattern


def test_reading_a_port_policy_does_not_load_the_kubernetes_client() -> None:
    code = ("import sys, mesh.authz as p; "
            "p.PortPolicy.from_json(p.PortPolicy(port=80).to_json()); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'kubernetes'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"
