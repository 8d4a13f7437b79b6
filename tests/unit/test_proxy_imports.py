"""The proxy must not load the kubernetes client, a web framework or pydantic: their
memory is paid by every sidecar. Its models (mesh.config, mesh.proxy.discovery,
mesh.authz) are msgspec Structs."""

from __future__ import annotations

import json
import subprocess
import sys

# Run in a fresh interpreter: the models each module pulls in at import are the point.
_GATEWAY = """
import json, sys

class FirstImporter:
    \"\"\"Records the module whose import statement first loads pydantic.\"\"\"
    found = None

    def find_spec(self, name, path=None, target=None):
        if name == "pydantic" and FirstImporter.found is None:
            frame = sys._getframe(1)
            while frame is not None and frame.f_globals.get("__name__", "").startswith(
                    ("importlib", "_frozen_importlib")):
                frame = frame.f_back
            FirstImporter.found = frame.f_globals.get("__name__") if frame else "?"
        return None

sys.meta_path.insert(0, FirstImporter())
import gateway.main

def pydantic_in(module):
    for value in vars(module).values():
        origin = getattr(value, "__module__", None) or getattr(value, "__name__", "")
        if isinstance(origin, str) and origin.split(".")[0] in ("pydantic", "pydantic_core"):
            return True
        if isinstance(value, type) and any(
                base.__module__.split(".")[0] == "pydantic" for base in value.__mro__):
            return True
    return False

own = [name for name, module in list(sys.modules.items())
       if name.split(".")[0] in ("mesh", "gateway") and module is not None]
print(json.dumps({
    "aiohttp": sorted(m for m in sys.modules if m.split(".")[0] == "aiohttp"),
    "pydantic_first_imported_by": FirstImporter.found,
    "own_modules_holding_pydantic": sorted(n for n in own if pydantic_in(sys.modules[n])),
}))
"""


def test_proxy_process_does_not_import_kubernetes_aiohttp_or_pydantic() -> None:
    code = ("import sys, mesh.cli, mesh.proxy.main, mesh.identity.certstore, "
            "mesh.identity.client, mesh.discovery.client, mesh.proxy.policy; "
            "mesh.cli.build_parser(); print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('kubernetes', 'aiohttp', 'pydantic', 'pydantic_core')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_gateway_process_loads_no_aiohttp_and_no_pydantic_model_of_its_own() -> None:
    # The gateway keeps the kubernetes client for its informers, and that client
    # (kubernetes/client/api_client.py) imports pydantic itself; nothing of the
    # gateway's own (config, discovery index, policy index) may hold pydantic.
    out = subprocess.run([sys.executable, "-c", _GATEWAY], capture_output=True, text=True,
                         timeout=60, check=True)
    found = json.loads(out.stdout)
    assert found["aiohttp"] == []
    assert found["own_modules_holding_pydantic"] == []
    first = found["pydantic_first_imported_by"]
    assert first is None or first.split(".")[0] == "kubernetes", first


def test_the_per_request_modules_run_compiled() -> None:
    # `make test` compiles them first (`make native`); a build that silently fell back
    # to the sources would cost a third of the proxy's speed.
    from mesh.proxy import native

    assert native.compiled() == list(native.MODULES)
    assert native.stale() == []
