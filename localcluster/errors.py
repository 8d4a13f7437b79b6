"""API errors and the `Status` objects they become on the wire.

Handlers raise `ApiError`; the server turns it into the same `Status` body and
HTTP code that kube-apiserver would send, so that the kubernetes client and
kubectl report it to the user unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mesh.errors import MeshError


@dataclass(frozen=True)
class Cause:
    """One field-level reason of an `Invalid` error (kube's StatusCause)."""

    field: str
    message: str
    reason: str = "FieldValueInvalid"

    def to_dict(self) -> dict[str, str]:
        out = {"reason": self.reason, "message": self.message, "field": self.field}
        return {k: v for k, v in out.items() if v}  # kube's StatusCause omits empty fields


@dataclass
class ApiError(MeshError):
    """An API request failed; carries everything a `Status` object needs."""

    code: int
    reason: str
    message: str
    group: str = ""
    kind: str = ""
    name: str = ""
    causes: list[Cause] = field(default_factory=list)
    retry_after: int | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def status(self) -> dict[str, Any]:
        details: dict[str, Any] = {}
        if self.name:
            details["name"] = self.name
        if self.group:
            details["group"] = self.group
        if self.kind:
            details["kind"] = self.kind
        if self.causes:
            details["causes"] = [c.to_dict() for c in self.causes]
        if self.retry_after is not None:
            details["retryAfterSeconds"] = self.retry_after
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if details:
            body["details"] = details
        return body

    # Constructors named after kube-apiserver's StatusReason values.

    @classmethod
    def bad_request(cls, message: str) -> ApiError:
        return cls(400, "BadRequest", message)

    @classmethod
    def unauthorized(cls, message: str = "Unauthorized") -> ApiError:
        return cls(401, "Unauthorized", message)

    @classmethod
    def forbidden(
        cls, message: str, *, group: str = "", kind: str = "", name: str = ""
    ) -> ApiError:
        return cls(403, "Forbidden", message, group=group, kind=kind, name=name)

    @classmethod
    def not_found(cls, plural: str, name: str, *, group: str = "") -> ApiError:
        qualified = f"{plural}.{group}" if group else plural
        message = (f'{qualified} "{name}" not found' if name
                   else "the server could not find the requested resource")
        return cls(404, "NotFound", message, group=group, kind=plural, name=name)

    @classmethod
    def no_route(cls) -> ApiError:
        return cls(404, "NotFound", "the server could not find the requested resource")

    @classmethod
    def already_exists(cls, plural: str, name: str, *, group: str = "") -> ApiError:
        qualified = f"{plural}.{group}" if group else plural
        return cls(
            409, "AlreadyExists", f'{qualified} "{name}" already exists',
            group=group, kind=plural, name=name,
        )

    @classmethod
    def conflict(cls, plural: str, name: str, detail: str, *, group: str = "") -> ApiError:
        qualified = f"{plural}.{group}" if group else plural
        return cls(
            409, "Conflict", f'Operation cannot be fulfilled on {qualified} "{name}": {detail}',
            group=group, kind=plural, name=name,
        )

    @classmethod
    def invalid(
        cls, kind: str, name: str, causes: list[Cause], *, group: str = ""
    ) -> ApiError:
        qualified = f"{kind}.{group}" if group else kind
        listed = ", ".join(f"{c.field}: {c.message}" if c.field else c.message for c in causes)
        if len(causes) > 1:
            listed = f"[{listed}]"  # kube's aggregate error brackets two or more
        return cls(
            422, "Invalid", f'{qualified} "{name}" is invalid: {listed}',
            group=group, kind=kind, name=name, causes=causes,
        )

    @classmethod
    def gone(cls, message: str) -> ApiError:
        return cls(410, "Expired", message)

    @classmethod
    def too_large(cls, limit: int) -> ApiError:
        return cls(413, "RequestEntityTooLarge", f"request body exceeds the limit of {limit} bytes")

    @classmethod
    def unsupported_media_type(cls, content_type: str) -> ApiError:
        return cls(415, "UnsupportedMediaType",
                   "the body of the request was in an unknown format - accepted media types "
                   "include: application/json, application/yaml, application/merge-patch+json, "
                   "application/strategic-merge-patch+json, application/json-patch+json, "
                   "application/apply-patch+yaml, "
                   f"application/vnd.kubernetes.protobuf (built-in kinds); got {content_type!r}")

    @classmethod
    def method_not_allowed(cls, verb: str, plural: str) -> ApiError:
        return cls(405, "MethodNotAllowed", "the server does not allow this method on the "
                   f"requested resource ({verb} {plural})")
