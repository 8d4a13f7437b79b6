"""The multicluster.meshgate.io CustomResourceDefinition (Link), in
deploy/crds/multicluster.yaml, installed by mesh.control.crds."""

from __future__ import annotations

from typing import Any

from mesh.control import crds

NAME = "multicluster"


def crd_documents() -> list[dict[str, Any]]:
    """The CustomResourceDefinitions of multicluster.meshgate.io."""
    return crds.crd_documents(NAME)


def install_crds(api_client: Any, *, timeout: float = 30.0) -> dict[str, str]:
    """Create or update the multicluster CRDs and wait until they are established;
    what happened to each, by name (``created``, ``updated`` or ``unchanged``)."""
    return crds.install_crds(api_client, name=NAME, timeout=timeout)
