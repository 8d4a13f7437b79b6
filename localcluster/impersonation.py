"""Impersonation: a caller acting as another user, as kube-apiserver's
impersonation filter allows it.

The ``Impersonate-User``, ``Impersonate-Group``, ``Impersonate-Uid`` and
``Impersonate-Extra-<key>`` headers each ask for one thing, and each is
authorized for the caller with RBAC's ``impersonate`` verb on ``users``,
``groups``, ``serviceaccounts`` (in the ServiceAccount's namespace),
``uids`` or ``userextras/<key>`` (the last two in ``authentication.k8s.io``),
the asked-for value being the resource name. The first one refused answers
403 with kube's wording; when all are allowed, the request goes on as the
impersonated user, whose groups are built as kube builds them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

from multidict import CIMultiDictProxy

from localcluster.auth import Attributes, User, forbidden_message
from localcluster.errors import ApiError

USER_HEADER = "Impersonate-User"
GROUP_HEADER = "Impersonate-Group"
UID_HEADER = "Impersonate-Uid"
EXTRA_PREFIX = "impersonate-extra-"
AUTHN_GROUP = "authentication.k8s.io"
AUTHN_VERSION = "authentication.k8s.io/v1"
SA_PREFIX = "system:serviceaccount:"
ANONYMOUS_NAME = "system:anonymous"
AUTHENTICATED = "system:authenticated"
UNAUTHENTICATED = "system:unauthenticated"

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@dataclass(frozen=True)
class _Ask:
    """One thing asked for; shaped like the ObjectReference kube builds for it."""

    kind: str
    name: str
    namespace: str = ""
    api_version: str = ""
    field_path: str = ""

    def go_repr(self) -> str:
        # Go's %v of a core/v1 ObjectReference, which kube puts in its error text.
        return "{" + " ".join((self.kind, self.namespace, self.name, "", self.api_version, "",
                               self.field_path)) + "}"


class ImpersonationRequestError(Exception):
    """Headers asking for groups, uid or extras without a user (kube answers 500)."""


def split_service_account(username: str) -> tuple[str, str] | None:
    """(namespace, name) of a ServiceAccount username, None for any other user."""
    if not username.startswith(SA_PREFIX):
        return None
    parts = username[len(SA_PREFIX):].split(":")
    if len(parts) != 2:
        return None
    ns, name = parts
    if not (len(ns) <= 63 and _DNS_LABEL.fullmatch(ns)):
        return None
    if not (len(name) <= 253 and _DNS_SUBDOMAIN.fullmatch(name)):
        return None
    return ns, name


def _asks(headers: CIMultiDictProxy[str]) -> list[_Ask]:
    asks: list[_Ask] = []
    user = headers.get(USER_HEADER, "")
    if user:
        sa = split_service_account(user)
        asks.append(_Ask("ServiceAccount", sa[1], sa[0]) if sa else _Ask("User", user))
    groups = headers.getall(GROUP_HEADER, [])
    asks += [_Ask("Group", g) for g in groups]
    extras = sorted({h.lower() for h in headers if h.lower().startswith(EXTRA_PREFIX)})
    for header in extras:
        key = unquote(header[len(EXTRA_PREFIX):])
        asks += [_Ask("UserExtra", v, api_version=AUTHN_VERSION, field_path=key)
                 for v in headers.getall(header)]
    uid = headers.get(UID_HEADER, "")
    if uid:
        asks.append(_Ask("UID", uid, api_version=AUTHN_VERSION))
    if (groups or extras or uid) and not user:
        raise ImpersonationRequestError(
            "requested [" + " ".join(a.go_repr() for a in asks) + "] without impersonating a "
            "user")
    return asks


def impersonate(headers: CIMultiDictProxy[str], requestor: User,
                allowed: Callable[[User, Attributes], bool]) -> User:
    """The user a request acts as: ``requestor`` itself without impersonation headers, the
    impersonated user when ``requestor`` may impersonate everything asked for.

    Raises `ImpersonationRequestError` for headers kube cannot read and `ApiError`
    (403) for the first thing the requestor may not impersonate."""
    asks = _asks(headers)
    if not asks:
        return requestor
    groups_given = GROUP_HEADER in headers
    username, uid = "", ""
    groups: list[str] = []
    extra: dict[str, list[str]] = {}
    for ask in asks:
        if ask.kind == "ServiceAccount":
            attrs = Attributes("impersonate", "", "serviceaccounts", namespace=ask.namespace,
                               name=ask.name)
            username = f"{SA_PREFIX}{ask.namespace}:{ask.name}"
            if not groups_given:
                groups = ["system:serviceaccounts", f"system:serviceaccounts:{ask.namespace}"]
        elif ask.kind == "User":
            attrs = Attributes("impersonate", "", "users", name=ask.name)
            username = ask.name
        elif ask.kind == "Group":
            attrs = Attributes("impersonate", "", "groups", name=ask.name)
            groups.append(ask.name)
        elif ask.kind == "UserExtra":
            attrs = Attributes("impersonate", AUTHN_GROUP, "userextras",
                               subresource=ask.field_path, name=ask.name)
            extra.setdefault(ask.field_path, []).append(ask.name)
        else:
            attrs = Attributes("impersonate", AUTHN_GROUP, "uids", name=ask.name)
            uid = ask.name
        if not allowed(requestor, attrs):
            raise ApiError.forbidden(forbidden_message(requestor, attrs), group=attrs.group,
                                     kind=attrs.resource, name=attrs.name)
    if username != ANONYMOUS_NAME:
        if AUTHENTICATED not in groups and UNAUTHENTICATED not in groups:
            groups.append(AUTHENTICATED)
    elif UNAUTHENTICATED not in groups:
        groups.append(UNAUTHENTICATED)
    return User(username, uid=uid, groups=tuple(groups), extra=extra)


def internal_error_text(request_uri: str, message: str) -> str:
    """kube's ``responsewriters.InternalError`` body: http.Error of a text with ``&<>``
    escaped so that it cannot pass for HTML (quotes are kept)."""
    text = f'Internal Server Error: "{request_uri}": {message}'
    for raw, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;")):
        text = text.replace(raw, escaped)
    return text + "\n"
