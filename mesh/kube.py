"""Helpers over the official kubernetes client: loading a kubeconfig with an
error a person can act on, and the patch content types the client does not
choose by itself."""

from __future__ import annotations

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
