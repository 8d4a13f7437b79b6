"""Validation of list and watch query options as kube-apiserver does it.

The rules and wording are apimachinery's ``ValidateListOptions`` with the
WatchList feature on (kube-apiserver 1.32+): ``sendInitialEvents`` only on a
watch and only with ``resourceVersionMatch=NotOlderThan``, and
``resourceVersionMatch`` on a watch only together with ``sendInitialEvents``.
A violation is a 422 ``ListOptions.meta.k8s.io "" is invalid``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from localcluster.errors import ApiError, Cause

NOT_OLDER_THAN = "NotOlderThan"
EXACT = "Exact"


@dataclass(frozen=True)
class ListOptions:
    resource_version: str
    resource_version_match: str
    send_initial_events: bool | None
    """None when the query does not carry the parameter at all."""


def _bool(text: str) -> bool:
    # Go's strconv.ParseBool, which the query parameter conversion uses.
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise ApiError.bad_request(f'strconv.ParseBool: parsing "{text}": invalid syntax')


def _forbidden(field: str, detail: str) -> Cause:
    return Cause(field, f"Forbidden: {detail}", "FieldValueForbidden")


def _not_supported(field: str, value: str, supported: list[str]) -> Cause:
    listed = ", ".join(f'"{s}"' for s in supported)
    return Cause(field, f'Unsupported value: "{value}": supported values: {listed}',
                 "FieldValueNotSupported")


def invalid_list_options(causes: list[Cause]) -> ApiError:
    """kube's ``NewInvalid(meta.k8s.io ListOptions, "", errs)``: one cause plain, several
    in brackets."""
    listed = ", ".join(f"{c.field}: {c.message}" for c in causes)
    if len(causes) > 1:
        listed = f"[{listed}]"
    return ApiError(422, "Invalid", f'ListOptions.meta.k8s.io "" is invalid: {listed}',
                    group="meta.k8s.io", kind="ListOptions", causes=causes)


def parse(query: Mapping[str, str], *, watch: bool) -> ListOptions:
    """The options of a list or watch request, refused as kube refuses bad combinations."""
    rv = query.get("resourceVersion", "")
    match = query.get("resourceVersionMatch", "")
    raw_initial = query.get("sendInitialEvents")
    initial = None if raw_initial is None else _bool(raw_initial)
    cont = query.get("continue", "")
    causes: list[Cause] = []
    field = "resourceVersionMatch"
    if watch:
        if initial is not None and match != NOT_OLDER_THAN:
            causes.append(_forbidden(field, "sendInitialEvents requires setting "
                                     f"resourceVersionMatch to {NOT_OLDER_THAN}"))
        if match:
            if initial is None:
                causes.append(_forbidden(field, "resourceVersionMatch is forbidden for watch "
                                         "unless sendInitialEvents is provided"))
            if match != NOT_OLDER_THAN:
                causes.append(_not_supported(field, match, [NOT_OLDER_THAN]))
            if cont:
                causes.append(_forbidden(field, "resourceVersionMatch is forbidden when "
                                         "continue is provided"))
    else:
        if match:
            if not rv:
                causes.append(_forbidden(field, "resourceVersionMatch is forbidden unless "
                                         "resourceVersion is provided"))
            if cont:
                causes.append(_forbidden(field, "resourceVersionMatch is forbidden when "
                                         "continue is provided"))
            if match not in (EXACT, NOT_OLDER_THAN):
                causes.append(_not_supported(field, match, [EXACT, NOT_OLDER_THAN, ""]))
            if match == EXACT and rv == "0":
                causes.append(_forbidden(field, 'resourceVersionMatch "exact" is forbidden for '
                                         'resourceVersion "0"'))
        if initial is not None:
            causes.append(_forbidden("sendInitialEvents",
                                     "sendInitialEvents is forbidden for list"))
    if causes:
        raise invalid_list_options(causes)
    return ListOptions(rv, match, initial)
