"""Keeping a long-running process's resident memory near what it uses."""

from __future__ import annotations

import asyncio
import ctypes


async def return_freed_memory(interval: float = 10.0) -> None:
    """Give freed heap pages back to the OS now and then.

    Each TLS connection holds 256 KiB read buffers; after a burst of
    connections glibc keeps the freed heap resident, so RSS would stay at the
    burst's peak. malloc_trim returns it. (Forcing such buffers onto mmap
    instead was measured: every TLS read then paid mmap/mremap, ~20 % CPU.)
    """
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return  # not glibc: nothing to do
    while True:
        await asyncio.sleep(interval)
        trim(0)
