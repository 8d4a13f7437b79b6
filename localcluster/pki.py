"""The embedded cluster's own keys: its CA, the API server's serving certificate,
the ServiceAccount token signing key and the admin credential.

All are created once under the state directory (keys mode 0600) and reused on
restart, so kubeconfigs and issued tokens stay valid across restarts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


@dataclass(frozen=True)
class ClusterPKI:
    ca_cert_pem: bytes
    serving_cert: Path
    serving_key: Path
    sa_key: ec.EllipticCurvePrivateKey
    admin_token: str
    ca_path: Path

    @property
    def sa_public_pem(self) -> bytes:
        return self.sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def ensure_pki(state_dir: Path, *, cluster: str, hosts: list[str]) -> ClusterPKI:
    """Load the cluster's keys from ``state_dir``, creating what is missing.

    The serving certificate is re-issued when ``hosts`` names an address it
    does not cover (for example a new ``--listen`` address).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    ca_crt, ca_key = state_dir / "ca.crt", state_dir / "ca.key"
    now = dt.datetime.now(dt.UTC)
    if not ca_crt.exists() or not ca_key.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"meshgate-{cluster}-ca")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        _write_private(ca_key, _key_pem(key))
        ca_crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    ca_private = _load_key(ca_key)

    srv_crt, srv_key = state_dir / "apiserver.crt", state_dir / "apiserver.key"
    if not srv_crt.exists() or not srv_key.exists() or not _covers(srv_crt, hosts):
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for h in dict.fromkeys(hosts):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_private.public_key()), False
            )
            .sign(ca_private, hashes.SHA256())
        )
        _write_private(srv_key, _key_pem(key))
        srv_crt.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + ca_cert.public_bytes(serialization.Encoding.PEM)
        )

    sa_path = state_dir / "sa.key"
    if not sa_path.exists():
        _write_private(sa_path, _key_pem(ec.generate_private_key(ec.SECP256R1())))
    token_path = state_dir / "admin.token"
    if not token_path.exists():
        _write_private(token_path, secrets.token_urlsafe(32).encode())
    return ClusterPKI(
        ca_cert_pem=ca_crt.read_bytes(), serving_cert=srv_crt, serving_key=srv_key,
        sa_key=_load_key(sa_path), admin_token=token_path.read_text().strip(), ca_path=ca_crt,
    )


def _covers(cert_path: Path, hosts: list[str]) -> bool:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    names = {str(n) for n in san.get_values_for_type(x509.IPAddress)}
    names |= set(san.get_values_for_type(x509.DNSName))
    return all(h in names for h in hosts)
