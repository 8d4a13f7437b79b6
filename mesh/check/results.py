"""What a check says: a `Result` in a category, success, warning or error, with the
cause and the fix of anything but a success.

As in ``linkerd check``, a warning never fails the run, and a *fatal* error (no
API server, no control plane Namespace) ends it: every later check would only
repeat the same cause."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]


class Status(enum.Enum):
    """A check's outcome; the values are ``linkerd check -o json``'s."""

    OK = "success"
    WARN = "warning"
    FAIL = "error"


@dataclass(frozen=True)
class Result:
    category: str
    description: str
    status: Status
    error: str = ""
    """The cause (empty on success)."""
    hint: str = ""
    """What to do about it."""
    fatal: bool = False
    """A failure that leaves every later check nothing to look at."""


@dataclass(frozen=True)
class Got:
    """One object as it was read: ``obj``, or None when the API server has none, or
    ``error``, why it could not be read (forbidden, unreachable)."""

    obj: Obj | None = None
    error: str = ""


class Category:
    """Results of one category, built in order."""

    def __init__(self, name: str) -> None:
        self.name = name

    def ok(self, description: str) -> Result:
        return Result(self.name, description, Status.OK)

    def warn(self, description: str, error: str, hint: str = "") -> Result:
        return Result(self.name, description, Status.WARN, error, hint)

    def fail(self, description: str, error: str, hint: str = "", *,
             fatal: bool = False) -> Result:
        return Result(self.name, description, Status.FAIL, error, hint, fatal)

    def unreadable(self, description: str, what: str, got: Got, *,
                   fatal: bool = False) -> Result:
        return self.fail(description, f"cannot read {what}: {got.error}",
                         "check that your credentials may read it (kubectl auth can-i get "
                         "...)", fatal=fatal)


Step = Callable[[], Iterable[Result]]


def run(steps: Iterable[Step]) -> Iterator[Result]:
    """Each step's results in order, up to and including the first fatal failure."""
    for step in steps:
        for result in step():
            yield result
            if result.fatal and result.status is Status.FAIL:
                return


def succeeded(results: Iterable[Result]) -> bool:
    """True unless a check failed (warnings do not count)."""
    return all(r.status is not Status.FAIL for r in results)
