"""meshgate's container image: its name and version, defined here only.

The manifests (`meshgate install`, deploy/kustomization.yaml's ``images``) and
whatever runs meshgate's pods take the reference from here; the version is the
installed distribution's, so an image is tagged with the release it holds."""

from __future__ import annotations

from importlib import metadata

IMAGE = "ghcr.io/meshgate/meshgate"
VERSION = metadata.version("meshgate")


def reference(tag: str = VERSION) -> str:
    """``IMAGE:tag``, by default this release's image."""
    return f"{IMAGE}:{tag}"
