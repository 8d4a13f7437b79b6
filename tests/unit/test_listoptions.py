"""List and watch option validation: kube's ValidateListOptions, WatchList on."""

from __future__ import annotations

import pytest

from localcluster.errors import ApiError
from localcluster.listoptions import parse


def test_plain_watch_and_list_pass() -> None:
    assert parse({}, watch=True).send_initial_events is None
    assert parse({"resourceVersion": "5"}, watch=False).resource_version == "5"
    opts = parse({"sendInitialEvents": "true", "resourceVersionMatch": "NotOlderThan"},
                 watch=True)
    assert opts.send_initial_events is True
    opts = parse({"sendInitialEvents": "false", "resourceVersionMatch": "NotOlderThan",
                  "resourceVersion": "7"}, watch=True)
    assert opts.send_initial_events is False
    assert parse({"resourceVersion": "3", "resourceVersionMatch": "Exact"},
                 watch=False).resource_version_match == "Exact"


@pytest.mark.parametrize(("query", "watch", "causes"), [
    ({"sendInitialEvents": "false"}, True, [
        ("resourceVersionMatch", "FieldValueForbidden")]),
    ({"resourceVersionMatch": "NotOlderThan", "continue": "x", "sendInitialEvents": "1"},
     True, [("resourceVersionMatch", "FieldValueForbidden")]),
    ({"resourceVersionMatch": "Bogus"}, False, [
        ("resourceVersionMatch", "FieldValueForbidden"),
        ("resourceVersionMatch", "FieldValueNotSupported")]),
    ({"resourceVersion": "1", "resourceVersionMatch": "NotOlderThan", "continue": "c"}, False,
     [("resourceVersionMatch", "FieldValueForbidden")]),
    ({"sendInitialEvents": "false"}, False, [("sendInitialEvents", "FieldValueForbidden")]),
])
def test_refusals(query: dict[str, str], watch: bool, causes: list[tuple[str, str]]) -> None:
    with pytest.raises(ApiError) as info:
        parse(query, watch=watch)
    err = info.value
    assert (err.code, err.reason, err.kind, err.group) == (422, "Invalid", "ListOptions",
                                                           "meta.k8s.io")
    assert [(c.field, c.reason) for c in err.causes] == causes
    assert err.message.startswith('ListOptions.meta.k8s.io "" is invalid: ')
    assert err.message.count("[") == (1 if len(causes) > 1 else 0)


def test_unsupported_value_lists_the_supported_ones() -> None:
    with pytest.raises(ApiError) as info:
        parse({"resourceVersion": "1", "resourceVersionMatch": "Newest"}, watch=False)
    assert info.value.message == (
        'ListOptions.meta.k8s.io "" is invalid: resourceVersionMatch: Unsupported value: '
        '"Newest": supported values: "Exact", "NotOlderThan", ""')


def test_bad_boolean() -> None:
    with pytest.raises(ApiError) as info:
        parse({"sendInitialEvents": "yes", "resourceVersionMatch": "NotOlderThan"}, watch=True)
    assert info.value.code == 400
    assert info.value.message == 'strconv.ParseBool: parsing "yes": invalid syntax'
