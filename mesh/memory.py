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


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""mallopt's parameters (glibc's malloc.h)."""
MMAP_THRESHOLD = 1 << 20
"""Allocations below this come from the heap: the 256 KiB TLS read buffers included."""
TRIM_THRESHOLD = 64 << 20
"""Free heap at its top is kept up to this between the periodic trims."""


def keep_buffers_on_the_heap() -> bool:
    """Serve the TLS read buffers (256 KiB) from the heap rather than from mmap.

    glibc's default mmap threshold (128 KiB) rises only once the process frees a
    larger mmapped block; the proxy used to get that by accident from pydantic's
    import. Without it, every buffer was a fresh mmap and page faults: the HTTP-aware
    proxy pair went from 25,500 to 15,300 requests/s at c=16 and the server proxy's
    CPU per request from 21 to 43 µs. Setting the threshold fixes the trim threshold
    too (at 128 KiB), which would trim the heap's top on every free: it is raised as
    well, and `return_freed_memory` gives freed memory back every few seconds.
    False where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


async def return_freed_memory(interval: float = 10.0) -> None:
    """Keep the TLS buffers on the heap (`keep_buffers_on_the_heap`), and give freed heap
    pages back to the OS now and then.

    Each TLS connection holds 256 KiB read buffers; after a burst of
    connections glibc keeps the freed heap resident, so RSS would stay at the
    burst's peak. malloc_trim returns it. (Forcing such buffers onto mmap
    instead was measured: every TLS read then paid mmap/mremap, ~20 % CPU.)
    """
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return  # not glibc: nothing to do
    keep_buffers_on_the_heap()
    while True:
        await asyncio.sleep(interval)
        trim(0)
