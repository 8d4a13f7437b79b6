"""Lists of ports as annotations and flags write them: ``6379, 8000-8099``."""

from __future__ import annotations

PortRange = tuple[int, int]
"""(low, high), inclusive."""


def port_ranges(text: str) -> list[PortRange]:
    """``6379, 8000-8099`` -> [(6379, 6379), (8000, 8099)]; empty parts are ignored.
    ValueError naming the first part that is no port (1-65535) or ``low-high`` range."""
    out: list[PortRange] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        low, _, high = part.partition("-")
        high = high or low
        if not (low.isascii() and low.isdigit() and high.isascii() and high.isdigit()
                and 0 < int(low) <= int(high) < 65536):
            raise ValueError(f"{part!r} is not a port (1-65535) or a range such as 8000-8099")
        out.append((int(low), int(high)))
    return out


def spelled(ranges: list[PortRange]) -> str:
    """The ranges as ``port_ranges`` reads them, without spaces."""
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


def ports(ranges: list[PortRange]) -> list[int]:
    """Every port of the ranges, in order."""
    return [port for low, high in ranges for port in range(low, high + 1)]
