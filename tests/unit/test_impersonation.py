"""Impersonation headers turned into the acting user, each part authorized."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from localcluster.auth import Attributes, User
from localcluster.errors import ApiError
from localcluster.impersonation import (
    ImpersonationRequestError,
    impersonate,
    split_service_account,
)

CALLER = User("ops", groups=("system:authenticated",))


def _headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


class Recorder:
    def __init__(self, deny: set[str] | None = None) -> None:
        self.asked: list[Attributes] = []
        self.deny = deny or set()

    def __call__(self, user: User, attrs: Attributes) -> bool:
        assert user is CALLER
        self.asked.append(attrs)
        return attrs.name not in self.deny


def test_no_headers_keeps_the_caller() -> None:
    assert impersonate(_headers(), CALLER, Recorder()) is CALLER


def test_service_account_gets_its_groups() -> None:
    rec = Recorder()
    user = impersonate(_headers(("Impersonate-User", "system:serviceaccount:ns1:bot")),
                       CALLER, rec)
    assert user == User("system:serviceaccount:ns1:bot", groups=(
        "system:serviceaccounts", "system:serviceaccounts:ns1", "system:authenticated"))
    assert rec.asked == [Attributes("impersonate", "", "serviceaccounts", namespace="ns1",
                                    name="bot")]


def test_everything_at_once() -> None:
    rec = Recorder()
    user = impersonate(_headers(
        ("Impersonate-User", "alice"), ("Impersonate-Group", "a"), ("Impersonate-Group", "b"),
        ("Impersonate-Uid", "u1"), ("Impersonate-Extra-Scopes", "x"),
        ("impersonate-extra-scopes", "y"), ("Impersonate-Extra-Example.com%2Fkey", "v")),
        CALLER, rec)
    assert user.name == "alice" and user.uid == "u1"
    assert user.groups == ("a", "b", "system:authenticated")
    assert user.extra == {"example.com/key": ["v"], "scopes": ["x", "y"]}
    assert [(a.group, a.resource, a.subresource, a.name) for a in rec.asked] == [
        ("", "users", "", "alice"), ("", "groups", "", "a"), ("", "groups", "", "b"),
        ("authentication.k8s.io", "userextras", "example.com/key", "v"),
        ("authentication.k8s.io", "userextras", "scopes", "x"),
        ("authentication.k8s.io", "userextras", "scopes", "y"),
        ("authentication.k8s.io", "uids", "", "u1")]


@pytest.mark.parametrize(("groups", "expected"), [
    (["system:unauthenticated"], ("system:unauthenticated",)),
    (["system:authenticated", "x"], ("system:authenticated", "x")),
])
def test_authenticated_group_added_only_when_absent(groups: list[str],
                                                    expected: tuple[str, ...]) -> None:
    user = impersonate(_headers(("Impersonate-User", "bob"),
                                *[("Impersonate-Group", g) for g in groups]), CALLER, Recorder())
    assert user.groups == expected


def test_anonymous_is_unauthenticated() -> None:
    user = impersonate(_headers(("Impersonate-User", "system:anonymous")), CALLER, Recorder())
    assert user.groups == ("system:unauthenticated",)


def test_first_refusal_is_kubes_403() -> None:
    with pytest.raises(ApiError) as info:
        impersonate(_headers(("Impersonate-User", "alice"), ("Impersonate-Extra-Scopes", "adm")),
                    CALLER, Recorder(deny={"adm"}))
    err = info.value
    assert err.code == 403
    assert err.message == (
        'userextras.authentication.k8s.io "adm" is forbidden: User "ops" cannot impersonate '
        'resource "userextras/scopes" in API group "authentication.k8s.io" at the cluster scope')
    assert err.status()["details"] == {"name": "adm", "group": "authentication.k8s.io",
                                       "kind": "userextras"}


def test_groups_without_user() -> None:
    with pytest.raises(ImpersonationRequestError) as info:
        impersonate(_headers(("Impersonate-Group", "g"), ("Impersonate-Uid", "1")), CALLER,
                    Recorder())
    assert str(info.value) == ("requested [{Group  g    } {UID  1  authentication.k8s.io/v1  }] "
                               "without impersonating a user")


@pytest.mark.parametrize(("name", "expected"), [
    ("system:serviceaccount:ns:sa", ("ns", "sa")),
    ("system:serviceaccount:ns:sa.with.dots", ("ns", "sa.with.dots")),
    ("system:serviceaccount:ns", None),
    ("system:serviceaccount:ns:a:b", None),
    ("system:serviceaccount:Bad:sa", None),
    ("alice", None),
])
def test_split_service_account(name: str, expected: tuple[str, str] | None) -> None:
    assert split_service_account(name) == expected
