"""The HTTP face of the embedded cluster: routing of Kubernetes REST paths,
authentication and authorization of every request, body decoding, and the
``Status`` answers clients expect. Object semantics live in `registry`."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest

from localcluster import (
    discovery,
    impersonation,
    listoptions,
    managedfields,
    openapiv2,
    podapi,
    protobuf,
    reviews,
    tables,
)
from localcluster.auth import (
    ANONYMOUS,
    Attributes,
    Authorizer,
    TokenAuthority,
    User,
    forbidden_message,
)
from localcluster.errors import ApiError
from localcluster.eventsv1 import conversion_for
from localcluster.registry import Registry, WriteOptions
from localcluster.resources import ResourceType
from localcluster.selectors import FieldSelector, LabelSelector
from localcluster.strategy import delete_response
from localcluster.watch import WatchRequest, serve_watch
from localcluster.workloads import scale

log = logging.getLogger("localcluster.apiserver")

PUBLIC_PATHS = {"/healthz", "/livez", "/readyz", "/version", "/version/"}
YAML_TYPES = {"application/yaml", "application/x-yaml", "text/yaml"}
JSON_TYPES = {"application/json", ""}
APPLY_TYPE = "application/apply-patch+yaml"
PATCH_TYPES = {"application/merge-patch+json", "application/strategic-merge-patch+json",
               "application/json-patch+json"}
DEFAULT_WATCH_TIMEOUT = 1800.0


@dataclass(frozen=True)
class Target:
    """A resource request: which type, where, and which object and subresource."""

    rt: ResourceType
    namespace: str | None
    name: str = ""
    subresource: str = ""


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def respond(obj: Any, status: int = 200, warnings: list[str] | None = None) -> web.Response:
    headers = {"Content-Type": "application/json"}
    resp = web.Response(body=dumps(obj), status=status, headers=headers)
    for w in warnings or ():
        resp.headers.add("Warning", f'299 - "{w}"')
    return resp


class ApiHandler:
    def __init__(self, registry: Registry, tokens: TokenAuthority, authorizer: Authorizer, *,
                 server_address: Callable[[], str], max_body: int, bookmark_interval: float
                 ) -> None:
        self.registry = registry
        self.catalog = registry.catalog
        self.tokens = tokens
        self.authorizer = authorizer
        self.server_address = server_address
        self.max_body = max_body
        self.bookmark_interval = bookmark_interval
        self.kubelet: podapi.KubeletView | None = None
        """The node's kubelet, when this server runs one: serves pods/log."""
        self.metrics = CollectorRegistry()
        self.requests = Counter(
            "apiserver_request", "Requests served, by verb, resource and HTTP code",
            ["verb", "resource", "code"], registry=self.metrics)
        self.rejected = Counter(
            "apiserver_rejected_requests", "Requests refused, by reason",
            ["reason"], registry=self.metrics)

    # -- entry ------------------------------------------------------------------------

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        verb, resource = request.method.lower(), ""
        try:
            user = impersonation.impersonate(request.headers, self._authenticate(request),
                                             self.authorizer.allowed)
            target = self._route(request.path)
            if target is None:
                verb = "get" if request.method == "GET" else verb
                resp = await self._non_resource(request, user)
            else:
                resource = target.rt.plural
                verb = self._verb(request, target)
                self._authorize(user, Attributes(
                    verb=verb, group=target.rt.group, resource=target.rt.plural,
                    subresource=target.subresource, namespace=target.namespace or "",
                    name=target.name))
                resp = await self._resource(request, user, target, verb)
        except impersonation.ImpersonationRequestError as e:
            # kube answers these with a plain-text 500, not a Status.
            resp = web.Response(status=500, text=impersonation.internal_error_text(
                request.raw_path, str(e)))
        except ApiError as e:
            self.rejected.labels(e.reason).inc()
            log.info("request refused method=%s path=%s code=%d reason=%s message=%r",
                     request.method, request.path, e.code, e.reason, e.message)
            resp = respond(e.status(), e.code)
        self.requests.labels(verb, resource, str(resp.status)).inc()
        return resp

    def _authenticate(self, request: web.Request) -> User:
        header = request.headers.get("Authorization", "")
        if not header:
            if request.path in PUBLIC_PATHS:
                return ANONYMOUS
            raise ApiError.unauthorized()
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError.unauthorized()
        result = self.tokens.authenticate(token.strip())
        if result.user is None:
            log.info("authentication failed path=%s peer=%s cause=%r", request.path,
                     request.remote, result.error)
            raise ApiError.unauthorized()
        return result.user

    def _authorize(self, user: User, attrs: Attributes) -> None:
        if user is ANONYMOUS and not attrs.is_resource and attrs.path in PUBLIC_PATHS:
            return
        if not self.authorizer.allowed(user, attrs):
            raise ApiError.forbidden(forbidden_message(user, attrs), group=attrs.group,
                                     kind=attrs.resource, name=attrs.name)

    # -- routing ------------------------------------------------------------------------

    def _route(self, path: str) -> Target | None:
        parts = [p for p in path.split("/") if p]
        if len(parts) >= 2 and parts[0] == "api" and parts[1] == "v1":
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        if not rest:
            return None
        if rest[0] == "namespaces" and len(rest) >= 3:
            ns: str | None = rest[1]
            plural, tail = rest[2], rest[3:]
        else:
            ns, plural, tail = None, rest[0], rest[1:]
        rt = self.catalog.lookup(group, version, plural)
        if rt is None or len(tail) > 2 or (ns is not None and not rt.namespaced):
            raise ApiError.no_route()
        name = tail[0] if tail else ""
        sub = tail[1] if len(tail) > 1 else ""
        if rt.namespaced and ns is None and name:
            raise ApiError.no_route()
        if sub and sub not in self._subresources(rt):
            raise ApiError.no_route()
        return Target(rt, ns, name, sub)

    @staticmethod
    def _subresources(rt: ResourceType) -> set[str]:
        subs = {"status"} if rt.status_subresource else set()
        if rt.scale_subresource:
            subs.add("scale")
        if rt.key == ("", "serviceaccounts"):
            subs.add("token")
        if rt.key == ("", "namespaces"):
            subs.add("finalize")
        if rt.key == ("", "pods"):
            subs |= podapi.SUBRESOURCES
        return subs

    @staticmethod
    def _verb(request: web.Request, target: Target) -> str:
        m = request.method
        if target.subresource in podapi.STREAMING:
            return "create"  # as kube authorizes exec, also over a WebSocket GET
        if m == "GET":
            if target.name:
                return "get"
            return "watch" if request.query.get("watch") in ("true", "1") else "list"
        if m == "POST":
            return "create"
        if m == "PUT":
            return "update"
        if m == "PATCH":
            return "patch"
        if m == "DELETE":
            return "delete" if target.name else "deletecollection"
        raise ApiError.method_not_allowed(m, target.rt.plural)

    # -- non-resource paths -------------------------------------------------------------

    async def _non_resource(self, request: web.Request, user: User) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        self._authorize(user, Attributes(verb="get", path=request.path))
        if request.method != "GET":
            raise ApiError.method_not_allowed(request.method, path)
        if path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        if path == "/version":
            return respond(discovery.KUBE_VERSION)
        if path == "/metrics":
            return web.Response(body=generate_latest(self.metrics),
                                content_type="text/plain", charset="utf-8")
        if path == "/api":
            return respond(discovery.api_versions(self.server_address()))
        if path == "/apis":
            return respond(discovery.api_group_list(self.catalog))
        if path == "/api/v1":
            doc = discovery.api_resource_list(self.catalog, "v1")
            return respond(doc)
        if path == "/openapi/v3":
            return respond(discovery.openapi_v3_index(self.catalog))
        if path == "/openapi/v2":
            return self._openapi_v2(request.headers.get("Accept", ""))
        parts = path.strip("/").split("/")
        if parts[:2] == ["openapi", "v3"] and len(parts) > 2:
            found = discovery.openapi_v3_document(self.catalog, "/".join(parts[2:]))
            if found is not None:
                return respond(found)
        if parts[0] == "apis" and len(parts) == 2:
            group = discovery.api_group(self.catalog, parts[1])
            if group is not None:
                return respond(group)
        if parts[0] == "apis" and len(parts) == 3:
            doc = discovery.api_resource_list(self.catalog, f"{parts[1]}/{parts[2]}")
            if doc is not None:
                return respond(doc)
        raise ApiError.no_route()

    def _openapi_v2(self, accept: str) -> web.Response:
        media = openapiv2.negotiate(accept)
        if media is None:
            return web.Response(status=406, text="only application/json and "
                                f"{openapiv2.PROTOBUF_TYPES[0]} are served")
        doc, encoded = discovery.openapi_v2(self.catalog)
        if media == openapiv2.JSON_TYPE:
            return respond(doc)
        return web.Response(body=encoded, headers={"Content-Type": media})

    # -- resources ----------------------------------------------------------------------

    async def _body(self, request: web.Request) -> Any:
        if request.content_length is not None and request.content_length > self.max_body:
            raise ApiError.too_large(self.max_body)
        # read(n) returns what has arrived, up to n: a body in several segments
        # takes several reads.
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.read(65536):
            size += len(chunk)
            if size > self.max_body:
                raise ApiError.too_large(self.max_body)
            chunks.append(chunk)
        raw = b"".join(chunks)
        # aiohttp reports a missing Content-Type as octet-stream; kube reads such bodies as JSON.
        ctype = request.content_type if "Content-Type" in request.headers else ""
        if raw and ctype == protobuf.CONTENT_TYPE:
            return protobuf.decode(raw)
        if ctype == APPLY_TYPE and request.method == "PATCH":
            ctype = "application/yaml"  # an apply configuration is YAML (JSON included)
        if raw and ctype not in YAML_TYPES | JSON_TYPES | PATCH_TYPES:
            # kube's answer to a body it cannot decode; client-go retries such requests as JSON.
            raise ApiError.unsupported_media_type(ctype)
        try:
            if ctype in YAML_TYPES:
                return yaml.safe_load(raw)
            return json.loads(raw) if raw else None
        except (ValueError, yaml.YAMLError) as e:
            kind = "YAML" if ctype in YAML_TYPES else "JSON"
            raise ApiError.bad_request(f"the body of the request is not valid {kind}: "
                                       f"{str(e).splitlines()[0]}") from e

    @staticmethod
    def _options(request: web.Request, user: User) -> WriteOptions:
        validation = request.query.get("fieldValidation", "Warn") or "Warn"
        if validation not in ("Strict", "Warn", "Ignore"):
            raise ApiError.bad_request(f"fieldValidation must be one of Strict, Warn or Ignore, "
                                       f"got {validation!r}")
        dry = request.query.getall("dryRun", [])
        if any(d != "All" for d in dry):
            raise ApiError.bad_request(f"dryRun must be All, got {dry}")
        manager = request.query.get("fieldManager") or managedfields.default_manager(
            request.headers.get("User-Agent", ""))
        managedfields.check_manager(manager)
        return WriteOptions(dry_run=bool(dry), field_validation=validation,
                            field_manager=manager, user=user)

    def _selectors(self, request: web.Request, rt: ResourceType
                   ) -> tuple[LabelSelector | None, FieldSelector | None]:
        label_text = request.query.get("labelSelector", "")
        field_text = request.query.get("fieldSelector", "")
        labels = LabelSelector.parse(label_text) if label_text else None
        fields = FieldSelector.parse(field_text, rt.field_labels) if field_text else None
        return labels, fields

    async def _resource(self, request: web.Request, user: User, target: Target,
                        verb: str) -> web.StreamResponse:
        handler: Callable[[web.Request, User, Target], Awaitable[web.StreamResponse]] = {
            "get": self._get, "list": self._list, "watch": self._watch,
            "create": self._create, "update": self._update, "patch": self._patch,
            "delete": self._delete, "deletecollection": self._delete_collection,
        }[verb]
        if verb not in target.rt.verbs and not (target.subresource == "token"
                                                 and verb == "create"):
            raise ApiError.method_not_allowed(verb, target.rt.plural)
        if target.subresource in podapi.REFUSED:
            raise podapi.streaming_refused(target.subresource)
        if target.subresource == "exec":
            return await podapi.serve_exec(request, self.registry.get(
                target.rt, self._scope(target), target.name), self.kubelet)
        return await handler(request, user, target)

    def _scope(self, t: Target) -> str:
        return (t.namespace or "") if t.rt.namespaced else ""

    async def _get(self, request: web.Request, user: User, t: Target) -> web.StreamResponse:
        obj = self.registry.get(t.rt, self._scope(t), t.name)
        if t.subresource == "log":
            return await podapi.serve_log(request, obj, self.kubelet)
        if t.subresource == "scale":
            return respond(scale.scale_of(t.rt, obj))
        if tables.wants_table(request.headers.get("Accept", "")):
            return respond(tables.table(t.rt, [obj], {"resourceVersion": str(
                self.registry.store.rv)}))
        return respond(obj)

    async def _list(self, request: web.Request, user: User, t: Target) -> web.StreamResponse:
        listoptions.parse(request.query, watch=False)
        labels, fields = self._selectors(request, t.rt)
        try:
            limit = int(request.query.get("limit", "0") or 0)
        except ValueError as e:
            raise ApiError.bad_request(f"limit must be an integer: {e}") from e
        ns = t.namespace if t.rt.namespaced else None
        listed = self.registry.list_objects(
            t.rt, ns, labels=labels, fields=fields, limit=limit,
            continue_token=request.query.get("continue", ""))
        if tables.wants_table(request.headers.get("Accept", "")):
            return respond(tables.table(t.rt, listed["items"], listed["metadata"]))
        return respond(listed)

    async def _watch(self, request: web.Request, user: User, t: Target) -> web.StreamResponse:
        opts = listoptions.parse(request.query, watch=True)
        labels, fields = self._selectors(request, t.rt)
        try:
            timeout = float(request.query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT)
        except ValueError as e:
            raise ApiError.bad_request(f"timeoutSeconds must be a number: {e}") from e
        rv = opts.resource_version
        if opts.send_initial_events is False and rv in ("", "0"):
            rv = str(self.registry.store.rv)  # no initial state: from now on
        req = WatchRequest(
            rt=t.rt, namespace=t.namespace if t.rt.namespaced else None, resource_version=rv,
            labels=labels, fields=fields,
            bookmarks=request.query.get("allowWatchBookmarks") in ("true", "1"),
            timeout=timeout, initial_events_end=bool(opts.send_initial_events))
        if opts.send_initial_events and rv not in ("", "0") and not rv.isdigit():
            raise ApiError.bad_request(f"invalid resourceVersion {rv!r}")
        initial = None
        if rv in ("", "0") or opts.send_initial_events:
            initial = self.registry.list_objects(t.rt, req.namespace, labels=labels,
                                         fields=fields)["items"]
        storage = self.catalog.storage_type(t.rt.key)
        conversion = conversion_for(t.rt)
        view = conversion.from_storage if conversion else None
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = view
        if tables.wants_table(request.headers.get("Accept", "")):
            def transform(obj: dict[str, Any]) -> dict[str, Any]:
                return tables.table(t.rt, [view(obj) if view else obj])
        return await serve_watch(request, req, self.registry.store,
                                 bookmark_interval=self.bookmark_interval, initial=initial,
                                 rewrite_version=storage is not t.rt, transform=transform)

    async def _create(self, request: web.Request, user: User, t: Target) -> web.StreamResponse:
        body = await self._body(request)
        if t.subresource == "token":
            return respond(reviews.token_request(self.registry, self.tokens, t.namespace or "",
                                                 t.name, body), 201)
        if t.subresource == "binding":
            return respond(await podapi.bind(self.registry, t.namespace or "", t.name, body,
                                             dry_run=self._options(request, user).dry_run), 201)
        if t.name:
            raise ApiError.method_not_allowed("create", t.rt.plural)
        if not t.rt.persisted:
            if t.rt.kind == "Binding":
                if t.namespace is None:
                    raise ApiError.no_route()
                return respond(await podapi.bind(self.registry, t.namespace, "", body,
                                                 dry_run=self._options(request, user).dry_run), 201)
            if t.rt.kind == "TokenReview":
                return respond(reviews.token_review(self.tokens, body), 201)
            if t.rt.kind == "SelfSubjectReview":
                return respond(reviews.self_subject_review(user, self.registry.clock), 201)
            if t.rt.kind == "SelfSubjectRulesReview":
                return respond(reviews.rules_review(self.authorizer, user, body), 201)
            return respond(reviews.access_review(t.rt, self.authorizer, user, body), 201)
        if t.rt.namespaced and t.namespace is None:
            raise ApiError.no_route()
        out = await self.registry.create(t.rt, t.namespace or "", body,
                                         self._options(request, user))
        return respond(out.obj, 201, out.warnings)

    async def _update(self, request: web.Request, user: User, t: Target) -> web.StreamResponse:
        body = await self._body(request)
        if t.subresource == "scale":
            return respond(await scale.update_scale(
                self.registry, t.rt, body, ns=self._scope(t), name=t.name,
                opts=self._options(request, user)))
        if t.subresource == "finalize":
            out = await self.registry.update(t.rt, "", t.name, body,
                                             self._options(request, user))
        else:
            out = await self.registry.update(t.rt, self._scope(t), t.name, body,
                                             self._options(request, user),
                                             subresource=t.subresource)
        return respond(out.obj, 201 if out.created else 200, out.warnings)

    async def _patch(self, request: web.Request, user: User, t: Target) -> web.StreamResponse:
        body = await self._body(request)
        if request.content_type == APPLY_TYPE:
            if t.subresource not in ("", "status"):
                raise ApiError.method_not_allowed("apply", f"{t.rt.plural}/{t.subresource}")
            force = managedfields.apply_options(request.query.get("fieldManager", ""),
                                                request.query.get("force"))
            out = await self.registry.apply(t.rt, self._scope(t), t.name, body,
                                            self._options(request, user), force=force,
                                            subresource=t.subresource)
            return respond(out.obj, 201 if out.created else 200, out.warnings)
        if "force" in request.query:
            raise managedfields.options_error("force", "Forbidden",
                                              "may not be specified for non-apply patch")
        if t.subresource == "scale":
            return respond(await scale.patch_scale(
                self.registry, t.rt, body, content_type=request.content_type,
                ns=self._scope(t), name=t.name, opts=self._options(request, user)))
        out = await self.registry.patch(t.rt, self._scope(t), t.name, request.content_type,
                                        body, self._options(request, user),
                                        subresource=t.subresource)
        return respond(out.obj, 200, out.warnings)

    async def _delete(self, request: web.Request, user: User, t: Target) -> web.StreamResponse:
        body = await self._body(request)
        options = body if isinstance(body, dict) else {}
        if "gracePeriodSeconds" in request.query:
            options = {**options, "gracePeriodSeconds": podapi.grace_query(request.query)}
        if "propagationPolicy" in request.query:
            options = {**options, "propagationPolicy": request.query["propagationPolicy"]}
        obj = await self.registry.delete(t.rt, self._scope(t), t.name, options,
                                         self._options(request, user))
        return respond(delete_response(t.rt, obj))

    async def _delete_collection(self, request: web.Request, user: User,
                                 t: Target) -> web.StreamResponse:
        labels, fields = self._selectors(request, t.rt)
        ns = t.namespace if t.rt.namespaced else None
        return respond(await self.registry.delete_collection(
            t.rt, ns, labels=labels, fields=fields, opts=self._options(request, user)))
