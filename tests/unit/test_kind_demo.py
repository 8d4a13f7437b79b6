"""`make kind-demo` (kind-configs/demo.sh) cannot run where the tests run (no docker, no
kind). What can be checked is that every meshgate command it runs is one the CLI
accepts as written, so the script does not rot as the commands change: each is parsed
by meshgate's own argument parser, with shell expansions replaced by a word."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mesh.cli import build_parser

SCRIPT = Path(__file__).resolve().parents[2] / "kind-configs" / "demo.sh"
_EXPANSION = re.compile(r"\$\([^()]*(\([^()]*\))?[^()]*\)|\$\{?\w+\}?")


def _meshgate_commands() -> list[list[str]]:
    text = SCRIPT.read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        lexer = shlex.shlex(_EXPANSION.sub("WORD", line), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token in ("|", "||", "&&", ";", "(", ")", ">", "{", "}"):
                if words[:1] == ["meshgate"]:
                    commands.append(words[1:])
                words = []
            else:
                words.append(token)
    return commands


def test_the_script_runs_the_meshgate_steps_of_the_readme() -> None:
    verbs = [" ".join(c[:2]) if c[0] in ("identity", "multicluster") else c[0]
             for c in _meshgate_commands()]
    for step in ("identity init", "install", "check", "multicluster link",
                 "multicluster check", "inject"):
        assert step in verbs


@pytest.mark.parametrize("argv", _meshgate_commands(), ids=" ".join)
def test_every_meshgate_command_in_the_script_parses(argv: list[str]) -> None:
    build_parser().parse_args(argv)  # exits 2 naming the argument it cannot take
