"""Compile the proxy's per-request modules (mesh.proxy.native.MODULES) with mypyc,
in place: `python native_build.py` (what `make native` runs)."""

from __future__ import annotations

import sys
from pathlib import Path

from mypyc.build import mypycify
from setuptools import setup

from mesh.proxy.native import GROUP, sources

ROOT = Path(__file__).resolve().parent

if __name__ == "__main__":
    for old in (ROOT / "mesh" / "proxy").glob("*.so"):
        old.unlink()  # a module dropped from the list must not linger compiled
    setup(name="meshgate",
          ext_modules=mypycify([str(s) for s in sources()], group_name=GROUP),
          script_args=["--quiet", "build_ext", "--inplace", "--build-temp", "build/native"])
    # Copied in place with the build's times, which may predate a source touched
    # since (mesh.proxy.native.stale compares them): mark them as of now.
    for built in (ROOT / "mesh" / "proxy").glob("*.so"):
        built.touch()
    sys.exit(0)
