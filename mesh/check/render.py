"""``meshgate check``'s output, as ``linkerd check`` prints it: a heading per
category, one line per check (`MARKS`: success, warning, error), the cause and the
fix indented under anything but a success, and ``Status check results are`` the
success or the error mark
at the end; or, with ``-o json``, Linkerd's JSON document
(``{"success", "categories": [{"categoryName", "checks": [{"description", "hint",
"error", "result"}]}]}``)."""

from __future__ import annotations

import json
from collections.abc import Iterable

from mesh.check.results import Result, Status, succeeded

MARKS = {Status.OK: "\u221a", Status.WARN: "\u203c", Status.FAIL: "\u00d7"}
INDENT = "    "


class Table:
    """The table, a result at a time, so that each line shows as its check ends."""

    def __init__(self) -> None:
        self.done: list[Result] = []

    def add(self, result: Result) -> str:
        lines: list[str] = []
        if not self.done or self.done[-1].category != result.category:
            if self.done:
                lines.append("")
            lines += [result.category, "-" * len(result.category)]
        lines.append(f"{MARKS[result.status]} {result.description}")
        if result.status is not Status.OK:
            lines += [INDENT + line for line in result.error.splitlines()]
            if result.hint:
                lines.append(f"{INDENT}fix: {result.hint}")
        self.done.append(result)
        return "\n".join(lines) + "\n"

    def end(self) -> str:
        mark = MARKS[Status.OK if succeeded(self.done) else Status.FAIL]
        return f"\nStatus check results are {mark}\n"


def table(results: Iterable[Result]) -> str:
    out = Table()
    return "".join(out.add(result) for result in results) + out.end()


def as_json(results: Iterable[Result]) -> str:
    categories: list[dict[str, object]] = []
    checks: list[dict[str, str]] = []
    done: list[Result] = []
    for result in results:
        if not done or done[-1].category != result.category:
            checks = []
            categories.append({"categoryName": result.category, "checks": checks})
        check = {"description": result.description}  # in the order of Linkerd's fields
        if result.status is not Status.OK:
            if result.hint:
                check["hint"] = result.hint
            check["error"] = result.error
        check["result"] = result.status.value
        checks.append(check)
        done.append(result)
    return json.dumps({"success": succeeded(done), "categories": categories}, indent=2) + "\n"
