"""The pure parts of admission webhooks: rule matching, answers checked and
refusals shaped as kube does, configuration defaults and validation, and where a
``service`` webhook is dialled."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from localcluster.resources import BUILTIN, ResourceType
from localcluster.webhookcall import CallError, WebhookClient
from localcluster.webhookconfig import set_defaults, validate
from localcluster.webhooks import (
    Attributes,
    _rule_matches,
    options_for,
    status_error,
    verify_answer,
)

TYPES = {rt.kind: rt for rt in BUILTIN if rt.group in ("", "admissionregistration.k8s.io")}
PODS, NAMESPACES = TYPES["Pod"], TYPES["Namespace"]


def rule(**kw: Any) -> dict[str, Any]:
    return {"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
            "resources": ["pods"], **kw}


def attrs(rt: ResourceType = PODS, op: str = "CREATE", ns: str = "d", sub: str = "") -> Attributes:
    return Attributes(rt, op, ns, "x", sub)


@pytest.mark.parametrize(("r", "a", "expected"), [
    (rule(), attrs(), True),
    (rule(), attrs(op="UPDATE"), False),
    (rule(operations=["*"]), attrs(op="DELETE"), True),
    (rule(), attrs(sub="status"), False),
    (rule(resources=["pods/status"]), attrs(sub="status"), True),
    (rule(resources=["pods/*"]), attrs(sub="status"), True),
    (rule(resources=["pods/*"]), attrs(), True),  # kube's matcher: "*" matches "" too
    (rule(resources=["*/*"]), attrs(), True),
    (rule(resources=["*"]), attrs(sub="status"), False),
    (rule(apiGroups=["apps"]), attrs(), False),
    (rule(apiVersions=["*"], apiGroups=["*"]), attrs(), True),
    (rule(scope="Cluster"), attrs(), False),
    (rule(scope="Namespaced"), attrs(), True),
    (rule(resources=["namespaces"], scope="Cluster"), attrs(NAMESPACES, ns="d"), True),
    (rule(resources=["namespaces"], scope="Namespaced"), attrs(NAMESPACES, ns="d"), False),
])
def test_rules_match_as_kube(r: dict[str, Any], a: Attributes, expected: bool) -> None:
    assert _rule_matches(r, a, a.rt) is expected


def test_status_error_shapes_refusals() -> None:
    err = status_error("w.example.com", {"code": 403, "reason": "Forbidden", "message": "no"})
    assert (err.code, err.reason, err.message) == (
        403, "Forbidden", 'admission webhook "w.example.com" denied the request: no')
    assert status_error("w.example.com", {"code": 200}).code == 400
    assert status_error("w.example.com", None).message == (
        'admission webhook "w.example.com" denied the request without explanation')
    assert status_error("w.example.com", {"reason": "Because"}).message.endswith(": Because")


def review(**response: Any) -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "response": {"uid": "u", **response}}


def test_answers_are_verified() -> None:
    patch = base64.b64encode(b"[]").decode()
    assert verify_answer("u", review(allowed=True, patch=patch, patchType="JSONPatch"),
                         mutating=True).patch == b"[]"
    for answer, mutating, message in [
        (review(allowed=True, patch=patch), True, "but not response.patchType"),
        (review(allowed=True, patchType="JSONPatch"), True, "but not response.patch"),
        (review(allowed=True, patch=patch, patchType="JSONPatch"), False,
         "validating webhook may not return response.patch"),
        ({**review(allowed=True), "kind": "Other"}, False, "got admission.k8s.io/v1, Kind=Other"),
        (review(allowed=True) | {"response": {"uid": "v"}}, False,
         'expected response.uid="u", got "v"'),
        ([], False, "webhook response was absent"),
    ]:
        with pytest.raises(CallError, match=message.replace("(", r"\(")):
            verify_answer("u", answer, mutating=mutating)


def test_options_name_the_operation() -> None:
    assert options_for("CREATE", dry_run=True, field_manager="kubectl") == {
        "kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1", "fieldManager": "kubectl",
        "dryRun": ["All"]}
    assert options_for("DELETE", dry_run=False, field_manager="m",
                       delete_options={"propagationPolicy": "Background"})["kind"] == \
        "DeleteOptions"


def test_configuration_defaults() -> None:
    obj: dict[str, Any] = {"webhooks": [{"name": "a.b.c", "rules": [rule()],
                                         "clientConfig": {"service": {"name": "s"}}}]}
    set_defaults(obj, mutating=True)
    hook = obj["webhooks"][0]
    assert (hook["failurePolicy"], hook["matchPolicy"], hook["timeoutSeconds"],
            hook["reinvocationPolicy"], hook["namespaceSelector"], hook["objectSelector"],
            hook["rules"][0]["scope"], hook["clientConfig"]["service"]["port"]) == (
        "Fail", "Equivalent", 10, "Never", {}, {}, "*", 443)


def test_configuration_validation_causes() -> None:
    hook = {"name": "a.b.c", "sideEffects": "None", "admissionReviewVersions": ["v1"],
            "clientConfig": {"service": {"name": "s", "namespace": "n", "path": "x//"}},
            "rules": [rule(resources=["pods/*", "pods/status"], operations=["*", "CREATE"])]}
    causes: dict[str, list[str]] = {}
    for c in validate(TYPES["MutatingWebhookConfiguration"], {"webhooks": [hook, hook]}):
        causes.setdefault(c.field, []).append(c.message)
    assert causes["webhooks[0].clientConfig.service.path"] == [
        'Invalid value: "x//": must start with a \'/\'',
        'Invalid value: "x//": segment[0] may not be empty',
        'Invalid value: "x//": segment[1] may not be empty']
    assert causes["webhooks[0].rules[0].resources[1]"] == [
        "Invalid value: \"pods/status\": if 'pods/*' is present, must not specify pods/status"]
    assert causes["webhooks[0].rules[0].operations"] == [
        'Invalid value: []admissionregistration.OperationType{"*", "CREATE"}: if \'*\' is '
        "present, must not specify other operations"]
    assert causes["webhooks[1].name"] == ['Duplicate value: "a.b.c"']


def slice_(name: str, address: str, port: int, *, ready: bool = True) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/service-name": "hooks"}},
            "ports": [{"name": "https", "port": port}],
            "endpoints": [{"addresses": [address], "conditions": {"ready": ready}}]}


def test_a_service_webhook_dials_a_ready_endpoint_and_names_the_service() -> None:
    svc = {"spec": {"ports": [{"name": "https", "port": 443, "targetPort": 8443}]}}
    slices = [slice_("b", "10.0.0.2", 9443), slice_("a", "10.0.0.1", 8443, ready=False)]
    hooks = WebhookClient(lambda key, ns, name: svc if name == "hooks" else None,
                          lambda key, ns=None: slices)
    target = hooks.target({"service": {"name": "hooks", "namespace": "mesh", "port": 443,
                                       "path": "/inject"}}, 10)
    assert target.url == "https://hooks.mesh.svc:443/inject?timeout=10s"
    assert target.dial_url == "https://10.0.0.2:9443/inject?timeout=10s"
    assert target.server_name == "hooks.mesh.svc"
    with pytest.raises(CallError, match='service "other" not found'):
        hooks.target({"service": {"name": "other", "namespace": "mesh", "port": 443}}, 10)
    slices.pop(0)
    with pytest.raises(CallError, match='no endpoints available for service "hooks"'):
        hooks.target({"service": {"name": "hooks", "namespace": "mesh", "port": 443}}, 10)


class FakeStore:
    def __init__(self, **configs: list[dict[str, Any]]) -> None:
        self.configs = configs

    def get(self, key: tuple[str, str], ns: str, name: str) -> dict[str, Any] | None:
        return {"metadata": {"name": name, "labels": {}}} if key == ("", "namespaces") else None

    def items(self, key: tuple[str, str], ns: str | None = None) -> list[dict[str, Any]]:
        return self.configs.get(key[1], [])

    def count(self, key: tuple[str, str]) -> int:
        return len(self.configs.get(key[1], []))


class FakeClient(WebhookClient):
    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[dict[str, Any]] = []

    async def post(self, client_config: Any, review: Any, *, timeout: int) -> Any:
        self.calls.append({**review["request"], "url": client_config["url"]})
        response = self.answer(self.calls[-1])
        return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "response": {"uid": review["request"]["uid"], **response}}


def webhooks_with(client_: FakeClient, **configs: list[dict[str, Any]]) -> Any:
    from localcluster.catalog import Catalog
    from localcluster.webhooks import Webhooks

    return Webhooks(FakeStore(**configs), Catalog(),  # type: ignore[arg-type]
                    present=lambda rt, obj: dict(obj), decode=lambda rt, body: dict(body),
                    client=client_)


def config(name: str, *hooks: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name}, "webhooks": list(hooks)}


def hook(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "sideEffects": "None", "rules": [rule()],
            "clientConfig": {"url": "https://h"}, **kw}


def test_dry_run_is_refused_for_webhooks_with_side_effects() -> None:
    import asyncio

    fake = FakeClient(lambda r: {"allowed": True})
    hooks = webhooks_with(fake, validatingwebhookconfigurations=[
        config("c", hook("some.example.com", sideEffects="Some"))])
    dry = Attributes(PODS, "CREATE", "d", "x", dry_run=True)
    with pytest.raises(Exception, match=r'admission webhook "some\.example\.com" does not '
                                        r"support dry run") as err:
        asyncio.run(hooks.validate(dry, {"metadata": {"name": "x"}}, None))
    assert getattr(err.value, "code", None) == 400 and not fake.calls


def test_configurations_run_in_name_order_and_reinvoke_once() -> None:
    import asyncio

    def answer(request: dict[str, Any]) -> dict[str, Any]:
        if request["url"] != "https://labeller" or request["object"]["metadata"].get("labels"):
            return {"allowed": True}
        ops = [{"op": "add", "path": "/metadata/labels", "value": {"b": "1"}}]
        return {"allowed": True, "patchType": "JSONPatch",
                "patch": base64.b64encode(json.dumps(ops).encode()).decode()}

    fake = FakeClient(answer)
    hooks = webhooks_with(fake, mutatingwebhookconfigurations=[
        config("z-last", hook("z.example.com", clientConfig={"url": "https://labeller"})),
        config("a-first", hook("a.example.com", reinvocationPolicy="IfNeeded",
                               clientConfig={"url": "https://watcher"}),
               hook("n.example.com", clientConfig={"url": "https://never"})),
    ])
    obj, _ = asyncio.run(hooks.mutate(attrs(), {"metadata": {"name": "x"}, "spec": {}}, None))
    # a-first's two webhooks in order, then z-last, which changes the object: the IfNeeded
    # webhook called before it runs once more, and sees the change; the Never one does not
    assert [c["url"] for c in fake.calls] == [
        "https://watcher", "https://never", "https://labeller", "https://watcher"]
    assert fake.calls[-1]["object"]["metadata"]["labels"] == {"b": "1"}
    assert obj["metadata"]["labels"] == {"b": "1"}


def test_the_store_lock_is_taken_back_even_when_cancelled() -> None:
    """Webhooks run with the store's lock released; a request cancelled while waiting to take
    it back still takes it, so its ``async with`` never releases another write's hold."""
    import asyncio

    from localcluster.registry import _reacquire

    async def scenario() -> None:
        lock = asyncio.Lock()
        await lock.acquire()  # another write holds it
        task = asyncio.create_task(_reacquire(lock))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.sleep(0)
        assert not task.done()
        lock.release()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert lock.locked()

    asyncio.run(scenario())
