"""Impersonation authorized by RBAC's ``impersonate`` verb, and the self reviews
(`kubectl auth whoami`, `kubectl auth can-i --list`) that show its effect."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.cluster import Cluster

RBAC = "rbac.authorization.k8s.io"


def _namespace(cluster: Cluster, *sas: str) -> str:
    core = client.CoreV1Api(cluster.api())
    ns = f"i-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": ns}})
    for sa in sas:
        core.create_namespaced_service_account(ns, {"metadata": {"name": sa}})
    return ns


def _token(cluster: Cluster, ns: str, sa: str) -> str:
    tr = client.CoreV1Api(cluster.api()).create_namespaced_service_account_token(
        sa, ns, {"spec": {}})
    return str(tr.status.token)


def _grant_cluster(cluster: Cluster, name: str, rules: list[dict[str, Any]],
                   subject: dict[str, str]) -> None:
    rbac = client.RbacAuthorizationV1Api(cluster.api())
    rbac.create_cluster_role({"metadata": {"name": name}, "rules": rules})
    rbac.create_cluster_role_binding({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": name},
        "subjects": [subject]})


def _grant_ns(cluster: Cluster, ns: str, name: str, rules: list[dict[str, Any]],
              subject: dict[str, str]) -> None:
    rbac = client.RbacAuthorizationV1Api(cluster.api())
    rbac.create_namespaced_role(ns, {"metadata": {"name": name}, "rules": rules})
    rbac.create_namespaced_role_binding(ns, {
        "metadata": {"name": name},
        "roleRef": {"apiGroup": RBAC, "kind": "Role", "name": name},
        "subjects": [subject]})


def _raw(cluster: Cluster, path: str, headers: dict[str, str] | list[tuple[str, str]],
         token: str | None = None) -> tuple[int, str, str]:
    """(status, Content-Type, body) of a GET with the given extra headers."""
    ctx = ssl.create_default_context(cafile=str(cluster.state_dir / "ca.crt"))
    req = urllib.request.Request(cluster.server + path)
    req.add_header("Authorization", f"Bearer {token or cluster.token}")
    for k, v in headers.items() if isinstance(headers, dict) else headers:
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def test_kubectl_as_service_account_follows_its_rbac(cluster: Cluster) -> None:
    ns = _namespace(cluster, "bot")
    sa = f"system:serviceaccount:{ns}:bot"
    refused = cluster.kubectl(f"--as={sa}", "-n", ns, "create", "configmap", "c1", check=False)
    assert refused.returncode == 1
    assert (f'configmaps is forbidden: User "{sa}" cannot create resource "configmaps" in API '
            f'group "" in the namespace "{ns}"') in refused.stderr
    assert cluster.kubectl("auth", "can-i", f"--as={sa}", "create", "configmaps", "-n", ns,
                           check=False).stdout.strip() == "no"
    _grant_ns(cluster, ns, "cm-writer", [{"apiGroups": [""], "resources": ["configmaps"],
                                          "verbs": ["create", "get"]}],
              {"kind": "ServiceAccount", "name": "bot", "namespace": ns})
    out = cluster.kubectl(f"--as={sa}", "-n", ns, "create", "configmap", "c1")
    assert "configmap/c1 created" in out.stdout
    assert cluster.kubectl("auth", "can-i", f"--as={sa}", "create", "configmaps", "-n",
                           ns).stdout.strip() == "yes"
    assert cluster.kubectl("auth", "can-i", f"--as={sa}", "delete", "configmaps", "-n", ns,
                           check=False).stdout.strip() == "no"
    assert cluster.kubectl("auth", "can-i", f"--as={sa}", "create", "configmaps", "-n",
                           "default", check=False).stdout.strip() == "no"


def test_service_account_groups_grant_rights(cluster: Cluster) -> None:
    ns = _namespace(cluster, "member")
    _grant_ns(cluster, ns, "all-sas-read", [{"apiGroups": [""], "resources": ["secrets"],
                                             "verbs": ["list"]}],
              {"kind": "Group", "name": f"system:serviceaccounts:{ns}"})
    sa = f"system:serviceaccount:{ns}:member"
    assert cluster.kubectl("auth", "can-i", f"--as={sa}", "list", "secrets", "-n",
                           ns).stdout.strip() == "yes"
    # Groups given explicitly replace the ServiceAccount's own.
    assert cluster.kubectl("auth", "can-i", f"--as={sa}", "--as-group=other", "list", "secrets",
                           "-n", ns, check=False).stdout.strip() == "no"


def test_user_without_impersonate_verb_is_refused(cluster: Cluster) -> None:
    ns = _namespace(cluster, "plain", "bot")
    token = _token(cluster, ns, "plain")
    caller = f"system:serviceaccount:{ns}:plain"
    out = cluster.kubectl(f"--token={token}", "--as=alice", "get", "namespaces", check=False)
    assert out.returncode == 1
    assert (f'Error from server (Forbidden): users "alice" is forbidden: User "{caller}" cannot '
            'impersonate resource "users" in API group "" at the cluster scope') in out.stderr
    out = cluster.kubectl(f"--token={token}", f"--as=system:serviceaccount:{ns}:bot", "-n", ns,
                          "get", "configmaps", check=False)
    assert (f'serviceaccounts "bot" is forbidden: User "{caller}" cannot impersonate resource '
            f'"serviceaccounts" in API group "" in the namespace "{ns}"') in out.stderr
    with pytest.raises(ApiException) as e:
        api = cluster.api(token=token)
        api.default_headers["Impersonate-User"] = "alice"
        client.CoreV1Api(api).list_namespace()
    assert e.value.status == 403
    body = json.loads(e.value.body)
    assert body["reason"] == "Forbidden"
    assert body["details"] == {"name": "alice", "kind": "users"}


def test_impersonate_verb_per_resource_name(cluster: Cluster) -> None:
    ns = _namespace(cluster, "boss")
    token = _token(cluster, ns, "boss")
    caller = f"system:serviceaccount:{ns}:boss"
    _grant_cluster(cluster, f"{ns}-imp", [
        {"apiGroups": [""], "resources": ["users"], "verbs": ["impersonate"],
         "resourceNames": ["alice"]},
        {"apiGroups": [""], "resources": ["groups"], "verbs": ["impersonate"],
         "resourceNames": ["devs"]},
        {"apiGroups": ["authentication.k8s.io"], "resources": ["uids"],
         "verbs": ["impersonate"], "resourceNames": ["u-1"]},
        {"apiGroups": ["authentication.k8s.io"], "resources": ["userextras/scopes"],
         "verbs": ["impersonate"], "resourceNames": ["view"]},
    ], {"kind": "ServiceAccount", "name": "boss", "namespace": ns})
    who = json.loads(cluster.kubectl(
        f"--token={token}", "--as=alice", "--as-group=devs", "--as-uid=u-1",
        "auth", "whoami", "-o", "json").stdout)["status"]["userInfo"]
    assert who == {"username": "alice", "uid": "u-1",
                   "groups": ["devs", "system:authenticated"]}
    # (`auth whoami` prints its own text for any 403, so these use `get`.)
    out = cluster.kubectl(f"--token={token}", "--as=bob", "get", "ns", check=False)
    assert f'users "bob" is forbidden: User "{caller}" cannot impersonate' in out.stderr
    out = cluster.kubectl(f"--token={token}", "--as=alice", "--as-group=ops", "get", "ns",
                          check=False)
    assert (f'groups "ops" is forbidden: User "{caller}" cannot impersonate resource "groups" '
            'in API group "" at the cluster scope') in out.stderr
    out = cluster.kubectl(f"--token={token}", "--as=alice", "--as-uid=u-2", "get", "ns",
                          check=False)
    assert (f'uids.authentication.k8s.io "u-2" is forbidden: User "{caller}" cannot '
            'impersonate resource "uids" in API group "authentication.k8s.io" at the cluster '
            'scope') in out.stderr
    status, _, body = _raw(cluster, "/apis/authentication.k8s.io/v1/selfsubjectreviews", [
        ("Impersonate-User", "alice"), ("Impersonate-Extra-Scopes", "admin")], token)
    assert status == 403
    assert (f'userextras.authentication.k8s.io "admin" is forbidden: User "{caller}" cannot '
            'impersonate resource "userextras/scopes" in API group "authentication.k8s.io" at '
            'the cluster scope') == json.loads(body)["message"]


def test_whoami_shows_extras(cluster: Cluster) -> None:
    status, body = _post_whoami(cluster, [("Impersonate-User", "carol"),
                                          ("Impersonate-Extra-Scopes", "view"),
                                          ("Impersonate-Extra-Acme.com%2fteam", "blue")])
    assert status == 201
    info = body["status"]["userInfo"]
    assert info["username"] == "carol"
    assert info["groups"] == ["system:authenticated"]
    assert info["extra"] == {"acme.com/team": ["blue"], "scopes": ["view"]}


def test_impersonating_anonymous_gets_unauthenticated(cluster: Cluster) -> None:
    status, body = _post_whoami(cluster, [("Impersonate-User", "system:anonymous")])
    assert status == 403
    assert body["message"] == (
        'selfsubjectreviews.authentication.k8s.io is forbidden: User "system:anonymous" cannot '
        'create resource "selfsubjectreviews" in API group "authentication.k8s.io" at the '
        "cluster scope")
    _grant_cluster(cluster, "anonymous-whoami", [{
        "apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"],
        "verbs": ["create"]}], {"kind": "Group", "name": "system:unauthenticated"})
    status, body = _post_whoami(cluster, [("Impersonate-User", "system:anonymous")])
    assert status == 201
    assert body["status"]["userInfo"] == {"username": "system:anonymous",
                                          "groups": ["system:unauthenticated"]}


def _post_whoami(cluster: Cluster, headers: list[tuple[str, str]]) -> tuple[int, Any]:
    ctx = ssl.create_default_context(cafile=str(cluster.state_dir / "ca.crt"))
    req = urllib.request.Request(
        cluster.server + "/apis/authentication.k8s.io/v1/selfsubjectreviews", method="POST",
        data=json.dumps({"apiVersion": "authentication.k8s.io/v1",
                         "kind": "SelfSubjectReview"}).encode())
    req.add_header("Authorization", f"Bearer {cluster.token}")
    req.add_header("Content-Type", "application/json")
    for k, v in headers:
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_group_without_user_is_kubes_internal_error(cluster: Cluster) -> None:
    status, ctype, body = _raw(cluster, "/api/v1/namespaces", {"Impersonate-Group": "devs"})
    assert status == 500
    assert ctype.startswith("text/plain")
    assert body == ('Internal Server Error: "/api/v1/namespaces": requested '
                    "[{Group  devs    }] without impersonating a user\n")


def test_whoami(cluster: Cluster) -> None:
    out = cluster.kubectl("auth", "whoami")
    assert out.stdout.split() == ["ATTRIBUTE", "VALUE", "Username", "meshgate-admin", "Groups",
                                  "[system:masters", "system:authenticated]"]
    ns = _namespace(cluster, "me")
    token = _token(cluster, ns, "me")
    who = client.AuthenticationV1Api(cluster.api(token=token)).create_self_subject_review(
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    assert who.status.user_info.username == f"system:serviceaccount:{ns}:me"
    assert who.status.user_info.groups == ["system:serviceaccounts",
                                           f"system:serviceaccounts:{ns}",
                                           "system:authenticated"]
    out = cluster.kubectl("auth", "whoami", f"--as=system:serviceaccount:{ns}:me", "-o", "json")
    assert json.loads(out.stdout)["status"]["userInfo"]["groups"] == who.status.user_info.groups


def test_can_i_list(cluster: Cluster) -> None:
    ns = _namespace(cluster, "lister")
    _grant_ns(cluster, ns, "pods-read", [{"apiGroups": [""], "resources": ["pods"],
                                          "verbs": ["get", "list"], "resourceNames": ["p1"]}],
              {"kind": "ServiceAccount", "name": "lister", "namespace": ns})
    out = cluster.kubectl("auth", "can-i", "--list", "-n", ns,
                          f"--as=system:serviceaccount:{ns}:lister")
    rows = [line.split() for line in out.stdout.splitlines()]
    assert rows[0] == ["Resources", "Non-Resource", "URLs", "Resource", "Names", "Verbs"]
    assert ["pods", "[]", "[p1]", "[get", "list]"] in rows
    assert ["selfsubjectreviews.authentication.k8s.io", "[]", "[]", "[create]"] in rows
    assert ["[/version]", "[]", "[get]"] in rows
    assert not any(r[0] == "*.*" for r in rows)
    # Another namespace: the Role does not apply there.
    out = cluster.kubectl("auth", "can-i", "--list", "-n", "default",
                          f"--as=system:serviceaccount:{ns}:lister")
    assert "pods " not in out.stdout
    admin = cluster.kubectl("auth", "can-i", "--list").stdout.splitlines()
    assert admin[1].split() == ["*.*", "[]", "[]", "[*]"]


def test_rules_review_needs_a_namespace(cluster: Cluster) -> None:
    with pytest.raises(ApiException) as e:
        client.AuthorizationV1Api(cluster.api()).create_self_subject_rules_review(
            {"spec": {}})
    assert e.value.status == 400
    assert json.loads(e.value.body)["message"] == "no namespace on request"
    review = client.AuthorizationV1Api(cluster.api()).create_self_subject_rules_review(
        {"spec": {"namespace": "default"}})
    assert review.status.incomplete is False
    assert review.status.resource_rules[0].verbs == ["*"]


def test_reviews_are_discoverable(cluster: Cluster) -> None:
    out = cluster.kubectl("api-resources", "--api-group=authentication.k8s.io", "-o", "name")
    assert "selfsubjectreviews.authentication.k8s.io" in out.stdout.split()
    out = cluster.kubectl("api-resources", "--api-group=authorization.k8s.io", "-o", "name")
    assert "selfsubjectrulesreviews.authorization.k8s.io" in out.stdout.split()
