"""Enrollment: the VM's first certificate, in exchange for its join token.

The key is made on the VM and never leaves it. The control plane is verified
by the trust anchor the operator handed over and by the identity service's
name, so an address typed wrong, or a machine in between, is caught before
the token is sent. An unreachable control plane is retried with doubling
waits until the deadline; a refusal (a used, expired or wrong token) is not,
since asking again would get the same answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh import https
from mesh.errors import IdentityError
from mesh.identity import ca, jointoken
from mesh.identity.bundle import TrustBundle
from mesh.identity.names import DEFAULT_CONTROL_NS, Identity, service_identity
from vm_agent.state import AgentError

log = logging.getLogger(__name__)

FIRST_WAIT = 0.5
LONGEST_WAIT = 10.0


class Unreachable(AgentError):
    """The control plane did not answer before the deadline."""


@dataclass(frozen=True)
class Anchors:
    """The trust anchor file given to `vm join`, and the trust domain it names."""

    path: Path
    pem: bytes
    trust_domain: str

    @classmethod
    def load(cls, path: Path) -> Anchors:
        try:
            pem = path.read_bytes()
        except OSError as e:
            raise AgentError(f"cannot read the trust anchor {path}: {e.strerror or e}") from e
        try:
            bundle = TrustBundle.from_pem(pem)
        except IdentityError as e:
            raise AgentError(f"{path} is not a trust anchor: {e}") from e
        domains = {ca.anchor_trust_domain(a) for a in bundle.anchors}
        domains.discard("")
        if len(domains) != 1:
            raise AgentError(f"{path} names no single trust domain (found "
                             f"{sorted(domains) or 'none'}); give the trust-bundle.pem that "
                             "`meshgate identity init` wrote for the cluster")
        return cls(path, pem, domains.pop())


@dataclass(frozen=True)
class Enrolled:
    """What the control plane answered the join token with."""

    identity: Identity
    chain_pem: bytes
    key_pem: bytes
    bundle_pem: bytes
    namespace: str
    workload: str
    agent: jointoken.AgentAccess | None


def identity_of(token: str, anchors: Anchors) -> Identity:
    """The identity `token` is for, as it says in the clear."""
    try:
        parts = jointoken.parse(token)
        return Identity(parts.namespace, parts.service_account, anchors.trust_domain,
                        DEFAULT_CONTROL_NS)
    except IdentityError as e:
        raise AgentError(str(e)) from e


async def enroll(control_plane: str, token: str, anchors: Anchors, *, deadline: float,
                 clock: Any = time.monotonic) -> Enrolled:
    """Redeem `token` for a certificate, retrying an unreachable control plane until
    `deadline` (on `clock`)."""
    identity = identity_of(token, anchors)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = ca.make_csr(key, identity).public_bytes(serialization.Encoding.PEM).decode()
    server = service_identity(anchors.trust_domain, identity.control_ns).dns_name
    ctx = ssl.create_default_context(cadata=anchors.pem.decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    wait, since = FIRST_WAIT, None
    while True:
        try:
            status, doc = await _post(control_plane, ctx, server, {"csr": csr, "token": token})
            break
        except ssl.SSLCertVerificationError as e:
            raise AgentError(
                f"the control plane at {control_plane} is not trusted: "
                f"{e.verify_message}; it must present {server} under the trust anchor in "
                f"{anchors.path}. Check that {anchors.path} is the trust-bundle.pem of the "
                "cluster that minted the token") from e
        except (OSError, TimeoutError, ssl.SSLError, https.ResponseError) as e:
            since = since or time.strftime("%H:%M:%S")
            cause = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if clock() + wait > deadline:
                raise Unreachable(f"control plane {control_plane} unreachable since {since}: "
                                  f"{cause}; check the address and that this VM can reach "
                                  "it (firewall, route)") from e
            log.warning("control plane unreachable url=%s cause=%s retry_in=%.1fs",
                        control_plane, cause, wait)
            await asyncio.sleep(wait)
            wait = min(wait * 2, LONGEST_WAIT)
    if status != 200:
        raise AgentError(f"the control plane refused the join token ({status} "
                         f"{doc.get('error', '?')}): {doc.get('message', '')}")
    return _enrolled(identity, doc, key)


async def _post(url: str, ctx: ssl.SSLContext, server: str, body: dict[str, str]
                ) -> tuple[int, dict[str, Any]]:
    resp = await https.request(url, "POST", "/v1/certify", context=ctx,
                               server_hostname=server, timeout=10.0, body=body)
    try:
        text = (await resp.read()).decode(errors="replace")
    finally:
        await resp.close()
    try:
        doc = json.loads(text)
    except ValueError:
        doc = {"message": text[:200]}
    return resp.status, doc if isinstance(doc, dict) else {}


def _enrolled(identity: Identity, doc: dict[str, Any], key: ec.EllipticCurvePrivateKey
              ) -> Enrolled:
    workload = doc.get("workload") or {}
    agent = doc.get("agent")
    if not isinstance(workload, dict) or not workload.get("name"):
        raise AgentError("the control plane issued a certificate but named no "
                         "ExternalWorkload; the token was not minted by `meshgate vm token`")
    access = None
    if isinstance(agent, dict) and agent.get("token"):
        access = jointoken.AgentAccess(str(agent.get("server", "")), str(agent["token"]),
                                       str(agent.get("certificateAuthority", "")))
    return Enrolled(identity, str(doc["chain"]).encode(), ca.key_pem(key),
                    str(doc.get("trustBundle") or "").encode(), str(workload["namespace"]),
                    str(workload["name"]), access)
