"""Configuration values shared by every command: durations and addresses as
people write them, checked once where they come in."""

from __future__ import annotations

import re
from datetime import timedelta

from mesh.errors import ConfigError

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str, *, what: str = "duration") -> timedelta:
    """``90s``, ``15m``, ``24h``, ``1h30m``, ``365d`` -> timedelta (must be positive)."""
    s = text.strip()
    pos, total = 0, 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not s or pos != len(s) or total <= 0:
        raise ConfigError(f"{what} {text!r} is not a duration such as 90s, 15m, 24h or 1h30m")
    return timedelta(seconds=total)
