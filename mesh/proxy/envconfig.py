"""The proxy's configuration from its environment, as the injector writes it.

An injected ``meshgate-proxy`` container runs ``meshgate proxy run`` with no config
file: like Linkerd's proxy, it is configured by ``MESHGATE_PROXY_*`` environment
variables that the injector (mesh.inject) sets, the pod's own name, namespace and
ServiceAccount coming from the downward API. `proxy_config` turns them into the one
`ProxyConfig` model, so a file and the environment cannot mean different things. The
trust anchors come as PEM in a variable (a pod cannot mount a ConfigMap of another
namespace); `proxy_config` names the file under the identity directory (an emptyDir)
where the caller writes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import msgspec

from mesh.config import ProxyConfig
from mesh.errors import ConfigError
from mesh.structs import convert, problems

PREFIX = "MESHGATE_PROXY_"
LOCAL_NAME = PREFIX + "IDENTITY_LOCAL_NAME"
"""The proxy's identity name (``$(_pod_sa).$(_pod_ns).serviceaccount.identity...``)."""
TRUST_ANCHORS = PREFIX + "IDENTITY_TRUST_ANCHORS"
"""The trust bundle, PEM."""
IDENTITY_DIR = PREFIX + "IDENTITY_DIR"
"""A writable directory (an emptyDir) for what the proxy keeps of its identity."""
TOKEN_FILE = PREFIX + "IDENTITY_TOKEN_FILE"
"""The projected ServiceAccount token the identity service reviews."""
IDENTITY_SVC_ADDR = PREFIX + "IDENTITY_SVC_ADDR"
DESTINATION_SVC_ADDR = PREFIX + "DESTINATION_SVC_ADDR"
"""HOST:PORT of the control plane (identity; destination and policy)."""
POD_NAMESPACE = PREFIX + "POD_NAMESPACE"
POD_NAME = PREFIX + "POD_NAME"
"""The workload whose inbound policy the proxy follows."""
INBOUND_LISTEN_ADDR = PREFIX + "INBOUND_LISTEN_ADDR"
OUTBOUND_LISTEN_ADDR = PREFIX + "OUTBOUND_LISTEN_ADDR"
ADMIN_LISTEN_ADDR = PREFIX + "ADMIN_LISTEN_ADDR"
OUTBOUND_OPAQUE_PORTS = PREFIX + "OUTBOUND_OPAQUE_PORTS"
"""Comma-separated ports relayed without protocol detection (in place of the default)."""
INBOUND_TRUSTED_GATEWAYS = PREFIX + "INBOUND_TRUSTED_GATEWAYS"
"""Comma-separated identities of gateways whose forwarded caller the inbound side
authorizes (a multicluster gateway's)."""
TRUST_BUNDLE_FILE = "trust-bundle.pem"

_REQUIRED = (LOCAL_NAME, TRUST_ANCHORS, IDENTITY_DIR, TOKEN_FILE, IDENTITY_SVC_ADDR,
             DESTINATION_SVC_ADDR, POD_NAMESPACE, POD_NAME)


def proxy_config(env: Mapping[str, str]) -> tuple[ProxyConfig, str]:
    """The configuration `env` describes, and the trust anchors' PEM to write at its
    ``identity.trustBundle``. A ConfigError names each variable missing or wrong."""
    missing = [name for name in _REQUIRED if not env.get(name, "").strip()]
    if missing:
        raise ConfigError(f"the proxy has no --config and its environment lacks "
                          f"{', '.join(missing)}; inject the workload with `meshgate inject` "
                          "or give --config FILE")
    anchors = env[TRUST_ANCHORS].strip() + "\n"
    if "-----BEGIN CERTIFICATE-----" not in anchors:
        raise ConfigError(f"{TRUST_ANCHORS} holds no PEM certificate")
    identity_server = f"https://{env[IDENTITY_SVC_ADDR].strip()}"
    raw: dict[str, object] = {
        "identity": {"name": env[LOCAL_NAME].strip(),
                     "trustBundle": str(Path(env[IDENTITY_DIR]) / TRUST_BUNDLE_FILE),
                     "server": identity_server, "tokenFile": env[TOKEN_FILE].strip()},
        "destination": {"server": f"https://{env[DESTINATION_SVC_ADDR].strip()}"},
        "workload": {"namespace": env[POD_NAMESPACE].strip(), "pod": env[POD_NAME].strip()},
        "inbound": {**_listen(env, INBOUND_LISTEN_ADDR), **_gateways(env)},
        "outbound": {**_listen(env, OUTBOUND_LISTEN_ADDR), **_opaque(env)},
        "admin": _listen(env, ADMIN_LISTEN_ADDR),
    }
    try:
        return convert(raw, ProxyConfig), anchors
    except msgspec.ValidationError as e:
        lines = [f"{where or '<top level>'}: {reason}"
                 for where, reason in problems(raw, ProxyConfig)]
        raise ConfigError("the proxy's environment is invalid: " + "; ".join(lines)) from e


def _listen(env: Mapping[str, str], name: str) -> dict[str, str]:
    value = env.get(name, "").strip()
    return {"listen": value} if value else {}


def _gateways(env: Mapping[str, str]) -> dict[str, list[str]]:
    names = [n.strip() for n in env.get(INBOUND_TRUSTED_GATEWAYS, "").split(",") if n.strip()]
    return {"trustedGateways": names} if names else {}


def _opaque(env: Mapping[str, str]) -> dict[str, list[int]]:
    value = env.get(OUTBOUND_OPAQUE_PORTS)
    if value is None:
        return {}
    ports = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        if not part.isdigit() or not 0 < int(part) < 65536:
            raise ConfigError(f"{OUTBOUND_OPAQUE_PORTS}: {part!r} is not a port number")
        ports.append(int(part))
    return {"opaquePorts": ports}


def write_trust_bundle(config: ProxyConfig, pem: str) -> None:
    """Write the trust anchors where `config` reads them."""
    path = config.identity.trust_bundle
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(pem)
    except OSError as e:
        raise ConfigError(f"cannot write the trust bundle to {path}: {e.strerror or e}; "
                          f"{IDENTITY_DIR} must name a writable directory") from e
