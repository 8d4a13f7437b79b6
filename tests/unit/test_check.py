"""`meshgate check`'s decisions over objects as read, with no API server: the
pre-install checks, the control plane's, the identity's at a given time, the
injector's, the data plane's, and what is printed (linkerd check's table and JSON)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mesh.check import control, dataplane, pre, render
from mesh.check.names import INSTALL_FIX
from mesh.check.pre import Access
from mesh.check.results import Category, Got, Result, Status, run, succeeded
from mesh.identity import ca
from mesh.identity.bundle import TrustBundle
from mesh.image import VERSION, reference

Obj = dict[str, Any]
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
SERVED = frozenset({"v1", "apps/v1", "admissionregistration.k8s.io/v1", "policy/v1",
                    "rbac.authorization.k8s.io/v1", "apiextensions.k8s.io/v1"})


def by_description(results: list[Result]) -> dict[str, Result]:
    return {r.description: r for r in results}


# -- pre ---------------------------------------------------------------------------------

def test_every_rendered_kind_is_asked_for_once_per_namespace() -> None:
    asked = pre.required_access(pre.rendered())
    kinds = [kind for kind, _ in asked]
    assert kinds == ["CustomResourceDefinition", "Namespace", "ServiceAccount", "ClusterRole",
                     "ClusterRoleBinding", "Role", "RoleBinding", "ConfigMap", "Deployment",
                     "Service", "MutatingWebhookConfiguration", "PodDisruptionBudget",
                     "Secret"]
    access = dict(asked)
    assert access["CustomResourceDefinition"] == Access(
        "create", "apiextensions.k8s.io", "customresourcedefinitions")
    assert access["Deployment"] == Access("create", "apps", "deployments", "meshgate")
    assert access["PodDisruptionBudget"].describe() == (
        "create poddisruptionbudgets.policy in namespace meshgate")
    assert access["ClusterRole"].describe() == (
        "create clusterroles.rbac.authorization.k8s.io cluster-wide")


@pytest.mark.parametrize(("kind", "resource"), [
    ("Namespace", "namespaces"), ("Policy", "policies"), ("Gateway", "gateways"),
    ("NetworkPolicy", "networkpolicies"), ("Ingress", "ingresses")])
def test_resource_of_kind(kind: str, resource: str) -> None:
    assert pre.resource_of(kind) == resource


@pytest.mark.parametrize(("doc", "version"), [
    ({"major": "1", "minor": "32", "gitVersion": "v1.32.0"}, (1, 32)),
    ({"major": "1", "minor": "29+", "gitVersion": "v1.29.4-eks-1"}, (1, 29)),
    ({"major": "", "minor": "", "gitVersion": "v1.30.2"}, (1, 30)),
    ({"gitVersion": "unknown"}, None)])
def test_parse_version(doc: Obj, version: tuple[int, int] | None) -> None:
    assert pre.parse_version(doc) == version


ABSENT = Got(None)


def state(*, version: str = "31", denied: tuple[str, ...] = (), namespace: Got = ABSENT,
          served: frozenset[str] = SERVED, unanswered: str = "") -> pre.PreState:
    access = pre.required_access(pre.rendered())
    allowed: dict[Access, bool | str] = {
        a: (unanswered if kind == "Secret" and unanswered else kind not in denied)
        for kind, a in access}
    return pre.PreState(version={"major": "1", "minor": version,
                                 "gitVersion": f"v1.{version}.0"},
                        served=served, apis=pre.required_apis(pre.rendered()), access=access,
                        allowed=allowed, namespace=namespace)


def test_pre_passes_when_everything_is_allowed() -> None:
    results = list(pre.checks(state()))
    assert succeeded(results)
    assert {r.status for r in results} == {Status.OK}


def test_pre_names_each_missing_permission() -> None:
    results = by_description(list(pre.checks(state(denied=("ClusterRole", "Deployment")))))
    assert not succeeded(list(results.values()))
    role = results["can create ClusterRoles"]
    assert role.status is Status.FAIL
    assert role.error == "not allowed to create clusterroles.rbac.authorization.k8s.io " \
                         "cluster-wide"
    assert results["can create Deployments"].error == (
        "not allowed to create deployments.apps in namespace meshgate")
    assert results["can create Secrets"].status is Status.OK


def test_the_rights_each_role_grants() -> None:
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "r", "namespace": "meshgate"},
            "rules": [{"apiGroups": ["", "apps"], "resources": ["pods", "pods/status"],
                       "verbs": ["get"]},
                      {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["update"],
                       "resourceNames": ["a", "b"]}]}
    assert [a.describe() for a in pre.role_access(role)] == [
        "get pods in namespace meshgate", "get pods/status in namespace meshgate",
        "get pods.apps in namespace meshgate", "get pods.apps/status in namespace meshgate",
        "update configmaps a in namespace meshgate", "update configmaps b in namespace meshgate"]
    assert pre.escalate_access(role) == Access("escalate", "rbac.authorization.k8s.io", "roles",
                                               "meshgate")
    assert pre.role_access(role)[1].attributes() == {
        "verb": "get", "group": "", "resource": "pods", "namespace": "meshgate",
        "subresource": "status"}


def test_granting_a_roles_rights_needs_holding_them_or_escalate() -> None:
    roles = pre.roles(pre.rendered())
    assert {r["kind"] for r in roles} == {"Role", "ClusterRole"}
    everything = {a: True for r in roles for a in pre.role_access(r)}
    assert pre.grant_check(roles, everything).status is Status.OK
    escalate = {pre.escalate_access(r): True for r in roles}
    assert pre.grant_check(roles, escalate).status is Status.OK
    injector = next(r for r in roles if r["metadata"]["name"] == "meshgate-injector")
    lacking = {**everything, **{a: False for a in pre.role_access(injector)}}
    result = pre.grant_check(roles, lacking)
    assert result.status is Status.FAIL
    assert result.error == ("ClusterRole meshgate-injector grants what you do not hold: "
                            "namespaces (get); servicecidrs.networking.k8s.io (list)")
    assert "escalate" in result.hint


def test_pre_says_which_review_got_no_answer() -> None:
    results = by_description(list(pre.checks(state(unanswered="503 Service Unavailable"))))
    assert results["can create Secrets"].error == (
        "no answer to whether you may create secrets in namespace meshgate: 503 Service "
        "Unavailable")


def test_pre_refuses_kubernetes_older_than_1_29() -> None:
    results = by_description(list(pre.checks(state(version="28"))))
    old = results["is running the minimum Kubernetes API version"]
    assert old.status is Status.FAIL
    assert old.error == "the cluster runs Kubernetes v1.28.0; meshgate needs 1.29 or newer " \
                        "(its proxy is a native sidecar)"


def test_pre_names_apis_not_served() -> None:
    results = by_description(list(pre.checks(state(
        served=SERVED - {"admissionregistration.k8s.io/v1"}))))
    assert results["serves the APIs meshgate uses"].error == (
        "the API server does not serve admissionregistration.k8s.io/v1")


def test_an_existing_namespace_only_warns() -> None:
    results = list(pre.checks(state(namespace=Got({"metadata": {"name": "meshgate"}}))))
    ns = by_description(results)["control plane namespace does not already exist"]
    assert ns.status is Status.WARN
    assert succeeded(results)
    forbidden = by_description(list(pre.checks(state(namespace=Got(error="403 Forbidden")))))
    assert forbidden["control plane namespace does not already exist"].status is Status.WARN


# -- control plane -------------------------------------------------------------------------

def crd(doc: Obj, *, established: bool = True) -> Got:
    return Got({**doc, "status": {"conditions": [
        {"type": "Established", "status": "True" if established else "False"}]}})


def deployment(name: str, *, available: int = 1, replicas: int = 1,
               image: str = reference()) -> Got:
    return Got({"metadata": {"name": name, "namespace": "meshgate"},
                "spec": {"replicas": replicas, "template": {"spec": {"containers": [
                    {"name": "c", "image": image}]}}},
                "status": {"availableReplicas": available, "conditions": [
                    {"type": "Available", "status": "True" if available >= replicas
                     else "False", "reason": "MinimumReplicasUnavailable"}]}})


def identity(*, issuer_lifetime: timedelta = timedelta(days=365),
             issued: datetime = NOW) -> tuple[Got, Got]:
    anchor = ca.new_anchor("cluster.local", lifetime=timedelta(days=3650),
                           now=issued - timedelta(days=1))
    issuer = ca.new_issuer(anchor, "cluster.local", lifetime=issuer_lifetime, now=issued)
    secret = Got({"data": {"tls.crt": base64.b64encode(ca.cert_pem(issuer.cert)).decode()}})
    roots = Got({"data": {"ca-bundle.crt": TrustBundle((anchor.cert,)).to_pem().decode()}})
    return secret, roots


def ca_bundle(*, lifetime: timedelta = timedelta(days=365), issued: datetime = NOW) -> str:
    cert = ca.new_anchor("cluster.local", lifetime=lifetime, now=issued).cert
    return base64.b64encode(ca.cert_pem(cert)).decode()


CA_BUNDLE = ca_bundle()


def injector(*, policy: str = "Ignore", ready: bool | None = True,
             service: str = "meshgate-injector", bundle: str = CA_BUNDLE
             ) -> tuple[Got, Got, Got]:
    webhook = Got({"webhooks": [{"name": "proxy-injector.meshgate.io", "failurePolicy": policy,
                                 "clientConfig": {"service": {"namespace": "meshgate",
                                                              "name": service},
                                                  "caBundle": bundle}}]})
    endpoints = [] if ready is None else [{"addresses": ["10.0.0.1"],
                                           "conditions": {"ready": ready}}]
    return webhook, Got({"metadata": {"name": "meshgate-injector"}}), Got(
        {"items": [{"endpoints": endpoints}]})


def answered(*, injected: bool = True) -> Got:
    """The dry-run probe Pod as the API server gives it back."""
    pod = control.probe_pod()
    if injected:
        pod["spec"]["initContainers"] = [{"name": "meshgate-init"},
                                         {"name": "meshgate-proxy", "restartPolicy": "Always"}]
    return Got(pod)


def control_state(**changes: Any) -> control.ControlState:
    expected = control.Expected.rendered()
    secret, roots = identity()
    webhook, service, slices = injector()
    fields: dict[str, Any] = {
        "crds": {d["metadata"]["name"]: crd(d) for d in expected.crds},
        "namespace": Got({"metadata": {"name": "meshgate"}}),
        "deployments": {d["metadata"]["name"]: deployment(d["metadata"]["name"])
                        for d in expected.deployments},
        "issuer": secret, "roots": roots, "webhook": webhook, "injector_service": service,
        "injector_slices": slices, "injector_answer": answered()}
    fields.update(changes)
    return control.ControlState(**fields)


def control_results(**changes: Any) -> dict[str, Result]:
    return by_description(list(run([lambda: control.checks(
        control_state(**changes), control.Expected.rendered(), now=NOW)])))


def test_a_healthy_install_passes() -> None:
    results = control_results()
    assert {r.status for r in results.values()} == {Status.OK}
    assert set(results) >= {"Deployment meshgate-control is available",
                            "Deployment meshgate-gateway is available",
                            "Deployment meshgate-mirror is available"}


def test_missing_and_unestablished_crds() -> None:
    expected = control.Expected.rendered()
    crds = {d["metadata"]["name"]: crd(d) for d in expected.crds}
    crds["links.multicluster.meshgate.io"] = Got(None)
    missing = control_results(crds=crds)["control plane CustomResourceDefinitions exist"]
    assert missing.error == "missing links.multicluster.meshgate.io"
    assert missing.hint == "meshgate install --crds | kubectl apply -f -"
    crds["links.multicluster.meshgate.io"] = crd(expected.crds[-1], established=False)
    waiting = control_results(crds=crds)[
        "control plane CustomResourceDefinitions are established"]
    assert waiting.error == "not Established: links.multicluster.meshgate.io"


def test_no_namespace_is_fatal() -> None:
    results = control_results(namespace=Got(None))
    ns = results["control plane Namespace exists"]
    assert ns.status is Status.FAIL and ns.fatal
    assert ns.hint == INSTALL_FIX
    assert not any(d.startswith("Deployment") for d in results)


def test_a_deployment_short_of_replicas_fails() -> None:
    results = control_results(deployments={
        "meshgate-control": deployment("meshgate-control", available=1, replicas=2),
        "meshgate-gateway": Got(None), "meshgate-mirror": Got(error="403 Forbidden")})
    control_ = results["Deployment meshgate-control is available"]
    assert control_.error == "1 of 2 replicas available (Available: MinimumReplicasUnavailable)"
    assert control_.hint.startswith("kubectl -n meshgate describe deployment meshgate-control")
    assert results["Deployment meshgate-gateway is available"].error == (
        "Deployment meshgate/meshgate-gateway does not exist")
    assert results["Deployment meshgate-mirror is available"].error == (
        "cannot read Deployment meshgate/meshgate-mirror: 403 Forbidden")


def test_an_image_of_another_version_warns() -> None:
    deployments = {d["metadata"]["name"]: deployment(d["metadata"]["name"])
                   for d in control.Expected.rendered().deployments}
    deployments["meshgate-gateway"] = deployment("meshgate-gateway",
                                                 image="ghcr.io/meshgate/meshgate:0.0.9")
    result = control_results(deployments=deployments)["control plane and cli versions match"]
    assert result.status is Status.WARN
    assert result.error == f"this meshgate is {VERSION}; meshgate-gateway runs 0.0.9"


@pytest.mark.parametrize(("image", "tag"), [
    ("ghcr.io/meshgate/meshgate:0.1.0", "0.1.0"), ("localhost:5000/meshgate:1.2", "1.2"),
    ("localhost:5000/meshgate", ""), ("meshgate:0.1.0@sha256:abcd", "0.1.0")])
def test_image_tag(image: str, tag: str) -> None:
    assert control.image_tag(image) == tag


def test_an_expired_issuer_fails_naming_its_not_after() -> None:
    secret, roots = identity(issuer_lifetime=timedelta(days=1), issued=NOW - timedelta(days=3))
    results = control_results(issuer=secret, roots=roots)
    expired = results["issuer certificate is within the validity period"]
    assert expired.status is Status.FAIL
    assert "expired: notAfter 2026-12-04T12:00:00Z (now 2026-12-06T12:00:00Z)" in expired.error
    assert "meshgate identity rotate" in expired.hint
    assert "issuer certificate is valid for at least 30 days" not in results


def test_an_issuer_expiring_within_30_days_warns() -> None:
    secret, roots = identity(issuer_lifetime=timedelta(days=29))
    results = control_results(issuer=secret, roots=roots)
    soon = results["issuer certificate is valid for at least 30 days"]
    assert soon.status is Status.WARN
    assert soon.error.endswith("expires soon: notAfter 2027-01-04T12:00:00Z")
    assert succeeded(list(results.values()))


def test_an_issuer_of_another_anchor_fails() -> None:
    secret, _ = identity()
    _, other_roots = identity()
    result = control_results(issuer=secret, roots=other_roots)[
        "issuer certificate is issued by the trust roots"]
    assert result.status is Status.FAIL
    assert "does not chain to the trust roots" in result.error


def test_unreadable_identity_objects() -> None:
    results = control_results(issuer=Got(None))
    assert results["issuer Secret and trust roots exist"].error == (
        "the Secret meshgate/meshgate-identity-issuer does not exist")
    results = control_results(issuer=Got({"data": {"tls.crt": "bm90IGEgY2VydA=="}}))
    assert "tls.crt holds no PEM certificate" in results[
        "issuer Secret and trust roots exist"].error
    results = control_results(roots=Got({"data": {}}))
    assert results["issuer Secret and trust roots exist"].error == (
        "the ConfigMap meshgate/meshgate-identity-trust-roots has no ca-bundle.crt")


def test_an_absent_injector_fails_with_the_fix() -> None:
    result = control_results(webhook=Got(None))[
        "proxy injector MutatingWebhookConfiguration meshgate-proxy-injector exists"]
    assert result.error == ("there is no MutatingWebhookConfiguration meshgate-proxy-injector: "
                            "pods are not injected with a proxy")
    assert "meshgate install" in result.hint


def test_the_webhook_needs_a_ca_bundle_valid_now() -> None:
    webhook, _, _ = injector(bundle="")
    result = control_results(webhook=webhook)["proxy injector webhook has a CA bundle"]
    assert result.error == ("webhook proxy-injector.meshgate.io has no caBundle, so the API "
                            "server cannot verify the injector")
    webhook, _, _ = injector(bundle=ca_bundle(lifetime=timedelta(days=1),
                                              issued=NOW - timedelta(days=2)))
    result = control_results(webhook=webhook)[
        "proxy injector CA bundle is within the validity period"]
    assert result.status is Status.FAIL
    assert "expired: notAfter 2026-12-05T12:00:00Z" in result.error


def test_a_webhook_calling_elsewhere_fails() -> None:
    webhook, _, _ = injector(service="other")
    result = control_results(webhook=webhook)[
        "proxy injector MutatingWebhookConfiguration meshgate-proxy-injector exists"]
    assert result.error == ("it does not call the Service meshgate/meshgate-injector: "
                            "proxy-injector.meshgate.io calls service meshgate/other")


@pytest.mark.parametrize(("policy", "says"), [
    ("Ignore", "with failurePolicy Ignore, pods are admitted without a proxy"),
    ("Fail", "with failurePolicy Fail, pods it selects are refused")])
def test_an_injector_without_ready_endpoints_says_what_its_failure_policy_does(
        policy: str, says: str) -> None:
    webhook, service, slices = injector(policy=policy, ready=False)
    result = control_results(webhook=webhook, injector_service=service, injector_slices=slices)[
        "proxy injector Service meshgate-injector has ready endpoints"]
    assert result.error == ("the Service meshgate/meshgate-injector has no ready endpoints, so "
                            "the webhook cannot answer: " + says)


def test_an_endpoint_without_a_ready_condition_is_ready() -> None:
    webhook, service, slices = injector(ready=None)
    assert slices.obj is not None
    slices.obj["items"][0]["endpoints"] = [{"addresses": ["10.0.0.1"]}]
    results = control_results(webhook=webhook, injector_service=service,
                              injector_slices=slices)
    assert results["proxy injector Service meshgate-injector has ready endpoints"].status \
        is Status.OK


ANSWERS = "proxy injector answers the API server"


def test_the_probe_pod_asks_for_injection_and_is_only_a_dry_run_away() -> None:
    probe = control.probe_pod()
    assert probe["metadata"]["annotations"] == {"meshgate.io/inject": "enabled"}
    assert control.PROBE_NAMESPACE == "default"
    assert control_results()[ANSWERS].status is Status.OK


def test_a_probe_back_without_the_proxy_means_the_injector_did_not_answer() -> None:
    result = control_results(injector_answer=answered(injected=False))[ANSWERS]
    assert result.status is Status.FAIL
    assert result.error == (
        "a dry-run Pod asking for injection in namespace default came back without the "
        "proxy: the injector did not answer (failurePolicy Ignore admits pods without it), "
        "or the webhook's selectors leave that namespace out")
    assert "kubectl -n meshgate logs deploy/meshgate-control" in result.hint


def test_a_refused_probe_names_the_refusal_and_no_namespace_warns() -> None:
    refused = control_results(injector_answer=Got(error="Internal error occurred: failed "
                                                        "calling webhook"))[ANSWERS]
    assert refused.status is Status.FAIL
    assert refused.error.endswith("was refused: Internal error occurred: failed calling "
                                  "webhook")
    assert control_results(injector_answer=Got(None))[ANSWERS].status is Status.WARN


def test_the_probe_is_asked_only_once_the_injector_has_endpoints() -> None:
    webhook, service, slices = injector(ready=False)
    results = control_results(webhook=webhook, injector_service=service,
                              injector_slices=slices, injector_answer=answered(injected=False))
    assert ANSWERS not in results


# -- data plane ----------------------------------------------------------------------------

def pod(name: str, *, ready: bool = True, version: str = VERSION, phase: str = "Running",
        meshed: bool = True) -> Obj:
    inits = [{"name": "meshgate-proxy", "image": reference(version),
              "restartPolicy": "Always"}] if meshed else []
    return {"metadata": {"name": name, "namespace": "shop",
                         "annotations": {"meshgate.io/proxy-version": version}},
            "spec": {"initContainers": inits, "containers": [{"name": "app", "image": "a"}]},
            "status": {"phase": phase, "initContainerStatuses": [
                {"name": "meshgate-proxy", "ready": ready}]}}


def data_plane(*pods: Obj, namespace: str | None = None, namespace_got: Got | None = None
               ) -> dict[str, Result]:
    return by_description(list(dataplane.checks(
        Got({"items": list(pods)}), control_version=VERSION, namespace=namespace,
        namespace_got=namespace_got)))


def test_ready_proxies_of_the_control_planes_version_pass() -> None:
    results = data_plane(pod("a"), pod("b"), pod("plain", meshed=False))
    assert {r.status for r in results.values()} == {Status.OK}


def test_a_proxy_not_ready_fails_and_finished_pods_do_not_count() -> None:
    results = data_plane(pod("a", ready=False), pod("done", ready=False, phase="Succeeded"))
    assert results["data plane proxies are ready"].error == "meshgate-proxy not ready in shop/a"


def test_version_skew_warns() -> None:
    results = data_plane(pod("a"), pod("old", version="0.0.9"))
    skew = results["data plane and control plane versions match"]
    assert skew.status is Status.WARN
    assert skew.error == (f"the control plane runs {VERSION}; proxies of another version: "
                          "shop/old (0.0.9)")


def test_no_meshed_pods_fails() -> None:
    results = data_plane(pod("plain", meshed=False), namespace="shop",
                         namespace_got=Got({"metadata": {"name": "shop"}}))
    assert results["data plane proxies are ready"].error == (
        "no pods with a meshgate-proxy container in namespace shop")
    results = data_plane(namespace="nope", namespace_got=Got(None))
    assert results["data plane namespace exists"].error == "the Namespace nope does not exist"


# -- run and render ------------------------------------------------------------------------

CAT = Category("things")
OTHER = Category("more")


def test_a_fatal_failure_ends_the_run() -> None:
    results = list(run([lambda: [CAT.ok("one"), CAT.fail("two", "gone", "fix it", fatal=True),
                                 CAT.ok("three")],
                        lambda: [OTHER.ok("four")]]))
    assert [r.description for r in results] == ["one", "two"]


def test_warnings_do_not_fail() -> None:
    assert succeeded([CAT.ok("a"), CAT.warn("b", "soon")])
    assert not succeeded([CAT.ok("a"), CAT.fail("b", "no")])


def test_table_is_linkerd_checks() -> None:
    text = render.table([CAT.ok("one"), CAT.warn("two", "expires soon\nsecond line", "renew"),
                         OTHER.fail("three", "it is gone", "install it")])
    assert text == (
        "things\n"
        "------\n"
        "\u221a one\n"
        "\u203c two\n"
        "    expires soon\n"
        "    second line\n"
        "    fix: renew\n"
        "\n"
        "more\n"
        "----\n"
        "\u00d7 three\n"
        "    it is gone\n"
        "    fix: install it\n"
        "\n"
        "Status check results are \u00d7\n")
    assert render.table([CAT.ok("one"), CAT.warn("two", "w")]).endswith(
        "\nStatus check results are \u221a\n")


def test_json_is_linkerd_checks() -> None:
    doc = json.loads(render.as_json([CAT.ok("one"), CAT.warn("two", "soon", "renew"),
                                     OTHER.fail("three", "gone")]))
    assert doc == {"success": False, "categories": [
        {"categoryName": "things", "checks": [
            {"description": "one", "result": "success"},
            {"description": "two", "result": "warning", "error": "soon", "hint": "renew"}]},
        {"categoryName": "more", "checks": [
            {"description": "three", "result": "error", "error": "gone"}]}]}
