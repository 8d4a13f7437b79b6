"""VM join tokens: opaque, single-use, short-lived proofs that let one VM obtain
the identity of one ExternalWorkload's ServiceAccount.

A token reads ``mgjoin.<namespace>.<service-account>.<id>.<secret>``: the VM
learns from it which identity to ask for, and the rest stays a secret. Only a
SHA-256 hash of the secret part is stored, in a Secret named
``meshgate-join-<id>`` in that namespace. Redeeming deletes that Secret with
uid and resourceVersion preconditions, so of two concurrent redemptions exactly
one succeeds: the API server lets only one delete of that exact object version
through.

The record may also name the VM agent's API credential (`AgentAccess`: a
ServiceAccount token Secret whose Role reaches one ExternalWorkload, the API
server's address as the VM reaches it, and its CA). Redeeming hands that
credential to the VM once, with its first certificate, so the join command
line carries nothing but the token.
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
class AgentAccess:
    """How a joined VM's agent reaches the API server, limited to its ExternalWorkload."""

    server: str
    """https://HOST:PORT of the API server, as the VM reaches it."""
    token: str
    certificate_authority: str
    """PEM of the CA that signs the API server's certificate ("" when it has a public one)."""


@dataclass(frozen=True)
class Grant:
    """What a redeemed token entitles its bearer to."""

    namespace: str
    workload: str
    service_account: str
    agent: AgentAccess | None = None


@dataclass(frozen=True)
class TokenParts:
    """What a token says in the clear."""

    namespace: str
    service_account: str
    token_id: str
    secret: str


def parse(token: str) -> TokenParts:
    """Split a token; JoinTokenRefused (malformed-token) when it is not one."""
    parts = token.strip().split(".")
    # ServiceAccount names may hold dots; the id and the secret never do.
    if len(parts) < 5 or parts[0] != PREFIX or not all(parts):
        raise JoinTokenRefused("the join token is malformed (it reads mgjoin.<namespace>."
                               "<service-account>.<id>.<secret>); copy it again or mint a "
                               "new one with `meshgate vm token`", reason="malformed-token")
    return TokenParts(parts[1], ".".join(parts[2:-2]), parts[-2], parts[-1])


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class AgentCredential:
    """Where `redeem` finds the agent's credential: a ServiceAccount token Secret."""

    secret: str
    """The Secret (type kubernetes.io/service-account-token) in the token's namespace."""
    server: str
    certificate_authority: str = ""


def mint(core: client.CoreV1Api, *, namespace: str, workload: str, service_account: str,
         ttl: dt.timedelta, agent: AgentCredential | None = None,
         clock: Callable[[], float] = time.time) -> tuple[str, dt.datetime]:
    """Create the stored half of a new token; return the token and its expiry."""
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    expires = dt.datetime.fromtimestamp(clock(), dt.UTC) + ttl
    data = {"tokenHash": _b64(_hash(secret)), "workload": _b64(workload),
            "serviceAccount": _b64(service_account),
            "expiresAt": _b64(expires.strftime("%Y-%m-%dT%H:%M:%SZ"))}
    if agent is not None:
        data.update(agentSecret=_b64(agent.secret), apiServer=_b64(agent.server),
                    apiCertificateAuthority=_b64(agent.certificate_authority))
    core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name=NAME_PREFIX + token_id,
                                     labels={LABEL: "true", WORKLOAD_LABEL: workload}),
        type=SECRET_TYPE, data=data))
    return f"{PREFIX}.{namespace}.{service_account}.{token_id}.{secret}", expires


def is_join_token(token: str) -> bool:
    return token.startswith(PREFIX + ".")


def _field(data: dict[str, Any], key: str) -> str:
    return base64.b64decode(data.get(key, "")).decode()


def redeem(core: client.CoreV1Api, token: str, *,
           clock: Callable[[], float] = time.time) -> Grant:
    """Consume ``token`` once; raises JoinTokenRefused saying why it cannot be used."""
    parts = parse(token)
    namespace, token_id, secret = parts.namespace, parts.token_id, parts.secret
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
            _field(data, "tokenHash"), _hash(secret)) or \
            _field(data, "serviceAccount") != parts.service_account:
        raise JoinTokenRefused(f"join token {token_id} does not match its record",
                               reason="invalid-token")
    expires = dt.datetime.strptime(_field(data, "expiresAt"), "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=dt.UTC)
    if dt.datetime.fromtimestamp(clock(), dt.UTC) >= expires:
        _delete(core, name, namespace, uid, rv)
        raise JoinTokenRefused(f"join token {token_id} expired at "
                               f"{expires:%Y-%m-%dT%H:%M:%SZ}; mint a new one with "
                               "`meshgate vm token`", reason="token-expired")
    agent = _agent_access(core, namespace, data, token_id) if "agentSecret" in data else None
    if not _delete(core, name, namespace, uid, rv):
        raise JoinTokenRefused(f"join token {token_id} was already used",
                               reason="token-used")
    return Grant(namespace, _field(data, "workload"), _field(data, "serviceAccount"), agent)


def _agent_access(core: client.CoreV1Api, namespace: str, data: dict[str, Any],
                  token_id: str) -> AgentAccess:
    """The credential the record names, read before the token is spent, so that a
    credential deleted meanwhile refuses the join and leaves the token usable."""
    secret = _field(data, "agentSecret")
    try:
        stored = core.read_namespaced_secret(secret, namespace)
    except ApiException as e:
        raise JoinTokenRefused(f"join token {token_id} names the agent credential Secret "
                               f"{namespace}/{secret}, which cannot be read ({e.status} "
                               f"{e.reason}); run `meshgate vm token` again",
                               reason="no-agent-credential") from e
    token = _field(stored.data or {}, "token")
    if not token:
        raise JoinTokenRefused(f"Secret {namespace}/{secret} holds no token yet; the "
                               "cluster fills in ServiceAccount token Secrets: check that "
                               "its type is kubernetes.io/service-account-token",
                               reason="no-agent-credential")
    return AgentAccess(_field(data, "apiServer"), token,
                       _field(data, "apiCertificateAuthority"))


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
