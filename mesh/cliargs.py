"""argparse types shared by the ``meshgate`` sub-commands: each turns what a person
typed into a value, or into a message argparse prints with the usage."""

from __future__ import annotations

import argparse
import datetime as dt

from mesh.config import parse_duration
from mesh.errors import ConfigError


def duration(value: str) -> dt.timedelta:
    """``90s``, ``15m``, ``24h``, ``1h30m``."""
    try:
        return parse_duration(value)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def seconds(value: str) -> float:
    """A duration as `duration` reads it, in seconds."""
    return duration(value).total_seconds()


def label(value: str) -> tuple[str, str]:
    """``KEY=VALUE``."""
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{value!r} is not KEY=VALUE, such as app=web")
    return key, val
