"""VM join tokens: opaque, single-use, short-lived proofs that let one VM obtain
the identity of one ExternalWorkload's ServiceAccount.

A token reads ``mgjoin.<namespace>.<id>.<secret>``. Only a SHA-256 hash of the
secret part is stored, in a Secret named ``meshgate-join-<id>`` in that
namespace. Redeeming deletes that Secret with uid and resourceVersion
preconditions, so of two concurrent redemptions exactly one succeeds: the
API server lets only one delete of that exact object version through.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from mesh.errors import IdentityError

PREFIX = "mgjoin"
SECRET_TYPE = "meshgate.io/join-token"
NAME_PREFIX = "meshgate-join-"
LABEL = "meshgate.io/join-token"
WORKLOAD_LABEL = "meshgate.io/workload"


class JoinTokenRefused(IdentityError):
    """A join token cannot be redeemed; ``reason`` is a short code for metrics."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Grant:
    """What a redeemed token entitles its bearer to."""

    namespace: str
    workload: str
    service_account: str


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def mint(core: client.CoreV1Api, *, namespace: str, workload: str, service_account: str,
         ttl: dt.timedelta, clock: Callable[[], float] = time.time) -> tuple[str, dt.datetime]:
    """Create the stored half of a new token; return the token and its expiry."""
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    expires = dt.datetime.fromtimestamp(clock(), dt.UTC) + ttl
    core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name=NAME_PREFIX + token_id,
                                     labels={LABEL: "true", WORKLOAD_LABEL: workload}),
        type=SECRET_TYPE,
        data={"tokenHash": _b64(_hash(secret)), "workload": _b64(workload),
              "serviceAccount": _b64(service_account),
              "expiresAt": _b64(expires.strftime("%Y-%m-%dT%H:%M:%SZ"))}))
    return f"{PREFIX}.{namespace}.{token_id}.{secret}", expires


def is_join_token(token: str) -> bool:
    return token.startswith(PREFIX + ".")


def _field(data: dict[str, Any], key: str) -> str:
    return base64.b64decode(data.get(key, "")).decode()


def redeem(core: client.CoreV1Api, token: str, *,
           clock: Callable[[], float] = time.time) -> Grant:
    """Consume ``token`` once; raises JoinTokenRefused saying why it cannot be used."""
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != PREFIX:
        raise JoinTokenRefused("the join token is malformed; mint a new one with "
                               "`meshgate vm token`", reason="malformed-token")
    _, namespace, token_id, secret = parts
    name = NAME_PREFIX + token_id
    try:
        stored = core.read_namespaced_secret(name, namespace)
    except ApiException as e:
        if e.status == 404:
            raise JoinTokenRefused(f"join token {token_id} is unknown or was already used; "
                                   "mint a new one with `meshgate vm token`",
                                   reason="token-used") from e
        raise
    data = stored.data or {}
    meta = stored.metadata or client.V1ObjectMeta()
    uid, rv = meta.uid or "", meta.resource_version or ""
    if stored.type != SECRET_TYPE or not hmac.compare_digest(
            _field(data, "tokenHash"), _hash(secret)):
        raise JoinTokenRefused(f"join token {token_id} does not match its record",
                               reason="invalid-token")
    expires = dt.datetime.strptime(_field(data, "expiresAt"), "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=dt.UTC)
    if dt.datetime.fromtimestamp(clock(), dt.UTC) >= expires:
        _delete(core, name, namespace, uid, rv)
        raise JoinTokenRefused(f"join token {token_id} expired at "
                               f"{expires:%Y-%m-%dT%H:%M:%SZ}; mint a new one with "
                               "`meshgate vm token`", reason="token-expired")
    if not _delete(core, name, namespace, uid, rv):
        raise JoinTokenRefused(f"join token {token_id} was already used",
                               reason="token-used")
    return Grant(namespace, _field(data, "workload"), _field(data, "serviceAccount"))


def _delete(core: client.CoreV1Api, name: str, namespace: str, uid: str, rv: str) -> bool:
    """Delete exactly this version of the record; False when someone else got there first."""
    try:
        core.delete_namespaced_secret(name, namespace, body=client.V1DeleteOptions(
            preconditions=client.V1Preconditions(uid=uid, resource_version=rv)))
    except ApiException as e:
        if e.status in (404, 409):
            return False
        raise
    return True
