"""Admission webhooks called by the embedded API server as kube-apiserver calls
them: a mutating webhook standing in for the proxy injector, a validating one
that refuses, selectors that exclude, failure policies on timeouts and garbage,
caBundle verification, reinvocation, and webhooks reached through a Service.

The webhook server is a stdlib HTTPS server in this process, with a CA made
for the test; each test's configurations select only its own namespace."""

from __future__ import annotations

import base64
import json
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from localcluster.pki import ensure_pki
from tests.cluster import Cluster, wait_for

Respond = Callable[[dict[str, Any]], dict[str, Any]]
SERVICE_NS = "whk-svc"


def allow(request: dict[str, Any]) -> dict[str, Any]:
    return {"allowed": True}


def patch_with(*ops: dict[str, Any]) -> dict[str, Any]:
    return {"allowed": True, "patchType": "JSONPatch",
            "patch": base64.b64encode(json.dumps(list(ops)).encode()).decode()}


def inject(request: dict[str, Any]) -> dict[str, Any]:
    """The proxy injector's answer: one more container, and an annotation saying so."""
    pod = request["object"]
    ops: list[dict[str, Any]] = [{"op": "add", "path": "/spec/containers/-", "value": {
        "name": "proxy", "image": "meshgate/proxy:dev", "args": ["proxy"]}}]
    if not pod["metadata"].get("annotations"):
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
    ops.append({"op": "add", "path": "/metadata/annotations/meshgate.io~1injected",
                "value": "true"})
    return patch_with(*ops)


def deny_labelled(request: dict[str, Any]) -> dict[str, Any]:
    labels = request["object"]["metadata"].get("labels") or {}
    if labels.get("deny") == "yes":
        return {"allowed": False, "status": {
            "code": 403, "reason": "Forbidden",
            "message": "pods labelled deny=yes are not allowed here"}}
    return {"allowed": True, "warnings": ["checked by the policy webhook"]}


@dataclass
class WebhookServer:
    port: int
    ca_bundle: str
    answers: dict[str, Respond | str] = field(default_factory=dict)
    """path -> a function of the AdmissionRequest, or raw text to answer with."""
    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def requests(self, path: str) -> list[dict[str, Any]]:
        return [r for p, r in self.seen if p == path]


def _serve(root: Path, hosts: list[str]) -> tuple[ThreadingHTTPServer, WebhookServer]:
    pki = ensure_pki(root, cluster="webhooks", hosts=hosts)
    state = WebhookServer(0, base64.b64encode(pki.ca_cert_pem).decode())

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            path = self.path.partition("?")[0]
            state.seen.append((path, review["request"]))
            answer = state.answers.get(path, allow)
            if path.startswith("/slow"):
                state.release.wait(10)  # held until the test has seen the call time out
            if isinstance(answer, str):
                body = answer.encode()
            else:
                response = {"uid": review["request"]["uid"], **answer(review["request"])}
                body = json.dumps({"apiVersion": "admission.k8s.io/v1",
                                   "kind": "AdmissionReview", "response": response}).encode()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass  # the API server gave up on a slow answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.serving_cert, pki.serving_key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    state.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebhookServer]:
    server, state = _serve(tmp_path_factory.mktemp("webhook-pki"),
                           ["127.0.0.1", f"hooks.{SERVICE_NS}.svc"])
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def ns(cluster: Cluster) -> Iterator[str]:
    """A namespace only this test's webhooks select (label ``webhook-test: <name>``)."""
    name = f"wh-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(cluster.api())
    core.create_namespace({"metadata": {"name": name, "labels": {"webhook-test": name}}})
    yield name
    adm = client.AdmissionregistrationV1Api(cluster.api())
    for c in adm.list_mutating_webhook_configuration().items:
        if c.metadata.name.startswith(name):
            adm.delete_mutating_webhook_configuration(c.metadata.name)
    for c in adm.list_validating_webhook_configuration().items:
        if c.metadata.name.startswith(name):
            adm.delete_validating_webhook_configuration(c.metadata.name)


def webhook(ns: str, name: str, client_config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "clientConfig": client_config,
            "namespaceSelector": {"matchLabels": {"webhook-test": ns}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"]}], **extra}


def url_config(hooks: WebhookServer, path: str) -> dict[str, Any]:
    return {"url": hooks.url(path), "caBundle": hooks.ca_bundle}


def install(cluster: Cluster, kind: str, name: str, *hooks_: dict[str, Any]) -> None:
    doc = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind,
           "metadata": {"name": name}, "webhooks": list(hooks_)}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))


def containers(cluster: Cluster, ns: str, pod: str) -> list[str]:
    out = cluster.kubectl("get", "pod", pod, "-n", ns, "-o",
                          "jsonpath={.spec.containers[*].name}").stdout
    return out.split()


# -- the configurations themselves -------------------------------------------------------


def test_configurations_are_served_defaulted_and_listed(cluster: Cluster, hooks: WebhookServer,
                                                        ns: str) -> None:
    resources = cluster.kubectl("api-resources", "--api-group=admissionregistration.k8s.io",
                                "-o", "name").stdout.split()
    assert {"mutatingwebhookconfigurations.admissionregistration.k8s.io",
            "validatingwebhookconfigurations.admissionregistration.k8s.io"} <= set(resources)
    install(cluster, "MutatingWebhookConfiguration", f"{ns}-defaults",
            webhook(ns, "a.example.com", url_config(hooks, "/allow")),
            webhook(ns, "b.example.com", {"service": {"name": "x", "namespace": "y"}}))
    got = json.loads(cluster.kubectl("get", "mutatingwebhookconfiguration", f"{ns}-defaults",
                                     "-o", "json").stdout)
    first, second = got["webhooks"]
    assert {k: first[k] for k in ("failurePolicy", "matchPolicy", "timeoutSeconds",
                                  "reinvocationPolicy", "objectSelector")} == {
        "failurePolicy": "Fail", "matchPolicy": "Equivalent", "timeoutSeconds": 10,
        "reinvocationPolicy": "Never", "objectSelector": {}}
    assert first["rules"][0]["scope"] == "*"
    assert second["clientConfig"]["service"]["port"] == 443
    table = cluster.kubectl("get", "mutatingwebhookconfigurations", f"{ns}-defaults").stdout
    assert table.split("\n")[0].split() == ["NAME", "WEBHOOKS", "AGE"]
    assert table.split("\n")[1].split()[:2] == [f"{ns}-defaults", "2"]
    explained = cluster.kubectl("explain", "mutatingwebhookconfigurations.webhooks.sideEffects")
    assert "FIELD: sideEffects <string>" in explained.stdout
    doc = {"apiVersion": "admissionregistration.k8s.io/v1",
           "kind": "ValidatingWebhookConfiguration", "metadata": {"name": f"{ns}-ssa"},
           "webhooks": [webhook(ns, "ssa.example.com", url_config(hooks, "/allow"))]}
    cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(doc))
    # Served to the official client too.
    adm = client.AdmissionregistrationV1Api(cluster.api())
    assert adm.read_mutating_webhook_configuration(f"{ns}-defaults").webhooks[1].name == \
        "b.example.com"


@pytest.mark.parametrize(("change", "cause"), [
    ({"sideEffects": None},
     "webhooks[0].sideEffects: Required value: must specify one of None, NoneOnDryRun"),
    ({"sideEffects": "Some"},
     'webhooks[0].sideEffects: Unsupported value: "Some": supported values: "None", '
     '"NoneOnDryRun"'),
    ({"clientConfig": {"url": "https://a.example.com/x",
                       "service": {"name": "s", "namespace": "n"}}},
     "webhooks[0].clientConfig: Required value: exactly one of url or service is required"),
    ({"clientConfig": {"url": "http://a.example.com/x"}},
     "webhooks[0].clientConfig.url: Invalid value: \"http\": 'https' is the only allowed URL "
     "scheme; desired format: https://host[/path]"),
    ({"admissionReviewVersions": ["v1beta2"]},
     'webhooks[0].admissionReviewVersions: Invalid value: []string{"v1beta2"}: must include '
     "at least one of v1, v1beta1"),
    ({"timeoutSeconds": 31},
     "webhooks[0].timeoutSeconds: Invalid value: 31: the timeout value must be between 1 and "
     "30 seconds"),
    ({"failurePolicy": "Sometimes"},
     'webhooks[0].failurePolicy: Unsupported value: "Sometimes": supported values: "Fail", '
     '"Ignore"'),
    ({"name": "short"},
     'webhooks[0].name: Invalid value: "short": should be a domain with at least three '
     "segments separated by dots"),
])
def test_invalid_configurations_are_refused_with_kubes_causes(
        cluster: Cluster, ns: str, change: dict[str, Any], cause: str) -> None:
    hook = webhook(ns, "v.example.com", {"url": "https://a.example.com/x"})
    hook.update(change)
    hook = {k: v for k, v in hook.items() if v is not None}
    doc = {"apiVersion": "admissionregistration.k8s.io/v1",
           "kind": "ValidatingWebhookConfiguration", "metadata": {"name": f"{ns}-bad"},
           "webhooks": [hook]}
    proc = cluster.kubectl("create", "-f", "-", input=json.dumps(doc), check=False)
    assert proc.returncode == 1
    assert (f'The ValidatingWebhookConfiguration "{ns}-bad" is invalid: ' in proc.stderr
            and cause in proc.stderr), proc.stderr


# -- mutating and validating -------------------------------------------------------------


def test_mutating_webhook_injects_a_container_on_run_and_apply(
        cluster: Cluster, hooks: WebhookServer, ns: str) -> None:
    hooks.answers["/inject"] = inject
    install(cluster, "MutatingWebhookConfiguration", f"{ns}-injector",
            webhook(ns, "inject.meshgate.io", url_config(hooks, "/inject")))
    cluster.kubectl("run", "web", "--image=app", "-n", ns)
    assert containers(cluster, ns, "web") == ["web", "proxy"]
    pod = client.CoreV1Api(cluster.api()).read_namespaced_pod("web", ns)
    assert pod.metadata.annotations["meshgate.io/injected"] == "true"
    # the injected container got kube's defaults, as a decoded object does
    assert pod.spec.containers[1].image_pull_policy == "IfNotPresent"
    assert pod.spec.containers[1].termination_message_path == "/dev/termination-log"

    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "applied"},
                "spec": {"containers": [{"name": "app", "image": "app"}]}}
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(manifest))
    assert containers(cluster, ns, "applied") == ["app", "proxy"]

    request = hooks.requests("/inject")[-1]
    assert request["operation"] == "CREATE" and request["namespace"] == ns
    assert request["name"] == "applied"
    assert request["kind"] == {"group": "", "version": "v1", "kind": "Pod"}
    assert request["resource"] == {"group": "", "version": "v1", "resource": "pods"}
    assert request["requestResource"] == request["resource"]
    assert request["userInfo"]["username"] == "admin" or request["userInfo"]["username"]
    assert request["oldObject"] is None and request["dryRun"] is False
    assert request["options"]["kind"] == "CreateOptions"
    # what kube's in-tree admission did before: ServiceAccount and defaults
    assert request["object"]["spec"]["serviceAccountName"] == "default"
    assert request["object"]["spec"]["restartPolicy"] == "Always"

    # a server-side dry run reaches a webhook without side effects, flagged as such
    out = cluster.kubectl("run", "dry", "--image=app", "-n", ns, "--dry-run=server",
                          "-o", "jsonpath={.spec.containers[*].name}").stdout
    assert out.split() == ["dry", "proxy"]
    assert hooks.requests("/inject")[-1]["dryRun"] is True
    assert cluster.kubectl("get", "pod", "dry", "-n", ns, check=False).returncode == 1


def test_validating_webhook_refuses_with_its_message_and_passes_warnings(
        cluster: Cluster, hooks: WebhookServer, ns: str) -> None:
    hooks.answers["/policy"] = deny_labelled
    install(cluster, "ValidatingWebhookConfiguration", f"{ns}-policy",
            webhook(ns, "policy.meshgate.io", url_config(hooks, "/policy"),
                    rules=[{"operations": ["CREATE", "UPDATE"], "apiGroups": [""],
                            "apiVersions": ["v1"], "resources": ["pods"]}]))
    proc = cluster.kubectl("run", "bad", "--image=app", "-n", ns, "--labels=deny=yes",
                           check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        'Error from server (Forbidden): admission webhook "policy.meshgate.io" denied the '
        "request: pods labelled deny=yes are not allowed here")

    good = cluster.kubectl("run", "good", "--image=app", "-n", ns)
    assert "Warning: checked by the policy webhook" in good.stderr

    # an update that the webhook refuses leaves the object as it was
    proc = cluster.kubectl("label", "pod", "good", "-n", ns, "deny=yes", check=False)
    assert proc.returncode == 1
    assert 'admission webhook "policy.meshgate.io" denied the request' in proc.stderr
    assert hooks.requests("/policy")[-1]["operation"] == "UPDATE"
    assert hooks.requests("/policy")[-1]["oldObject"]["metadata"]["name"] == "good"
    core = client.CoreV1Api(cluster.api())
    assert "deny" not in (core.read_namespaced_pod("good", ns).metadata.labels or {})

    # the official client sees the Status
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod(ns, {"metadata": {"name": "bad2", "labels": {"deny": "yes"}},
                                        "spec": {"containers": [{"name": "c", "image": "i"}]}})
    assert err.value.status == 403
    status = json.loads(err.value.body)
    assert status["reason"] == "Forbidden"
    assert status["message"] == ('admission webhook "policy.meshgate.io" denied the request: '
                                 "pods labelled deny=yes are not allowed here")


def test_a_denial_without_code_is_400_and_without_message_says_so(
        cluster: Cluster, hooks: WebhookServer, ns: str) -> None:
    hooks.answers["/deny-bare"] = lambda r: {"allowed": False}
    install(cluster, "ValidatingWebhookConfiguration", f"{ns}-bare",
            webhook(ns, "bare.example.com", url_config(hooks, "/deny-bare")))
    status, body = cluster.raw("POST", f"/api/v1/namespaces/{ns}/pods", json.dumps({
        "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}
    }).encode())
    assert status == 400
    assert body["message"] == ('admission webhook "bare.example.com" denied the request '
                               "without explanation")


def test_selectors_exclude(cluster: Cluster, hooks: WebhookServer, ns: str) -> None:
    hooks.answers["/inject"] = inject
    install(cluster, "MutatingWebhookConfiguration", f"{ns}-selective",
            webhook(ns, "inject.meshgate.io", url_config(hooks, "/inject"),
                    objectSelector={"matchExpressions": [
                        {"key": "inject", "operator": "NotIn", "values": ["no"]}]}))
    cluster.kubectl("run", "in", "--image=app", "-n", ns)
    cluster.kubectl("run", "out", "--image=app", "-n", ns, "--labels=inject=no")
    assert containers(cluster, ns, "in") == ["in", "proxy"]
    assert containers(cluster, ns, "out") == ["out"]
    # another namespace does not carry the label the namespaceSelector asks for
    other = f"{ns}-other"
    cluster.kubectl("create", "namespace", other)
    cluster.kubectl("run", "elsewhere", "--image=app", "-n", other)
    assert containers(cluster, other, "elsewhere") == ["elsewhere"]
    # a rule for pods does not match the pods/status subresource; one for pods/status does
    hooks.answers["/status"] = allow
    install(cluster, "ValidatingWebhookConfiguration", f"{ns}-status",
            webhook(ns, "status.example.com", url_config(hooks, "/status"),
                    rules=[{"operations": ["UPDATE"], "apiGroups": [""], "apiVersions": ["v1"],
                            "resources": ["pods/status"]}]))
    client.CoreV1Api(cluster.api()).patch_namespaced_pod_status(
        "in", ns, {"status": {"phase": "Running"}})
    wait_for(lambda: hooks.requests("/status"), what="the pods/status webhook")
    assert hooks.requests("/status")[-1]["subResource"] == "status"


# -- failures ----------------------------------------------------------------------------


def test_timeout_refuses_under_fail_and_admits_under_ignore(
        cluster: Cluster, hooks: WebhookServer, ns: str) -> None:
    install(cluster, "MutatingWebhookConfiguration", f"{ns}-slow",
            webhook(ns, "slow.example.com", url_config(hooks, "/slow"), timeoutSeconds=1))
    proc = cluster.kubectl("run", "p", "--image=app", "-n", ns, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        'Error from server (InternalError): Internal error occurred: failed calling webhook '
        f'"slow.example.com": failed to call webhook: Post "{hooks.url("/slow")}?timeout=1s": '
        "context deadline exceeded")
    install(cluster, "MutatingWebhookConfiguration", f"{ns}-slow",
            webhook(ns, "slow.example.com", url_config(hooks, "/slow"), timeoutSeconds=1,
                    failurePolicy="Ignore"))
    cluster.kubectl("run", "p", "--image=app", "-n", ns)
    assert containers(cluster, ns, "p") == ["p"]
    wait_for(lambda: any("webhook failed open name=slow.example.com" in line
                         for line in cluster.output), what="the fail-open log line")
    status, metrics = cluster.raw("GET", "/metrics")
    assert status == 200
    assert ('apiserver_admission_webhook_fail_open_count_total{name="slow.example.com",'
            'type="admit"} 1.0') in metrics


@pytest.mark.parametrize(("answer", "detail"), [
    ("garbage", "failed to call webhook: couldn't get version/kind; json parse error: "
                "invalid character 'g' looking for beginning of value"),
    ('{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}',
     "received invalid webhook response: webhook response was absent"),
    ('{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", '
     '"response": {"uid": "not-it", "allowed": true}}',
     'received invalid webhook response: expected response.uid="'),
])
def test_garbage_answers_refuse_under_fail(cluster: Cluster, hooks: WebhookServer, ns: str,
                                           answer: str, detail: str) -> None:
    path = f"/garbage-{uuid.uuid4().hex[:6]}"
    hooks.answers[path] = answer
    install(cluster, "ValidatingWebhookConfiguration", f"{ns}-garbage",
            webhook(ns, "garbage.example.com", url_config(hooks, path)))
    status, body = cluster.raw("POST", f"/api/v1/namespaces/{ns}/pods", json.dumps({
        "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}
    }).encode())
    assert status == 500
    assert body["reason"] == "InternalError"
    assert body["message"].startswith(
        f'Internal error occurred: failed calling webhook "garbage.example.com": {detail}'), body
    assert body["details"] == {"causes": [{"message": body["message"].removeprefix(
        "Internal error occurred: ")}]}


def test_a_bad_ca_bundle_is_a_failed_call(cluster: Cluster, hooks: WebhookServer, ns: str,
                                          tmp_path: Path) -> None:
    other_ca = base64.b64encode(ensure_pki(tmp_path, cluster="other", hosts=["127.0.0.1"])
                                .ca_cert_pem).decode()
    install(cluster, "ValidatingWebhookConfiguration", f"{ns}-ca",
            webhook(ns, "ca.example.com", {"url": hooks.url("/allow"), "caBundle": other_ca}))
    proc = cluster.kubectl("run", "p", "--image=app", "-n", ns, check=False)
    assert proc.stderr.strip() == (
        'Error from server (InternalError): Internal error occurred: failed calling webhook '
        f'"ca.example.com": failed to call webhook: Post "{hooks.url("/allow")}?timeout=10s": '
        "tls: failed to verify certificate: x509: certificate signed by unknown authority")
    install(cluster, "ValidatingWebhookConfiguration", f"{ns}-ca",
            webhook(ns, "ca.example.com", {"url": hooks.url("/allow"),
                                           "caBundle": base64.b64encode(b"junk").decode()}))
    proc = cluster.kubectl("run", "p", "--image=app", "-n", ns, check=False)
    assert 'failed calling webhook "ca.example.com": could not get REST client: unable to ' \
        "load root certificates: unable to parse bytes as PEM block" in proc.stderr


# -- reinvocation ------------------------------------------------------------------------


def count_calls(request: dict[str, Any]) -> dict[str, Any]:
    annotations = request["object"]["metadata"].get("annotations") or {}
    calls = int(annotations.get("first-calls", "0")) + 1
    ops: list[dict[str, Any]] = []
    if not annotations:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
    ops.append({"op": "add", "path": "/metadata/annotations/first-calls", "value": str(calls)})
    return patch_with(*ops)


@pytest.mark.parametrize(("policy", "calls"), [("IfNeeded", "2"), ("Never", "1")])
def test_reinvocation_when_a_later_webhook_changes_the_object(
        cluster: Cluster, hooks: WebhookServer, ns: str, policy: str, calls: str) -> None:
    hooks.answers["/first"] = count_calls
    hooks.answers["/inject"] = inject
    # configurations run in name order: "-a-" before "-b-"
    install(cluster, "MutatingWebhookConfiguration", f"{ns}-a-first",
            webhook(ns, "first.example.com", url_config(hooks, "/first"),
                    reinvocationPolicy=policy))
    install(cluster, "MutatingWebhookConfiguration", f"{ns}-b-injector",
            webhook(ns, "inject.meshgate.io", url_config(hooks, "/inject")))
    cluster.kubectl("run", "p", "--image=app", "-n", ns)
    pod = client.CoreV1Api(cluster.api()).read_namespaced_pod("p", ns)
    assert pod.metadata.annotations["first-calls"] == calls
    assert [c.name for c in pod.spec.containers] == ["p", "proxy"]
    if policy == "IfNeeded":  # the second call saw the injected container
        second = [r for r in hooks.requests("/first") if r["namespace"] == ns][-1]
        assert [c["name"] for c in second["object"]["spec"]["containers"]] == ["p", "proxy"]


# -- clientConfig.service ------------------------------------------------------------------


def test_service_webhook_reaches_a_ready_endpoint(cluster: Cluster, hooks: WebhookServer,
                                                  ns: str) -> None:
    """The Service has no selector; a hand-made EndpointSlice points at the test's server on
    127.0.0.1, an address the API server (on the host) can dial. The server's certificate
    is checked for hooks.whk-svc.svc, the name kube would dial."""
    core = client.CoreV1Api(cluster.api())
    if SERVICE_NS not in [n.metadata.name for n in core.list_namespace().items]:
        core.create_namespace({"metadata": {"name": SERVICE_NS}})
    hooks.answers["/inject"] = inject
    install(cluster, "MutatingWebhookConfiguration", f"{ns}-svc",
            webhook(ns, "inject.meshgate.io", {
                "service": {"name": "hooks", "namespace": SERVICE_NS, "path": "/inject"},
                "caBundle": hooks.ca_bundle}))
    proc = cluster.kubectl("run", "early", "--image=app", "-n", ns, check=False)
    assert proc.stderr.strip() == (
        'Error from server (InternalError): Internal error occurred: failed calling webhook '
        f'"inject.meshgate.io": failed to call webhook: Post "https://hooks.{SERVICE_NS}.svc:'
        '443/inject?timeout=10s": service "hooks" not found')

    core.create_namespaced_service(SERVICE_NS, {
        "metadata": {"name": "hooks"},
        "spec": {"ports": [{"port": 443, "targetPort": hooks.port}]}})
    proc = cluster.kubectl("run", "early", "--image=app", "-n", ns, check=False)
    assert 'no endpoints available for service "hooks"' in proc.stderr

    client.DiscoveryV1Api(cluster.api()).create_namespaced_endpoint_slice(SERVICE_NS, {
        "metadata": {"name": "hooks-manual", "labels": {"kubernetes.io/service-name": "hooks"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}],
        "ports": [{"port": hooks.port, "protocol": "TCP"}]})
    cluster.kubectl("run", "web", "--image=app", "-n", ns)
    assert containers(cluster, ns, "web") == ["web", "proxy"]


# -- other operations, the requester, and concurrency ---------------------------------------


def test_delete_is_admitted_with_the_old_object(cluster: Cluster, hooks: WebhookServer,
                                                ns: str) -> None:
    def keep_protected(request: dict[str, Any]) -> dict[str, Any]:
        labels = request["oldObject"]["metadata"].get("labels") or {}
        if labels.get("protected") == "true":
            return {"allowed": False, "status": {"message": "this pod is protected"}}
        return {"allowed": True}

    hooks.answers["/delete"] = keep_protected
    install(cluster, "ValidatingWebhookConfiguration", f"{ns}-delete",
            webhook(ns, "delete.example.com", url_config(hooks, "/delete"),
                    rules=[{"operations": ["DELETE"], "apiGroups": [""], "apiVersions": ["v1"],
                            "resources": ["pods"], "scope": "Namespaced"}]))
    cluster.kubectl("run", "keep", "--image=app", "-n", ns, "--labels=protected=true")
    cluster.kubectl("run", "drop", "--image=app", "-n", ns)
    proc = cluster.kubectl("delete", "pod", "keep", "-n", ns, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ('Error from server: admission webhook "delete.example.com" '
                                   "denied the request: this pod is protected")
    cluster.kubectl("delete", "pod", "drop", "-n", ns)
    request = hooks.requests("/delete")[-1]
    assert request["operation"] == "DELETE" and request["name"] == "drop"
    assert request["object"] is None and request["oldObject"]["metadata"]["name"] == "drop"
    assert request["options"]["kind"] == "DeleteOptions"
    assert cluster.kubectl("get", "pod", "keep", "-n", ns).returncode == 0


def test_the_webhook_is_told_who_asks(cluster: Cluster, hooks: WebhookServer, ns: str) -> None:
    hooks.answers["/who"] = allow
    install(cluster, "ValidatingWebhookConfiguration", f"{ns}-who",
            webhook(ns, "who.example.com", url_config(hooks, "/who"),
                    rules=[{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                            "resources": ["configmaps"]}]))
    cluster.kubectl("create", "configmap", "mine", "-n", ns)
    assert hooks.requests("/who")[-1]["userInfo"]["username"] == "meshgate-admin"
    cluster.kubectl("create", "role", "cm", "--verb=create", "--resource=configmaps", "-n", ns)
    cluster.kubectl("create", "rolebinding", "cm", "--role=cm", "--user=alice", "-n", ns)
    cluster.kubectl("create", "configmap", "theirs", "-n", ns, "--as=alice",
                    "--as-group=devs")
    user = hooks.requests("/who")[-1]["userInfo"]
    assert user["username"] == "alice" and "devs" in user["groups"]


def test_a_held_webhook_call_does_not_stall_other_writes(cluster: Cluster, hooks: WebhookServer,
                                                         ns: str) -> None:
    """kube calls webhooks outside its storage transaction: while one update waits on its
    webhook, other writes (here to the very same Pod's status) go on, and the held update
    then applies to the object as it now is."""
    gate = threading.Event()

    def held(request: dict[str, Any]) -> dict[str, Any]:
        gate.wait(20)
        return {"allowed": True}

    hooks.answers["/held"] = held
    core = client.CoreV1Api(cluster.api())
    cluster.kubectl("run", "p", "--image=app", "-n", ns)
    install(cluster, "ValidatingWebhookConfiguration", f"{ns}-held",
            webhook(ns, "held.example.com", url_config(hooks, "/held"), timeoutSeconds=30,
                    rules=[{"operations": ["UPDATE"], "apiGroups": [""], "apiVersions": ["v1"],
                            "resources": ["pods"]}]))
    result: dict[str, Any] = {}

    def label() -> None:
        try:
            result["pod"] = core.patch_namespaced_pod("p", ns, {"metadata": {"labels": {
                "held": "done"}}})
        except ApiException as e:
            result["error"] = e

    worker = threading.Thread(target=label)
    worker.start()
    try:
        wait_for(lambda: hooks.requests("/held"), what="the held webhook call")
        core.patch_namespaced_pod_status("p", ns, {"status": {"phase": "Running"}})
        core.create_namespaced_config_map(ns, {"metadata": {"name": "meanwhile"}})
        assert worker.is_alive(), "the update should still be waiting on its webhook"
    finally:
        gate.set()
        worker.join(30)
    assert "error" not in result, result.get("error")
    pod = core.read_namespaced_pod("p", ns)
    assert pod.metadata.labels["held"] == "done" and pod.status.phase == "Running"
    assert len(hooks.requests("/held")) == 2  # admitted again against the changed Pod


def test_patches_are_checked_like_any_write(cluster: Cluster, hooks: WebhookServer,
                                            ns: str) -> None:
    """A patch that does not apply is the server's internal error; one that makes the object
    invalid is refused by the object's own validation; a patch on a DELETE is refused."""
    hooks.answers["/unappliable"] = lambda r: patch_with(
        {"op": "replace", "path": "/spec/nothere/x", "value": 1})
    install(cluster, "MutatingWebhookConfiguration", f"{ns}-m",
            webhook(ns, "unappliable.example.com", url_config(hooks, "/unappliable")))
    status, body = cluster.raw("POST", f"/api/v1/namespaces/{ns}/pods", json.dumps({
        "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}
    }).encode())
    assert (status, body["reason"]) == (500, "InternalError")
    assert body["message"].startswith("Internal error occurred: ")

    hooks.answers["/bad-label"] = lambda r: patch_with(
        {"op": "add", "path": "/metadata/labels", "value": {"app": "not a valid value!"}})
    install(cluster, "MutatingWebhookConfiguration", f"{ns}-m",
            webhook(ns, "bad-label.example.com", url_config(hooks, "/bad-label")))
    proc = cluster.kubectl("run", "p", "--image=app", "-n", ns, check=False)
    assert proc.returncode == 1
    assert 'The Pod "p" is invalid: metadata.labels[app]: Invalid value: "not a valid value!"' in \
        proc.stderr, proc.stderr

    hooks.answers["/on-delete"] = lambda r: patch_with(
        {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}})
    install(cluster, "MutatingWebhookConfiguration", f"{ns}-m",
            webhook(ns, "on-delete.example.com", url_config(hooks, "/on-delete"),
                    rules=[{"operations": ["DELETE"], "apiGroups": [""], "apiVersions": ["v1"],
                            "resources": ["configmaps"]}]))
    cluster.kubectl("create", "configmap", "c", "-n", ns)
    proc = cluster.kubectl("delete", "configmap", "c", "-n", ns, check=False)
    assert proc.stderr.strip() == (
        'Error from server (InternalError): Internal error occurred: admission webhook '
        '"on-delete.example.com" attempted to modify the object, which is not supported for '
        "this operation")


def test_garbage_under_ignore_admits(cluster: Cluster, hooks: WebhookServer, ns: str) -> None:
    hooks.answers["/junk"] = "<html>oops</html>"
    install(cluster, "MutatingWebhookConfiguration", f"{ns}-junk",
            webhook(ns, "junk.example.com", url_config(hooks, "/junk"), failurePolicy="Ignore"))
    install(cluster, "ValidatingWebhookConfiguration", f"{ns}-junk",
            webhook(ns, "junk-v.example.com", url_config(hooks, "/junk"),
                    failurePolicy="Ignore"))
    cluster.kubectl("run", "p", "--image=app", "-n", ns)
    assert containers(cluster, ns, "p") == ["p"]
    assert len(hooks.requests("/junk")) == 2


def test_pods_a_deployment_makes_are_injected(cluster: Cluster, hooks: WebhookServer,
                                              ns: str) -> None:
    """The proxy injector's case: the Pods the ReplicaSet controller creates go through the
    same admission as a user's, so each gets the proxy container."""
    hooks.answers["/inject"] = inject
    install(cluster, "MutatingWebhookConfiguration", f"{ns}-injector",
            webhook(ns, "inject.meshgate.io", url_config(hooks, "/inject")))
    cluster.kubectl("create", "deployment", "web", "--image=app", "--replicas=2", "-n", ns)
    core = client.CoreV1Api(cluster.api())

    def injected() -> list[list[str]]:
        pods = core.list_namespaced_pod(ns, label_selector="app=web").items
        names = [[c.name for c in p.spec.containers] for p in pods]
        return names if len(names) == 2 else []

    assert wait_for(injected, timeout=20, what="two injected Pods") == [
        ["app", "proxy"], ["app", "proxy"]]
    request = [r for r in hooks.requests("/inject") if r["namespace"] == ns][-1]
    assert request["object"]["metadata"]["generateName"].startswith("web-")
    assert "name" not in request  # generated after mutating admission, as in kube


def test_a_refused_controller_create_is_retried(cluster: Cluster, hooks: WebhookServer,
                                                ns: str) -> None:
    """While a validating webhook refuses its Pods the Deployment has none; once the webhook
    admits them, the controller's retry creates them."""
    gate = {"open": False}
    hooks.answers["/gate"] = lambda r: {"allowed": True} if gate["open"] else {
        "allowed": False, "status": {"code": 403, "message": "not yet"}}
    install(cluster, "ValidatingWebhookConfiguration", f"{ns}-gate",
            webhook(ns, "gate.example.com", url_config(hooks, "/gate")))
    cluster.kubectl("create", "deployment", "web", "--image=app", "-n", ns)
    wait_for(lambda: [r for r in hooks.requests("/gate") if r["namespace"] == ns],
             timeout=20, what="the controller's first Pod create")
    core = client.CoreV1Api(cluster.api())
    assert core.list_namespaced_pod(ns).items == []
    gate["open"] = True
    wait_for(lambda: core.list_namespaced_pod(ns).items, timeout=30, what="the Pod, admitted")


def test_match_policy_equivalent_sends_the_version_the_rule_names(
        cluster: Cluster, hooks: WebhookServer, ns: str) -> None:
    group = f"{ns}.example.com"
    schema = {"openAPIV3Schema": {"type": "object", "properties": {"spec": {
        "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {"group": group, "scope": "Namespaced",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                 "versions": [{"name": "v1alpha1", "served": True, "storage": True,
                               "schema": schema},
                              {"name": "v1", "served": True, "storage": False,
                               "schema": schema}]}}))
    cluster.kubectl("wait", "--for=condition=Established", f"crd/widgets.{group}")
    hooks.answers["/widgets"] = allow
    v1_rule = {"operations": ["CREATE"], "apiGroups": [group], "apiVersions": ["v1"],
               "resources": ["widgets"]}
    install(cluster, "ValidatingWebhookConfiguration", f"{ns}-widgets",
            webhook(ns, "equivalent.example.com", url_config(hooks, "/widgets"),
                    rules=[v1_rule]),
            webhook(ns, "exact.example.com", url_config(hooks, "/widgets-exact"),
                    rules=[v1_rule], matchPolicy="Exact"))
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({
        "apiVersion": f"{group}/v1alpha1", "kind": "Widget", "metadata": {"name": "w"},
        "spec": {"size": 1}}))
    (request,) = hooks.requests("/widgets")[-1:]
    assert request["kind"] == {"group": group, "version": "v1", "kind": "Widget"}
    assert request["requestKind"] == {"group": group, "version": "v1alpha1", "kind": "Widget"}
    assert request["object"]["apiVersion"] == f"{group}/v1"
    assert request["object"]["spec"] == {"size": 1}
    assert not hooks.requests("/widgets-exact")
