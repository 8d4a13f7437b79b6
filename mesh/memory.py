"""Keeping a long-running process's resident memory near what it uses, and
telling how much of its C heap is in use (`process_heap_bytes`)."""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Callable, Iterator
from typing import cast

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None  # not glibc 2.33 or newer
    fn.restype = _MallInfo2
    return cast(Callable[[], _MallInfo2], fn)


_MALLINFO2 = _mallinfo2()


def heap_in_use() -> int | None:
    """Bytes glibc's malloc has handed out and not had back (heap and mmapped), where
    OpenSSL, the ssl module and large Python objects live; None off glibc."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


class HeapCollector(Collector):
    """`process_heap_bytes`: what `heap_in_use` says, read at each scrape. A leak in C
    (a TLS session copied per connection, say) shows here and not in Python's objects."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        used = heap_in_use()
        if used is not None:
            yield GaugeMetricFamily("process_heap_bytes", "C heap in use (glibc malloc)",
                                    value=used)


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
