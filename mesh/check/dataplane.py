"""``meshgate check --proxy``: every meshed pod (one with a ``meshgate-proxy``
container) has its proxy ready and of the control plane's version, decided from
the pods as read.

A proxy of another version is a warning, as in ``linkerd check --proxy``: it
works, and is upgraded by restarting the pod once the injector is upgraded."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from mesh.check.control import image_tag
from mesh.check.results import Category, Got, Obj, Result

PROXY_CONTAINER = "meshgate-proxy"
VERSION_ANNOTATION = "meshgate.io/proxy-version"
DATA_PLANE = Category("meshgate-data-plane")


def proxy_container(pod: Obj) -> Obj | None:
    """The pod's ``meshgate-proxy`` (a native sidecar, or a plain container)."""
    spec = pod.get("spec") or {}
    return next((c for c in [*(spec.get("initContainers") or []),
                             *(spec.get("containers") or [])]
                 if c.get("name") == PROXY_CONTAINER), None)


def _name(pod: Obj) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


def _proxy_ready(pod: Obj) -> bool:
    status = pod.get("status") or {}
    return any(s.get("name") == PROXY_CONTAINER and s.get("ready") is True
               for s in [*(status.get("initContainerStatuses") or []),
                         *(status.get("containerStatuses") or [])])


def proxy_versions(pod: Obj) -> set[str]:
    """The versions the pod's proxy says it is: its image's tag and its annotation."""
    container = proxy_container(pod) or {}
    versions = {image_tag(str(container.get("image", "")))}
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    versions.add(str(annotations.get(VERSION_ANNOTATION, "")))
    return versions - {""}


def checks(pods: Got, *, control_version: str, namespace: str | None,
           namespace_got: Got | None) -> Iterator[Result]:
    """``namespace``/``namespace_got``: the namespace --namespace narrows to, as read."""
    if namespace is not None and namespace_got is not None:
        title = "data plane namespace exists"
        if namespace_got.error:
            yield DATA_PLANE.unreadable(title, f"Namespace {namespace}", namespace_got)
            return
        if namespace_got.obj is None:
            yield DATA_PLANE.fail(title, f"the Namespace {namespace} does not exist",
                                  "give --namespace an existing namespace, or none for all")
            return
        yield DATA_PLANE.ok(title)
    title = "data plane proxies are ready"
    if pods.error:
        yield DATA_PLANE.unreadable(title, "pods", pods)
        return
    meshed = [p for p in (pods.obj or {}).get("items") or [] if proxy_container(p)]
    if not meshed:
        where = f" in namespace {namespace}" if namespace else ""
        yield DATA_PLANE.fail(title, f"no pods with a {PROXY_CONTAINER} container{where}",
                              "mesh workloads with `meshgate inject` or the annotation "
                              "meshgate.io/inject: enabled, and restart them")
        return
    yield from ready_checks(meshed)
    yield from version_checks(meshed, control_version)


def _running(pod: Obj) -> bool:
    # Finished pods have no proxy running to be ready (Linkerd skips them too).
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def ready_checks(meshed: Sequence[Obj]) -> Iterator[Result]:
    title = "data plane proxies are ready"
    waiting = [_name(p) for p in meshed if _running(p) and not _proxy_ready(p)]
    if waiting:
        yield DATA_PLANE.fail(title, f"{PROXY_CONTAINER} not ready in " + ", ".join(waiting),
                              "kubectl describe pod and kubectl logs -c " + PROXY_CONTAINER
                              + " for each of them")
    else:
        yield DATA_PLANE.ok(title)


def version_checks(meshed: Sequence[Obj], control_version: str) -> Iterator[Result]:
    title = "data plane and control plane versions match"
    skewed = [f"{_name(p)} ({', '.join(sorted(v)) or 'no version'})" for p in meshed
              if _running(p) and (v := proxy_versions(p)) != {control_version}]
    if skewed:
        yield DATA_PLANE.warn(title, f"the control plane runs {control_version}; proxies of "
                              "another version: " + ", ".join(skewed),
                              "restart them (kubectl rollout restart) to have the injector "
                              "give them this version's proxy")
    else:
        yield DATA_PLANE.ok(title)
