"""A Kubernetes label selector (metav1.LabelSelector) as a checked struct: checked
once where it comes in, matched against labels, or written as the
``labelSelector`` query of a list or watch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import msgspec

from mesh.structs import FieldError


class SelectorRequirement(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.key:
            raise FieldError("key", "must not be empty")
        if self.operator in ("In", "NotIn") and not self.values:
            raise FieldError("values", f"must not be empty when operator is {self.operator}")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise FieldError("values", f"must be empty when operator is {self.operator}")

    def query(self) -> str:
        if self.operator == "Exists":
            return self.key
        if self.operator == "DoesNotExist":
            return f"!{self.key}"
        op = "in" if self.operator == "In" else "notin"
        return f"{self.key} {op} ({','.join(sorted(self.values))})"

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return labels.get(self.key) not in self.values
        return (self.key in labels) == (self.operator == "Exists")


class LabelSelector(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """A metav1.LabelSelector; matchLabels and matchExpressions are ANDed."""

    match_labels: dict[str, str] = msgspec.field(default_factory=dict)
    match_expressions: tuple[SelectorRequirement, ...] = ()

    def query(self) -> str:
        """The ``labelSelector`` query string for list and watch."""
        parts = [f"{k}={v}" for k, v in sorted(self.match_labels.items())]
        return ",".join(parts + [e.query() for e in self.match_expressions])

    def matches(self, labels: Mapping[str, str]) -> bool:
        return (all(labels.get(k) == v for k, v in self.match_labels.items())
                and all(e.matches(labels) for e in self.match_expressions))
