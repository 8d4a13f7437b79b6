"""Admission webhooks: the MutatingWebhookConfigurations and
ValidatingWebhookConfigurations in the store, called for the writes they match
as kube-apiserver's MutatingAdmissionWebhook and ValidatingAdmissionWebhook
plugins do (k8s.io/apiserver/pkg/admission/plugin/webhook).

Matching is kube's: ``namespaceSelector`` on the labels of the request's
namespace (the object's own for a Namespace create or update; never exempting
other cluster-scoped kinds), ``objectSelector`` on the new or the old object's
labels, then ``rules`` (operations, apiGroups, apiVersions, resources with
``/subresource`` and ``*``, scope), and with ``matchPolicy: Equivalent`` the
other versions of the same stored resource (events.k8s.io/v1 Events for a
core/v1 rule, a CRD's other versions), the object sent in the matched version.
The webhook configurations themselves are never sent to webhooks.

Mutating webhooks run one after another, configurations in name order and
webhooks in their listed order, each JSONPatch applied, the patched object
decoded against the kind's schema and defaulted again; if one changed the
object, those before it with ``reinvocationPolicy: IfNeeded`` are called once
more. Validating webhooks are called concurrently, after the object's own
validation; the first refusal answers. A refusal is kube's ``admission webhook
"<name>" denied the request: <message>`` with the webhook's code (400 when it
gave none under 400); a webhook that cannot be called or answers unusably
refuses with ``Internal error occurred: failed calling webhook "<name>": ...``
(500) under ``failurePolicy: Fail`` and is skipped with a log line and the
``apiserver_admission_webhook_fail_open_count`` metric under ``Ignore``.
Warnings in answers are passed to the client as ``Warning`` headers.

Not done: audit annotations in answers are ignored (this server keeps no audit
log), ``matchConditions`` are refused when a configuration is written (see
`webhookconfig`), and writes made by the server's own controllers are sent with
the user ``system:apiserver``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from localcluster import patch
from localcluster.auth import User
from localcluster.catalog import Catalog
from localcluster.defaults import admit_pod, default_pod_spec, default_service_spec
from localcluster.errors import ApiError, Cause
from localcluster.resources import ResourceType
from localcluster.selectors import LabelSelector
from localcluster.store import Store
from localcluster.webhookcall import CallError, WebhookClient
from localcluster.webhookconfig import MUTATING, VALIDATING, is_configuration

log = logging.getLogger("localcluster.webhooks")

NAMESPACES = ("", "namespaces")
REVIEW_VERSION = "admission.k8s.io/v1"
SERVER_USER = User("system:apiserver", groups=("system:authenticated", "system:masters"))

Decode = Callable[[ResourceType, Any], dict[str, Any]]
Present = Callable[[ResourceType, Mapping[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Attributes:
    """What is being admitted (kube's admission.Attributes)."""

    rt: ResourceType
    operation: str
    namespace: str
    name: str
    subresource: str = ""
    user: User | None = None
    dry_run: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hook:
    configuration: str
    index: int
    spec: Mapping[str, Any]

    @property
    def name(self) -> str:
        return str(self.spec.get("name", ""))

    @property
    def uid(self) -> str:
        return f"{self.configuration}/{self.name}/{self.index}"

    @property
    def ignores_failures(self) -> bool:
        return self.spec.get("failurePolicy") == "Ignore"


@dataclass(frozen=True)
class Invocation:
    hook: Hook
    rt: ResourceType
    """The resource the rule matched: the request's, or an equivalent version of it."""


@dataclass
class Answer:
    allowed: bool
    result: Mapping[str, Any] | None
    patch: bytes = b""
    patch_type: str = ""
    warnings: list[str] = field(default_factory=list)


def options_for(operation: str, *, dry_run: bool, field_manager: str,
                delete_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``options`` of an AdmissionRequest: Create/Update/DeleteOptions as sent."""
    kind = {"CREATE": "CreateOptions", "UPDATE": "UpdateOptions"}.get(operation,
                                                                     "DeleteOptions")
    out: dict[str, Any] = {"kind": kind, "apiVersion": "meta.k8s.io/v1"}
    if kind == "DeleteOptions":
        out.update({k: v for k, v in (delete_options or {}).items()
                    if k not in ("kind", "apiVersion")})
    elif field_manager:
        out["fieldManager"] = field_manager
    if dry_run:
        out["dryRun"] = ["All"]
    return out


def kind_defaults(rt: ResourceType, obj: dict[str, Any], old: Mapping[str, Any] | None,
                  operation: str) -> None:
    """What kube's decoding defaults and in-tree mutating admission (ServiceAccount,
    Priority, DefaultTolerationSeconds) have done to an object before webhooks see it."""
    if rt.key == ("", "pods"):
        default_pod_spec(obj.setdefault("spec", {}))
        if operation == "CREATE":
            status = obj.get("status")
            admit_pod(obj)
            if status is None:
                obj.pop("status", None)
            else:
                obj["status"] = status
    elif rt.key == ("", "services"):
        default_service_spec(obj.setdefault("spec", {}), old)


def _rule_matches(rule: Mapping[str, Any], attrs: Attributes, rt: ResourceType) -> bool:
    def exact_or_wildcard(items: Any, wanted: str) -> bool:
        return any(i in ("*", wanted) for i in items or [])

    scope = rule.get("scope") or "*"
    is_namespace = rt.key == NAMESPACES
    if scope == "Namespaced" and (is_namespace or not attrs.namespace):
        return False
    if scope == "Cluster" and not (is_namespace or not attrs.namespace):
        return False
    if scope not in ("*", "Namespaced", "Cluster"):
        return False
    if not exact_or_wildcard(rule.get("operations"), attrs.operation):
        return False
    if not exact_or_wildcard(rule.get("apiGroups"), rt.group):
        return False
    if not exact_or_wildcard(rule.get("apiVersions"), rt.version):
        return False
    for res_sub in rule.get("resources") or []:
        res, _, sub = str(res_sub).partition("/")
        if res in ("*", rt.plural) and sub in ("*", attrs.subresource):
            return True
    return False


def status_error(name: str, result: Mapping[str, Any] | None) -> ApiError:
    """kube's webhookerrors.ToStatusErr: a refusal as the Status the client gets."""
    result = dict(result or {})
    given = result.get("code")
    code = given if isinstance(given, int) and given >= 400 else 400
    denied = f'admission webhook "{name}" denied the request'
    if result.get("message"):
        message = f"{denied}: {result['message']}"
    elif result.get("reason"):
        message = f"{denied}: {result['reason']}"
    else:
        message = f"{denied} without explanation"
    found = result.get("details")
    details: Mapping[str, Any] = found if isinstance(found, dict) else {}
    causes = [Cause(str(c.get("field", "")), str(c.get("message", "")), str(c.get("reason", "")))
              for c in details.get("causes") or [] if isinstance(c, dict)]
    return ApiError(code, str(result.get("reason") or ""), message,
                    group=str(details.get("group", "")), kind=str(details.get("kind", "")),
                    name=str(details.get("name", "")), causes=causes)


def internal_error(message: str) -> ApiError:
    """kube's NewInternalError: the message once more as the only cause."""
    return ApiError(500, "InternalError", f"Internal error occurred: {message}",
                    causes=[Cause("", message, "")])


def verify_answer(uid: str, answer: Any, *, mutating: bool) -> Answer:
    """kube's VerifyAdmissionResponse for AdmissionReview v1."""
    if not isinstance(answer, dict):
        raise CallError("received invalid webhook response: webhook response was absent")
    if answer.get("apiVersion") != REVIEW_VERSION or answer.get("kind") != "AdmissionReview":
        got = f"{answer.get('apiVersion') or '/'}, Kind={answer.get('kind') or ''}"
        raise CallError("received invalid webhook response: expected webhook response of "
                        f"admission.k8s.io/v1, Kind=AdmissionReview, got {got}")
    response = answer.get("response")
    if not isinstance(response, dict):
        raise CallError("received invalid webhook response: webhook response was absent")
    if response.get("uid") != uid:
        raise CallError(f'received invalid webhook response: expected response.uid="{uid}", '
                        f'got "{response.get("uid") or ""}"')
    raw_patch, patch_type = response.get("patch"), response.get("patchType")
    patch_bytes = b""
    if raw_patch:
        try:
            patch_bytes = base64.b64decode(str(raw_patch), validate=True)
        except (binascii.Error, ValueError) as e:
            raise CallError(f"failed to call webhook: illegal base64 data in response.patch: "
                            f"{e}") from e
    if mutating:
        if patch_bytes and patch_type is None:
            raise CallError("received invalid webhook response: webhook returned "
                            "response.patch but not response.patchType")
        if not patch_bytes and patch_type is not None:
            raise CallError("received invalid webhook response: webhook returned "
                            "response.patchType but not response.patch")
        if patch_type == "":
            raise CallError('received invalid webhook response: webhook returned invalid '
                            'response.patchType of ""')
    elif patch_bytes:
        raise CallError("received invalid webhook response: validating webhook may not return "
                        "response.patch")
    elif patch_type is not None:
        raise CallError("received invalid webhook response: validating webhook may not return "
                        "response.patchType")
    warnings = [str(w) for w in response.get("warnings") or []]
    result = response.get("status") if isinstance(response.get("status"), dict) else None
    return Answer(bool(response.get("allowed")), result, patch_bytes, str(patch_type or ""),
                  warnings)


class Webhooks:
    """Calls the webhooks a write matches; see the module's doc."""

    def __init__(self, store: Store, catalog: Catalog, *, present: Present, decode: Decode,
                 client: WebhookClient | None = None) -> None:
        self.store = store
        self.catalog = catalog
        self.present = present
        self.decode = decode
        self.client = client or WebhookClient(store.get, store.items)
        self.fail_open: Counter | None = None
        self.rejections: Counter | None = None

    def attach_metrics(self, registry: CollectorRegistry) -> None:
        self.fail_open = Counter(
            "apiserver_admission_webhook_fail_open_count",
            "Admission webhook calls that failed and were ignored (failurePolicy Ignore)",
            ["name", "type"], registry=registry)
        self.rejections = Counter(
            "apiserver_admission_webhook_rejection_count",
            "Requests refused by admission webhooks, by webhook and cause",
            ["name", "type", "operation", "error_type", "rejection_code"], registry=registry)

    # -- which webhooks ------------------------------------------------------------------

    def configured(self) -> bool:
        """Whether any webhook configuration exists (else admission has nothing to call)."""
        return any(self.store.count(key) for key in (MUTATING, VALIDATING))

    def _hooks(self, key: tuple[str, str]) -> list[Hook]:
        configs = sorted(self.store.items(key), key=lambda c: c["metadata"]["name"])
        return [Hook(c["metadata"]["name"], i, h)
                for c in configs for i, h in enumerate(c.get("webhooks") or [])]

    def _namespace_labels(self, attrs: Attributes, obj: Mapping[str, Any] | None
                          ) -> Mapping[str, str] | None:
        if (attrs.rt.plural == "namespaces" and not attrs.subresource
                and attrs.operation in ("CREATE", "UPDATE") and obj is not None):
            return (obj.get("metadata") or {}).get("labels") or {}
        ns = self.store.get(NAMESPACES, "", attrs.namespace)
        return None if ns is None else (ns["metadata"].get("labels") or {})

    def _match(self, hook: Hook, attrs: Attributes, obj: Mapping[str, Any] | None,
               old: Mapping[str, Any] | None) -> Invocation | None:
        """kube's ShouldCallHook: selectors, then rules; a missing namespace is a 404."""
        ns_error: ApiError | None = None
        ns_selector = LabelSelector.from_label_selector(hook.spec.get("namespaceSelector") or {})
        if (attrs.namespace or attrs.rt.plural == "namespaces") and not ns_selector.empty:
            labels = self._namespace_labels(attrs, obj)
            if labels is None:
                ns_error = ApiError.not_found("namespaces", attrs.namespace)
            elif not ns_selector.matches(labels):
                return None
        obj_selector = LabelSelector.from_label_selector(hook.spec.get("objectSelector") or {})
        if not obj_selector.empty and not any(
                o is not None and obj_selector.matches((o.get("metadata") or {}).get("labels"))
                for o in (obj, old)):
            return None
        rules = hook.spec.get("rules") or []
        invocation = next((Invocation(hook, attrs.rt) for r in rules
                           if _rule_matches(r, attrs, attrs.rt)), None)
        if invocation is None and hook.spec.get("matchPolicy", "Equivalent") == "Equivalent":
            equivalents = [t for t in self.catalog.all()
                           if t.key == attrs.rt.key and t is not attrs.rt]
            invocation = next((Invocation(hook, t) for r in rules for t in equivalents
                               if _rule_matches(r, attrs, t)), None)
        if invocation is not None and ns_error is not None:
            raise ns_error
        return invocation

    # -- calling ---------------------------------------------------------------------------

    def _review(self, uid: str, inv: Invocation, attrs: Attributes,
                obj: Mapping[str, Any] | None, old: Mapping[str, Any] | None) -> dict[str, Any]:
        rt = inv.rt
        request: dict[str, Any] = {
            "uid": uid,
            "kind": {"group": rt.group, "version": rt.version, "kind": rt.kind},
            "resource": {"group": rt.group, "version": rt.version, "resource": rt.plural},
            "requestKind": {"group": attrs.rt.group, "version": attrs.rt.version,
                            "kind": attrs.rt.kind},
            "requestResource": {"group": attrs.rt.group, "version": attrs.rt.version,
                                "resource": attrs.rt.plural},
            "operation": attrs.operation,
            "userInfo": (attrs.user or SERVER_USER).to_dict(),
            "object": None if obj is None else self.present(rt, obj),
            "oldObject": None if old is None else self.present(rt, old),
            "dryRun": attrs.dry_run,
            "options": dict(attrs.options),
        }
        if attrs.subresource:
            request["subResource"] = request["requestSubResource"] = attrs.subresource
        if attrs.name:
            request["name"] = attrs.name
        if attrs.namespace:
            request["namespace"] = attrs.namespace
        return {"apiVersion": REVIEW_VERSION, "kind": "AdmissionReview", "request": request}

    async def _call(self, inv: Invocation, attrs: Attributes, obj: Mapping[str, Any] | None,
                    old: Mapping[str, Any] | None, *, mutating: bool) -> Answer | None:
        """One call; None when it failed and the webhook's failurePolicy is Ignore."""
        hook = inv.hook
        kind = "admit" if mutating else "validating"
        if attrs.dry_run and hook.spec.get("sideEffects") not in ("None", "NoneOnDryRun"):
            raise ApiError.bad_request(f'admission webhook "{hook.name}" does not support '
                                       "dry run")
        uid = str(uuid.uuid4())
        try:
            answer = verify_answer(uid, await self.client.post(
                hook.spec.get("clientConfig") or {}, self._review(uid, inv, attrs, obj, old),
                timeout=int(hook.spec.get("timeoutSeconds") or 10)), mutating=mutating)
            if answer.patch and answer.patch_type != "JSONPatch":
                raise CallError(f'unsupported patch type "{answer.patch_type}"')
        except CallError as e:
            failure = f'failed calling webhook "{hook.name}": {e}'
            if hook.ignores_failures:
                log.warning("webhook failed open name=%s type=%s operation=%s resource=%s "
                            "cause=%r", hook.name, kind, attrs.operation, attrs.rt.plural,
                            failure)
                if self.fail_open is not None:
                    self.fail_open.labels(hook.name, kind).inc()
                return None
            log.warning("webhook failed closed name=%s type=%s operation=%s resource=%s "
                        "cause=%r", hook.name, kind, attrs.operation, attrs.rt.plural, failure)
            self._rejected(hook, kind, attrs, "calling_webhook_error", 500)
            raise internal_error(failure) from e
        if not answer.allowed:
            err = status_error(hook.name, answer.result)
            self._rejected(hook, kind, attrs, "no_error", err.code)
            raise err
        return answer

    def _rejected(self, hook: Hook, kind: str, attrs: Attributes, error_type: str,
                  code: int) -> None:
        if self.rejections is not None:
            self.rejections.labels(hook.name, kind, attrs.operation, error_type,
                                   str(code)).inc()

    def _apply(self, inv: Invocation, answer: Answer, attrs: Attributes, obj: dict[str, Any],
               old: Mapping[str, Any] | None) -> dict[str, Any]:
        name = inv.hook.name
        try:
            operations = json.loads(answer.patch)
            if not isinstance(operations, list):
                raise ValueError("a JSON patch is a list of operations")
        except ValueError as e:
            raise internal_error(f'failed calling webhook "{name}": received undecodable patch '
                                 f"in webhook response: {e}") from e
        try:
            patched = patch.json_patch(self.present(inv.rt, obj), operations)
            new = self.decode(inv.rt, patched)
        except ApiError as e:
            raise internal_error(e.message) from e
        kind_defaults(attrs.rt, new, old, attrs.operation)
        return new

    # -- the two plugins --------------------------------------------------------------------

    async def mutate(self, attrs: Attributes, obj: dict[str, Any] | None,
                     old: Mapping[str, Any] | None) -> tuple[dict[str, Any] | None, list[str]]:
        """Run the mutating webhooks; the object they leave and their warnings."""
        warnings: list[str] = []
        if is_configuration(attrs.rt):
            return obj, warnings
        hooks = self._hooks(MUTATING)
        if not hooks:
            return obj, warnings
        if obj is not None:
            obj = copy.deepcopy(obj)
            kind_defaults(attrs.rt, obj, old, attrs.operation)
        previously: set[str] = set()
        reinvoke: set[str] = set()
        for again in (False, True):
            if again and not reinvoke:
                break
            for hook in hooks:
                inv = self._match(hook, attrs, obj, old)
                if inv is None or (again and hook.uid not in reinvoke):
                    continue
                answer = await self._call(inv, attrs, obj, old, mutating=True)
                changed = False
                if answer is not None:
                    warnings += answer.warnings
                    if answer.patch and answer.patch.strip() not in (b"[]", b"null"):
                        if obj is None:
                            raise internal_error(
                                f'admission webhook "{hook.name}" attempted to modify the '
                                "object, which is not supported for this operation")
                        new = self._apply(inv, answer, attrs, obj, old)
                        changed, obj = new != obj, new
                if changed and not again:
                    reinvoke |= previously
                    previously = set()
                if hook.spec.get("reinvocationPolicy") == "IfNeeded":
                    previously.add(hook.uid)
        return obj, warnings

    async def validate(self, attrs: Attributes, obj: Mapping[str, Any] | None,
                       old: Mapping[str, Any] | None) -> list[str]:
        """Run the validating webhooks concurrently; their warnings, or the first refusal."""
        if is_configuration(attrs.rt):
            return []
        invocations = [inv for hook in self._hooks(VALIDATING)
                       if (inv := self._match(hook, attrs, obj, old)) is not None]
        if not invocations:
            return []
        answers = await asyncio.gather(
            *(self._call(inv, attrs, obj, old, mutating=False) for inv in invocations),
            return_exceptions=True)
        warnings: list[str] = []
        for a in answers:
            if isinstance(a, BaseException):
                raise a
            if a is not None:
                warnings += a.warnings
        return warnings
