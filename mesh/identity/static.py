"""A workload identity read from files: a certificate chain, its key and a trust
bundle, for VMs and tests that do not use the identity service. It offers the
same face as `CertStore` (``identity``, ``bundle``, ``certificates``,
``private_key``, ``server_context()``, ``client_context()``), so the proxy does
not care where its certificate came from."""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.identity import ca, tls
from mesh.identity.bundle import TrustBundle
from mesh.identity.errors import TrustSetupError
from mesh.identity.names import Identity


class StaticIdentity:
    def __init__(self, chain_pem: bytes, key_pem: bytes, bundle: TrustBundle) -> None:
        certs = ca.load_certs(chain_pem)
        if not certs:
            raise TrustSetupError("the certificate file holds no certificate")
        self.identity = Identity.from_certificate(certs[0])
        self.bundle = bundle
        self.certificates = tuple(certs)
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise TrustSetupError(f"the key file holds no readable unencrypted PEM key: {e}"
                                  ) from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TrustSetupError("the key file holds a key that is not ECDSA; workload keys "
                                  "are ECDSA P-256")
        self.private_key = key
        self._server = tls.server_context(bundle)
        self._client = tls.client_context(bundle)
        for ctx in (self._server, self._client):
            tls.load_identity(ctx, chain_pem, key_pem)

    @classmethod
    def load(cls, cert_file: Path, key_file: Path, bundle_file: Path) -> StaticIdentity:
        try:
            chain, key, bundle = (cert_file.read_bytes(), key_file.read_bytes(),
                                  bundle_file.read_bytes())
        except OSError as e:
            raise TrustSetupError(f"cannot read {e.filename}: {e.strerror}") from e
        return cls(chain, key, TrustBundle.from_pem(bundle))

    def server_context(self) -> ssl.SSLContext:
        return self._server

    def client_context(self) -> ssl.SSLContext:
        return self._client
