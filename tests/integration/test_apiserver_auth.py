"""Authentication (admin, ServiceAccount tokens) and RBAC enforcement."""

from __future__ import annotations

import base64
import json
import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.cluster import Cluster, wait_for

AUDIENCE = "identity.meshgate.io"


def _message(e: ApiException) -> str:
    return str(json.loads(e.body)["message"])


def _namespace_with_sa(cluster: Cluster, sa: str = "robot") -> str:
    core = client.CoreV1Api(cluster.api())
    ns = f"a-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": ns}})
    core.create_namespaced_service_account(ns, {"metadata": {"name": sa}})
    return ns


def _token(cluster: Cluster, ns: str, sa: str, audiences: list[str] | None = None,
           seconds: int = 3600) -> str:
    core = client.CoreV1Api(cluster.api())
    spec: dict[str, object] = {"expirationSeconds": seconds}
    if audiences is not None:
        spec["audiences"] = audiences
    tr = core.create_namespaced_service_account_token(sa, ns, {"spec": spec})
    return str(tr.status.token)


def _review(cluster: Cluster, token: str, audiences: list[str] | None = None
            ) -> client.V1TokenReview:
    spec: dict[str, object] = {"token": token}
    if audiences:
        spec["audiences"] = audiences
    return client.AuthenticationV1Api(cluster.api()).create_token_review({"spec": spec})


def test_token_request_then_review(cluster: Cluster) -> None:
    ns = _namespace_with_sa(cluster)
    token = _token(cluster, ns, "robot", [AUDIENCE])
    review = _review(cluster, token, [AUDIENCE])
    assert review.status.authenticated is True
    assert review.status.user.username == f"system:serviceaccount:{ns}:robot"
    assert f"system:serviceaccounts:{ns}" in review.status.user.groups
    assert review.status.audiences == [AUDIENCE]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["aud"] == [AUDIENCE] and claims["exp"] - claims["iat"] == 3600


def test_token_review_wrong_audience(cluster: Cluster) -> None:
    ns = _namespace_with_sa(cluster)
    token = _token(cluster, ns, "robot", ["some-other-audience"])
    review = _review(cluster, token, [AUDIENCE])
    assert review.status.authenticated is False
    assert "audiences" in review.status.error


def test_token_review_expired(cluster: Cluster) -> None:
    ns = _namespace_with_sa(cluster)
    token = _token(cluster, ns, "robot", [AUDIENCE])
    claims = jwt.decode(token, options={"verify_signature": False})
    # A token the cluster itself signed, whose lifetime is over.
    claims["iat"] = claims["nbf"] = int(time.time()) - 7200
    claims["exp"] = int(time.time()) - 3600
    key = serialization.load_pem_private_key((cluster.state_dir / "sa.key").read_bytes(), None)
    expired = jwt.encode(claims, key, algorithm="ES256")  # type: ignore[arg-type]
    review = _review(cluster, expired, [AUDIENCE])
    assert review.status.authenticated is False
    assert "expired" in review.status.error
    status, _ = cluster.raw("GET", "/api/v1/namespaces", token=expired)
    assert status == 401


def test_token_review_deleted_service_account(cluster: Cluster) -> None:
    ns = _namespace_with_sa(cluster)
    token = _token(cluster, ns, "robot", [AUDIENCE])
    client.CoreV1Api(cluster.api()).delete_namespaced_service_account("robot", ns)
    review = _review(cluster, token, [AUDIENCE])
    assert review.status.authenticated is False
    assert "deleted" in review.status.error


def test_token_request_too_short_is_invalid(cluster: Cluster) -> None:
    ns = _namespace_with_sa(cluster)
    with pytest.raises(ApiException) as e:
        _token(cluster, ns, "robot", seconds=60)
    assert e.value.status == 422
    assert "spec.expirationSeconds" in _message(e.value)


def test_foreign_and_garbage_tokens_are_401(cluster: Cluster) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    foreign = jwt.encode({"iss": "https://kubernetes.default.svc.test", "sub": "x",
                          "aud": ["x"], "exp": int(time.time()) + 600},
                         ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    for token in (foreign, "garbage"):
        status, body = cluster.raw("GET", "/api/v1/namespaces", token=token)
        assert status == 401 and body["reason"] == "Unauthorized"
    status, _ = cluster.raw("GET", "/healthz", token="garbage")
    assert status == 401
    assert cluster.raw("GET", "/api/v1/namespaces", token="")[0] == 401


def test_rbac_allow_and_deny(cluster: Cluster) -> None:
    ns = _namespace_with_sa(cluster)
    rbac = client.RbacAuthorizationV1Api(cluster.api())
    rbac.create_namespaced_role(ns, {"metadata": {"name": "svc-reader"}, "rules": [
        {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]}]})
    rbac.create_namespaced_role_binding(ns, {
        "metadata": {"name": "svc-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "svc-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": ns}]})
    token = _token(cluster, ns, "robot")
    core = client.CoreV1Api(cluster.api(token=token))
    assert core.list_namespaced_service(ns).items == []

    with pytest.raises(ApiException) as e:
        core.list_namespaced_secret(ns)
    assert e.value.status == 403
    assert (f'secrets is forbidden: User "system:serviceaccount:{ns}:robot" cannot list '
            f'resource "secrets" in API group "" in the namespace "{ns}"') in _message(e.value)

    with pytest.raises(ApiException) as e:
        core.create_namespaced_service(ns, {"metadata": {"name": "x"},
                                            "spec": {"ports": [{"port": 80}]}})
    assert e.value.status == 403

    with pytest.raises(ApiException) as e:
        core.list_namespace()
    assert ('cannot list resource "namespaces" in API group "" at the cluster scope'
            in _message(e.value))

    with pytest.raises(ApiException) as e:
        client.CoordinationV1Api(cluster.api(token=token)).read_namespaced_lease("l", ns)
    assert (f'leases.coordination.k8s.io "l" is forbidden: User "system:serviceaccount:{ns}:'
            f'robot" cannot get resource "leases" in API group "coordination.k8s.io" in the '
            f'namespace "{ns}"') in _message(e.value)

    # Discovery is open to every authenticated user, as in kube's bootstrap policy.
    assert client.CoreV1Api(cluster.api(token=token)).get_api_resources().resources

    review = client.AuthorizationV1Api(cluster.api(token=token)).create_self_subject_access_review(
        {"spec": {"resourceAttributes": {"namespace": ns, "verb": "get",
                                         "resource": "services"}}})
    assert review.status.allowed is True
    review = client.AuthorizationV1Api(cluster.api(token=token)).create_self_subject_access_review(
        {"spec": {"resourceAttributes": {"namespace": ns, "verb": "delete",
                                         "resource": "services"}}})
    assert review.status.allowed is False


def test_service_account_token_secret(cluster: Cluster) -> None:
    ns = _namespace_with_sa(cluster)
    core = client.CoreV1Api(cluster.api())
    core.create_namespaced_secret(ns, {
        "metadata": {"name": "robot-token",
                     "annotations": {"kubernetes.io/service-account.name": "robot"}},
        "type": "kubernetes.io/service-account-token"})
    secret = wait_for(lambda: (s := core.read_namespaced_secret("robot-token", ns)).data and s)
    token = base64.b64decode(secret.data["token"]).decode()
    assert b"BEGIN CERTIFICATE" in base64.b64decode(secret.data["ca.crt"])
    who = client.AuthenticationV1Api(cluster.api(token=token))
    with pytest.raises(ApiException) as e:
        who.create_token_review({"spec": {"token": token}})
    assert e.value.status == 403  # authenticated, but not allowed to review tokens
    core.delete_namespaced_secret("robot-token", ns)
    assert cluster.raw("GET", "/api", token=token)[0] == 401
