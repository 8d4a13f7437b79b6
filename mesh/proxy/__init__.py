"""The data plane: listeners, transport header, protocol detection, HTTP/1.1 handling,
balancing, failure accrual and retries.

The protocol codecs here (`transport_header`, `detect`, `http1`) are sans-IO: they are
fed bytes and return events, and the thin asyncio layer that owns the sockets acts on them.
"""
