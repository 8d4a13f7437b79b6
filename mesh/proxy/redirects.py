"""The redirected listeners: one per service address (VIP:port) in discovery, on
which applications' connections to that service arrive.

Each binds with IP_FREEBIND (mesh.proxy.listeners), so it may open before its
address is local. One that cannot bind (another process holds the address, say an
application listening on 0.0.0.0:80) is reported with the process that holds it
and tried again with doubling delays, up to a limit, until it binds; the proxy
serves every other service meanwhile. `report` is what ``/redirects`` answers.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mesh.proxy.discovery import ServiceSpec
from mesh.proxy.listeners import bind, bind_failure

log = logging.getLogger("mesh.proxy.redirects")


class RedirectState(enum.Enum):
    BOUND = "bound"
    FAILED = "failed"


@dataclass
class Redirect:
    """One service address and how its listener fares."""

    address: str
    service: str
    state: RedirectState = RedirectState.FAILED
    cause: str | None = None
    attempts: int = 0
    server: asyncio.AbstractServer | None = field(default=None, repr=False)
    retry: asyncio.Task[None] | None = field(default=None, repr=False)


class Redirects:
    """The redirected listeners of one proxy, each serving ``factory``'s protocols.

    ``backoff`` is (first delay, longest delay) in seconds between attempts.
    """

    def __init__(self, factory: Callable[[], asyncio.BaseProtocol], *,
                 backoff: tuple[float, float] = (1.0, 60.0),
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.factory = factory
        self.backoff = backoff
        self._sleep = sleep
        self._redirects: dict[str, Redirect] = {}

    def __contains__(self, address: str) -> bool:
        return address in self._redirects

    async def open(self, service: ServiceSpec) -> None:
        """Listen on `service`'s address from now on, for as long as the proxy runs:
        at once when it can be bound, else retrying in the background."""
        if service.address in self._redirects:
            return
        redirect = self._redirects[service.address] = Redirect(service.address, service.name)
        if not await self._attempt(redirect, retry_in=self.backoff[0]):
            redirect.retry = asyncio.get_running_loop().create_task(self._retry(redirect))

    async def _retry(self, redirect: Redirect) -> None:
        first, longest = self.backoff
        delay = first
        while True:
            await self._sleep(delay)
            delay = min(delay * 2, longest)
            if await self._attempt(redirect, retry_in=delay):
                return

    async def _attempt(self, redirect: Redirect, *, retry_in: float) -> bool:
        redirect.attempts += 1
        try:
            sock = bind(redirect.address, freebind=True)
            try:
                server = await asyncio.get_running_loop().create_server(self.factory,
                                                                        sock=sock)
            except BaseException:
                sock.close()
                raise
        except OSError as e:
            cause = bind_failure(e, redirect.address)
            if cause != redirect.cause or redirect.attempts == 1:
                log.warning("redirected listener failed service=%s address=%s cause=%s "
                            "attempt=%d retry_in=%.0fs", redirect.service, redirect.address,
                            cause, redirect.attempts, retry_in)
            redirect.state, redirect.cause = RedirectState.FAILED, cause
            return False
        if redirect.attempts > 1:
            log.info("redirected listener bound service=%s address=%s attempts=%d",
                     redirect.service, redirect.address, redirect.attempts)
        redirect.state, redirect.cause, redirect.server = RedirectState.BOUND, None, server
        return True

    def report(self) -> list[dict[str, Any]]:
        """Each address, its service, ``bound`` or ``failed``, and why it failed."""
        return [{"address": r.address, "service": r.service, "state": r.state.value,
                 "cause": r.cause, "attempts": r.attempts}
                for _, r in sorted(self._redirects.items())]

    def close(self) -> None:
        """Stop listening and retrying."""
        for redirect in self._redirects.values():
            if redirect.retry is not None:
                redirect.retry.cancel()
            if redirect.server is not None:
                redirect.server.close()
