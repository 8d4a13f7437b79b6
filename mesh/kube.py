"""Helpers over the official kubernetes client: loading a kubeconfig with an
error a person can act on, and the patch content types the client does not
choose by itself."""

from __future__ import annotations

import ssl
from pathlib import Path

import yaml
from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

from mesh.errors import ConfigError

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"


def api_client(kubeconfig: Path | str) -> client.ApiClient:
    """An ApiClient for the kubeconfig's current context."""
    path = Path(kubeconfig)
    if not path.is_file():
        raise ConfigError(f"kubeconfig {path} does not exist; pass --kubeconfig with the file "
                          "`meshgate cluster serve` or your cluster wrote")
    try:
        return config.new_client_from_config(config_file=str(path))
    except (ConfigException, ValueError, TypeError, KeyError, yaml.YAMLError) as e:
        raise ConfigError(f"kubeconfig {path} cannot be used: {e}") from e


def root_cause(e: BaseException) -> BaseException:
    """The socket or TLS error under urllib3's wrappers, whose text is stable."""
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLError) or (isinstance(current, OSError)
                                                 and current.strerror):
            return current
        reason = getattr(current, "reason", None)
        current = reason if isinstance(reason, BaseException) else (
            current.__cause__ or current.__context__)
    return e


def first_line(e: object) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
