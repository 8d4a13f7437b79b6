"""A Link's credentials: the Secret (type ``mirror.meshgate.io/remote-kubeconfig``,
key ``kubeconfig``) that holds a kubeconfig for the linked cluster, turned into
a kubernetes ApiClient, and the remote API's verdict on it.

Everything that can be wrong is a `CredentialsError` whose `reason` the Link's
CredentialsValid condition carries and whose message says what to do; a remote
API that cannot be reached at all is a `RemoteUnreachable` instead, since it
says nothing about the credential. These functions block: call them from a
thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException

from mesh.kube import first_line, root_cause
from mesh.workqueue import TemporaryError
from mirror.errors import CredentialsError, RemoteUnreachable
from mirror.link import CREDENTIALS_SECRET_KEY, CREDENTIALS_SECRET_TYPE

VERIFY_TIMEOUT = (3.0, 5.0)
"""(connect, read) seconds for the call that checks a credential."""
SECRET_FIX = "apply the Secret printed by `meshgate multicluster link` for that cluster again"


@dataclass(frozen=True)
class RemoteCredentials:
    client: client.ApiClient
    server: str
    fingerprint: str
    """Changes whenever the Secret's kubeconfig does."""


def read_secret(core: Any, namespace: str, name: str) -> dict[str, Any]:
    """The credentials Secret from the local cluster; raises `CredentialsError`
    when it is not there, `TemporaryError` when the local API fails."""
    try:
        resp = core.read_namespaced_secret(name, namespace, _preload_content=False)
    except ApiException as e:
        if e.status == 404:
            raise CredentialsError(f"credentials Secret {namespace}/{name} does not exist; "
                                   f"{SECRET_FIX}", reason="SecretNotFound") from e
        raise TemporaryError(f"cannot read Secret {namespace}/{name}: {e.status} {e.reason}"
                             ) from e
    except urllib3.exceptions.HTTPError as e:
        raise TemporaryError(f"cannot read Secret {namespace}/{name}: the local API cannot be "
                             f"reached: {first_line(root_cause(e))}") from e
    body: dict[str, Any] = json.loads(resp.data)
    return body


def credentials_from_secret(secret: Mapping[str, Any]) -> RemoteCredentials:
    """An ApiClient for the kubeconfig in `secret`; raises `CredentialsError`."""
    meta = secret.get("metadata") or {}
    where = f"credentials Secret {meta.get('namespace')}/{meta.get('name')}"
    if secret.get("type") != CREDENTIALS_SECRET_TYPE:
        raise CredentialsError(f"{where} has type {secret.get('type')!r}, not "
                               f"{CREDENTIALS_SECRET_TYPE}; {SECRET_FIX}", reason="SecretWrongType")
    raw = (secret.get("data") or {}).get(CREDENTIALS_SECRET_KEY)
    if not raw:
        raise CredentialsError(f"{where} has no {CREDENTIALS_SECRET_KEY!r} key; {SECRET_FIX}",
                               reason="SecretMalformed")
    try:
        text = base64.b64decode(raw, validate=True).decode()
        doc = yaml.safe_load(text)
    except (binascii.Error, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CredentialsError(f"{where}: its {CREDENTIALS_SECRET_KEY!r} is not a kubeconfig "
                               f"({first_line(e)}); {SECRET_FIX}", reason="SecretMalformed") from e
    if not isinstance(doc, dict) or not doc.get("clusters") or not doc.get("users"):
        raise CredentialsError(f"{where}: its {CREDENTIALS_SECRET_KEY!r} is not a kubeconfig "
                               f"(it needs clusters, users and contexts); {SECRET_FIX}",
                               reason="SecretMalformed")
    for user in doc.get("users") or []:
        spec = (user or {}).get("user") or {}
        # A Secret must not make the controller run programs or read plugin state.
        if "exec" in spec or "auth-provider" in spec:
            raise CredentialsError(f"{where}: its kubeconfig uses exec or auth-provider "
                                   "credentials, which the mirror does not run; use a token "
                                   "or client certificate", reason="SecretMalformed")
    try:
        api = config.new_client_from_config_dict(doc, persist_config=False)
    except (ConfigException, KeyError, TypeError, ValueError) as e:
        raise CredentialsError(f"{where}: its kubeconfig cannot be used ({first_line(e)}); "
                               f"{SECRET_FIX}", reason="SecretMalformed") from e
    return RemoteCredentials(api, str(api.configuration.host), fingerprint(secret))


def fingerprint(secret: Mapping[str, Any]) -> str:
    """A digest of the Secret's kubeconfig: equal digests, same credential."""
    raw = str((secret.get("data") or {}).get(CREDENTIALS_SECRET_KEY) or "")
    return hashlib.sha256(f"{secret.get('type')}\n{raw}".encode()).hexdigest()[:16]


def verify(creds: RemoteCredentials, *, label_selector: str, secret: str) -> None:
    """Ask the remote API for one Service, as the mirror will; raises
    `CredentialsError` when the credential is refused, `RemoteUnreachable` when
    the API cannot be reached."""
    api: Any = client.CoreV1Api(creds.client)
    try:
        resp = api.list_service_for_all_namespaces(limit=1, label_selector=label_selector,
                                                   _preload_content=False,
                                                   _request_timeout=VERIFY_TIMEOUT)
        resp.release_conn()
    except ApiException as e:
        raise classify(e, server=creds.server, secret=secret) from e
    except urllib3.exceptions.HTTPError as e:
        raise classify(e, server=creds.server, secret=secret) from e


def classify(e: Exception, *, server: str, secret: str) -> CredentialsError | RemoteUnreachable:
    """The Link condition an error of the remote API means."""
    if isinstance(e, ApiException):
        if e.status == 401:
            return CredentialsError(
                f"the remote API at {server} refused the credential in Secret {secret} "
                f"(401 Unauthorized): it has expired or been revoked; {SECRET_FIX}",
                reason="CredentialsRejected")
        if e.status == 403:
            return CredentialsError(
                f"the credential in Secret {secret} may not list Services at {server} "
                "(403 Forbidden); it needs get, list and watch on services", reason=
                "CredentialsForbidden")
        return RemoteUnreachable(f"the remote API at {server} answered {e.status} {e.reason}")
    cause = root_cause(e)
    if isinstance(cause, ssl.SSLCertVerificationError):
        return CredentialsError(
            f"the remote API at {server} is not the one the kubeconfig in Secret {secret} "
            f"trusts ({first_line(cause)}); {SECRET_FIX}", reason="RemoteCertificateInvalid")
    return RemoteUnreachable(f"the remote API at {server} cannot be reached: "
                             f"{first_line(cause)}")
