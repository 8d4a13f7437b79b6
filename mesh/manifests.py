"""meshgate's manifests as kustomize builds them from deploy/: the subset of a
kustomization that deploy/ uses (``resources`` files and directories, ``images``,
``replicas``, ``sortOptions: fifo``, and Components), read from the same files, so
that `meshgate install` and ``kubectl apply -k deploy/`` apply the same objects.

A kustomization field outside that subset is refused (`ConfigError`) rather than
ignored, so that the two cannot drift apart unnoticed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from mesh.errors import ConfigError

Obj = dict[str, Any]

# deploy/ is not a package: it is found beside mesh/ in the (editable) checkout.
DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy"
BASE = DEPLOY_DIR
CRDS = DEPLOY_DIR / "crds"
HA = DEPLOY_DIR / "ha"
_FIELDS = {"apiVersion", "kind", "sortOptions", "resources", "images", "replicas",
           "components"}


def build(root: Path, *, components: tuple[Path, ...] = ()) -> list[Obj]:
    """The objects ``kubectl kustomize root`` prints (with `components` added, as an
    overlay naming them would), in the kustomization's order."""
    docs, images, replicas = _accumulate(root)
    for component in components:
        more, more_images, more_replicas = _accumulate(component, component=True)
        docs += more
        images += more_images
        replicas += more_replicas
    for spec in replicas:
        _set_replicas(docs, spec)
    for spec in images:
        _set_image(docs, spec)
    return docs


def _read_kustomization(root: Path, *, component: bool) -> Obj:
    path = root / "kustomization.yaml"
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}; meshgate must be installed "
                          "from its source tree (pip install -e .)") from e
    want = "Component" if component else "Kustomization"
    if doc.get("kind", "Kustomization") != want:
        raise ConfigError(f"{path} is a {doc.get('kind')}, not a {want}")
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise ConfigError(f"{path} uses {', '.join(unknown)}, which meshgate install does "
                          "not render; keep deploy/ to resources, images and replicas")
    order = (doc.get("sortOptions") or {}).get("order", "fifo" if component else "legacy")
    if order != "fifo":
        raise ConfigError(f"{path} must keep its resources in order (sortOptions: "
                          "{order: fifo}), as meshgate install renders them")
    if doc.get("components"):
        raise ConfigError(f"{path}: components are added by meshgate install's flags")
    return doc


def _accumulate(root: Path, *, component: bool = False
                ) -> tuple[list[Obj], list[Obj], list[Obj]]:
    doc = _read_kustomization(root, component=component)
    docs: list[Obj] = []
    images: list[Obj] = list(doc.get("images") or [])
    replicas: list[Obj] = list(doc.get("replicas") or [])
    for entry in doc.get("resources") or []:
        path = (root / str(entry)).resolve()
        if path.is_dir():
            more, more_images, more_replicas = _accumulate(path)
            docs += more
            images = more_images + images
            replicas = more_replicas + replicas
        else:
            docs += _documents(path)
    return docs, images, replicas


def _documents(path: Path) -> list[Obj]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _set_replicas(docs: list[Obj], spec: Obj) -> None:
    for doc in docs:
        if doc.get("kind") == "Deployment" and doc["metadata"]["name"] == spec["name"]:
            doc["spec"]["replicas"] = int(spec["count"])


def containers(doc: Obj) -> Iterator[Obj]:
    """The containers and init containers of a workload's pod template."""
    pod = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    yield from pod.get("initContainers") or []
    yield from pod.get("containers") or []


def _set_image(docs: list[Obj], spec: Obj) -> None:
    for doc in docs:
        for container in containers(doc):
            name = str(container.get("image", ""))
            repo = name.split("@")[0].rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] \
                else name
            if repo != spec["name"]:
                continue
            repo = spec.get("newName", repo)
            container["image"] = (f"{repo}@{spec['digest']}" if "digest" in spec
                                  else f"{repo}:{spec['newTag']}" if "newTag" in spec
                                  else repo)


def dump(docs: list[Obj]) -> str:
    """YAML documents for ``kubectl apply -f -``."""
    return yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True)
