"""The mirror controller's exceptions, under `mesh.errors.MeshError`.

Each names the Link or object involved and what to do next; `reason` is the
one-word CamelCase reason the Link's status condition carries.
"""

from __future__ import annotations

from mesh.errors import MeshError


class MirrorError(MeshError):
    """The mirror controller could not do what a Link asks."""

    reason = "Error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class LinkSpecError(MirrorError):
    """A Link's spec is invalid; nothing changes until the Link does."""

    reason = "InvalidSpec"


class CredentialsError(MirrorError):
    """The link's credentials Secret is missing or malformed, or the remote API
    refused the credential it holds (expired, revoked, or without permission)."""

    reason = "InvalidCredentials"


class RemoteUnreachable(MirrorError):
    """The remote cluster's API could not be reached; the credential is untested."""

    reason = "RemoteUnreachable"
