"""The proxy modules compiled with mypyc, and whether the running proxy uses them.

The per-request path (HTTP/1.1 framing, the exchange machine and its adapter, the
pool, the balancer, the retry budget, the opaque relay, HTTP observation, the
transport header and protocol detection) is plain typed Python that mypyc compiles
into C extensions beside the sources (`make native`, run by `make test`, `make demo`
and `make bench`); compiled, it costs about a third of the CPU per request. Python prefers an
extension to the source next to it, so an extension older than its source would
hide an edit: `stale()` names those, the proxy warns of them at start and the
test suite refuses to run with them. A compiled class cannot be subclassed by an
interpreted one (instantiating the subclass raises TypeError), so classes of these
modules are extended by composition.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

MODULES = ("mesh.proxy.http1_head", "mesh.proxy.http1", "mesh.proxy.exchange_io",
           "mesh.proxy.exchanges", "mesh.proxy.exchange", "mesh.proxy.http", "mesh.proxy.pool",
           "mesh.proxy.balancer", "mesh.proxy.retry", "mesh.proxy.relay", "mesh.proxy.observe",
           "mesh.proxy.transport_header", "mesh.proxy.detect")
GROUP = "mesh.proxy._native"
"""The shared library of the compiled modules, kept inside the package."""

_ROOT = Path(__file__).resolve().parent.parent.parent


def sources() -> list[Path]:
    """The source files of `MODULES`, relative to the project root."""
    return [Path(*name.split(".")).with_suffix(".py") for name in MODULES]


def _extension(name: str) -> Path | None:
    """The compiled extension `name` imports from, if it does (found beside its
    source: a compiled module's own idea of its path is not reliable)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
        return None
    source = _ROOT / Path(*name.split(".")).with_suffix(".py")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = source.with_suffix(suffix)
        if candidate.exists():
            return candidate
    return None


def compiled() -> list[str]:
    """The modules of `MODULES` that import as compiled extensions."""
    return [name for name in MODULES if _extension(name) is not None]


def stale() -> list[str]:
    """Compiled modules whose source changed after they were compiled."""
    found = []
    for name, source in zip(MODULES, sources(), strict=True):
        extension = _extension(name)
        path = _ROOT / source
        if extension is not None and path.exists() and \
                path.stat().st_mtime > extension.stat().st_mtime:
            found.append(name)
    return found
