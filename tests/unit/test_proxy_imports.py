"""The proxy must not load the kubernetes client or a web framework: their memory is
paid by every sidecar."""

from __future__ import annotations

import subprocess
import sys


def test_proxy_process_does_not_import_kubernetes_or_aiohttp() -> None:
    code = ("import sys, mesh.cli, mesh.proxy.main, mesh.identity.certstore, "
            "mesh.identity.client, mesh.discovery.client, mesh.proxy.policy; "
            "mesh.cli.build_parser(); print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('kubernetes', 'aiohttp')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_the_per_request_modules_run_compiled() -> None:
    # `make test` compiles them first (`make native`); a build that silently fell back
    # to the sources would cost a third of the proxy's speed.
    from mesh.proxy import native

    assert native.compiled() == list(native.MODULES)
    assert native.stale() == []
