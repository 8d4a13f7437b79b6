"""deploy/Dockerfile cannot be built where the tests run (no container runtime): what can
be checked without building it is that every path it copies exists, that both stages
stand on the Python the project supports, and that the image runs as a non-root user
with `meshgate` as its entry point."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    """The arguments of each `name` instruction, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines()
            if line.startswith(name + " ")]


def test_every_copied_path_exists() -> None:
    copies = [c for c in instructions("COPY") if not c.startswith("--from")]
    assert copies
    for copy in copies:
        *sources, _ = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), source


def test_both_stages_stand_on_python_3_11_slim() -> None:
    assert [f.split()[0] for f in instructions("FROM")] == ["python:3.11-slim"] * 2


def test_the_image_runs_meshgate_as_a_non_root_user() -> None:
    user = instructions("USER")[-1]
    assert all(part.isdigit() and int(part) > 0 for part in user.split(":")), user
    assert json.loads(instructions("ENTRYPOINT")[-1]) == ["meshgate"]
