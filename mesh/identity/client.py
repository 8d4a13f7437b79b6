"""Talking to the identity service: the HTTPS requester a CertStore renews
through, and the one-shot request behind ``meshgate identity certify``.

The service is verified by the trust bundle and by its identity name (not by
the address dialled), so an address change or a proxy in between cannot
impersonate it.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh import https
from mesh.identity import ca
from mesh.identity.certstore import CertStore, Issued
from mesh.identity.errors import IssuanceRefused, ServiceUnavailable
from mesh.identity.names import Identity, service_identity
from mesh.identity.tls import load_identity

TokenSource = Callable[[], str | None]


class HttpRequester:
    """Requests certificates from ``url`` (``https://host:port``).

    The current certificate, while valid, is presented over mTLS. With
    ``certificate_first`` it is the only proof sent while it lasts and the token
    is read only without it: a VM's join token proves its identity once, its
    certificate from then on.
    """

    def __init__(self, url: str, *, bundle_pem: bytes, trust_domain: str,
                 token: TokenSource, control_ns: str = "meshgate", timeout: float = 10.0,
                 certificate_first: bool = False) -> None:
        self.url = url.rstrip("/")
        self.bundle_pem = bundle_pem
        self.server_name = service_identity(trust_domain, control_ns).dns_name
        self.token = token
        self.timeout = timeout
        self.certificate_first = certificate_first

    def _context(self, current: CertStore | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=(current.bundle.to_pem() if current and
                                                 current.bundle else self.bundle_pem).decode())
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        if current is not None and current.chain is not None:
            load_identity(ctx, current.chain, current.key_pem)
        return ctx

    async def certify(self, csr_pem: bytes, *, current: CertStore | None) -> Issued:
        body: dict[str, Any] = {"csr": csr_pem.decode()}
        token = None if self.certificate_first and current is not None else self.token()
        if token:
            body["token"] = token
        ctx = self._context(current)
        try:
            async with asyncio.timeout(self.timeout):
                resp = await https.request(self.url, "POST", "/v1/certify", context=ctx,
                                           server_hostname=self.server_name,
                                           timeout=self.timeout, body=body)
                try:
                    text = (await resp.read()).decode(errors="replace")
                finally:
                    await resp.close()
        except ssl.SSLCertVerificationError as e:
            raise ServiceUnavailable(
                f"identity service {self.url} is not trusted: {e.verify_message}; it must "
                f"present {self.server_name} under an anchor of the trust bundle") from e
        except (https.ResponseError, TimeoutError, OSError, ssl.SSLError) as e:
            raise ServiceUnavailable(f"identity service {self.url} unreachable: "
                                     f"{type(e).__name__}: {e}") from e
        try:
            doc = json.loads(text)
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        if resp.status >= 500:
            raise ServiceUnavailable(f"identity service {self.url} answered {resp.status}: "
                                     f"{doc.get('message', text[:200])}")
        if resp.status != 200:
            raise IssuanceRefused(f"identity service refused ({resp.status} "
                                  f"{doc.get('error', '?')}): {doc.get('message', text[:200])}",
                                  reason=str(doc.get("error", "unknown")), status=resp.status)
        bundle = doc.get("trustBundle")
        return Issued(chain_pem=str(doc["chain"]).encode(),
                      bundle_pem=str(bundle).encode() if bundle else None)


async def certify_once(url: str, identity: Identity, *, bundle_pem: bytes,
                       token: str) -> tuple[bytes, bytes]:
    """One certificate for ``identity``: (chain PEM, private key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    requester = HttpRequester(url, bundle_pem=bundle_pem, trust_domain=identity.trust_domain,
                              control_ns=identity.control_ns, token=lambda: token)
    csr = ca.make_csr(key, identity)
    issued = await requester.certify(csr.public_bytes(serialization.Encoding.PEM), current=None)
    return issued.chain_pem, ca.key_pem(key)
