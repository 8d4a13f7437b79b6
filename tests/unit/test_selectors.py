"""Label and field selectors: kube's grammar, its error messages, and matching."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from localcluster.errors import ApiError
from localcluster.selectors import (
    FieldOperator,
    FieldRequirement,
    FieldSelector,
    LabelSelector,
    Operator,
    Requirement,
    escape_field_value,
)

# ---------------------------------------------------------------- label selector parsing


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("", ""),
        ("app=web", "app=web"),
        ("app==web", "app==web"),
        ("app!=web", "app!=web"),
        ("  app = web ,  tier != db  ", "app=web,tier!=db"),
        ("tier in (db, cache)", "tier in (cache,db)"),
        ("tier in (db,db)", "tier in (db)"),
        ("tier notin (db)", "tier notin (db)"),
        ("tier", "tier"),
        ("!tier", "!tier"),
        ("! tier", "!tier"),
        ("app=", "app="),
        ("app in ()", "app in ()"),
        ("app in (,a)", "app in (,a)"),
        ("app in (a,)", "app in (,a)"),
        ("example.com/app=web", "example.com/app=web"),
        ("a.b-c_d=E.f-g_h", "a.b-c_d=E.f-g_h"),
        ("replicas>2", "replicas>2"),
        ("replicas<10", "replicas<10"),
        # `in` and `notin` are ordinary words outside the operator position.
        ("in in (in, notin)", "in in (in,notin)"),
        # Requirements are kept sorted by key, as kube does.
        ("z=1,a=2,m", "a=2,m,z=1"),
    ],
)
def test_parse_accepts_kube_syntax(text: str, canonical: str) -> None:
    selector = LabelSelector.parse(text)
    assert str(selector) == canonical
    assert LabelSelector.parse(canonical) == selector


def test_parse_builds_requirements() -> None:
    selector = LabelSelector.parse("tier notin (b,a),!legacy,app")
    assert selector.requirements == (
        Requirement("app", Operator.EXISTS),
        Requirement("legacy", Operator.DOES_NOT_EXIST),
        Requirement("tier", Operator.NOT_IN, ("a", "b")),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("app web",
         "unable to parse requirement: found 'web', expected: in, notin, =, ==, !=, gt, lt"),
        ("app=web db", "found 'db', expected: ',' or 'end of string'"),
        ("app,", "found '', expected: identifier after ','"),
        ("app,,b", "found ',', expected: identifier after ','"),
        ("=web", "found '=', expected: !, identifier, or 'end of string'"),
        ("!app=web", "found '=', expected: ',' or 'end of string'"),
        ("app in web", "unable to parse requirement: found 'web' expected: '('"),
        ("app in (a b)", "unable to parse requirement: found 'b', expected: ',' or ')'"),
        ("app in (a", "unable to parse requirement: found '', expected: ',' or ')'"),
        ("app in )", "unable to parse requirement: found ')' expected: '('"),
        ("app=(", "unable to parse requirement: found '(', expected: identifier"),
        ("!=x", "found '!=', expected: !, identifier, or 'end of string'"),
        ("replicas>two", "for 'Gt', 'Lt' operators, the value must be an integer"),
    ],
)
def test_parse_errors_read_like_kube(text: str, message: str) -> None:
    with pytest.raises(ApiError) as caught:
        LabelSelector.parse(text)
    assert caught.value.code == 400
    assert caught.value.reason == "BadRequest"
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("text", "offending", "detail"),
    [
        ("app$=web", '"app$"', "name part must consist of alphanumeric characters"),
        ("-app=web", '"-app"', "name part must consist of alphanumeric characters"),
        ("a/b/c=web", '"a/b/c"', "a qualified name must consist of"),
        ("/app=web", '"/app"', "prefix part must be non-empty"),
        ("Example.com/app=web", '"Example.com/app"', "prefix part a lowercase RFC 1123 subdomain"),
        ("example.com/=web", '"example.com/"', "name part must be non-empty"),
        ("a" * 64 + "=web", '"' + "a" * 64 + '"', "name part must be no more than 63 characters"),
        ("app=web!", "", "found '!', expected: ',' or 'end of string'"),
        ("app=we$b", '"we$b"', "a valid label must be an empty string or consist of"),
        ("app=-web", '"-web"', "a valid label must be an empty string"),
        ("app=" + "v" * 64, '"' + "v" * 64 + '"', "must be no more than 63 characters"),
        ("app in (ok, bad$)", '"bad$"', "a valid label must be an empty string"),
    ],
)
def test_parse_validates_keys_and_values(text: str, offending: str, detail: str) -> None:
    with pytest.raises(ApiError) as caught:
        LabelSelector.parse(text)
    assert offending in caught.value.message
    assert detail in caught.value.message


def test_key_and_value_limits_are_inclusive() -> None:
    prefix = ".".join(["a" * 63] * 3) + "." + "b" * 61  # 253 characters
    key = f"{prefix}/{'n' * 63}"
    selector = LabelSelector.parse(f"{key}={'v' * 63}")
    assert selector.matches({key: "v" * 63})
    with pytest.raises(ApiError, match="prefix part must be no more than 253 characters"):
        LabelSelector.parse(f"x{prefix}/n=v")


# ---------------------------------------------------------------- label matching


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("", {}, True),
        ("", None, True),
        ("app=web", {"app": "web", "tier": "fe"}, True),
        ("app=web", {"app": "api"}, False),
        ("app=web", {}, False),
        ("app!=web", {}, True),
        ("app!=web", {"app": "api"}, True),
        ("app!=web", {"app": "web"}, False),
        ("tier in (fe,be)", {"tier": "be"}, True),
        ("tier in (fe,be)", {}, False),
        ("tier notin (fe,be)", {}, True),
        ("tier notin (fe,be)", {"tier": "fe"}, False),
        ("tier", {"tier": ""}, True),
        ("tier", {"app": "x"}, False),
        ("!tier", {"app": "x"}, True),
        ("!tier", {"tier": ""}, False),
        ("app=", {"app": ""}, True),
        ("app=", {}, False),
        ("app in ()", {"app": ""}, True),
        ("replicas>2", {"replicas": "3"}, True),
        ("replicas>2", {"replicas": "2"}, False),
        ("replicas>2", {"replicas": "many"}, False),
        ("replicas>2", {}, False),
        ("replicas<2", {"replicas": "1"}, True),
        ("app=web,!canary,tier in (fe)", {"app": "web", "tier": "fe"}, True),
        ("app=web,!canary,tier in (fe)", {"app": "web", "tier": "fe", "canary": "1"}, False),
    ],
)
def test_matches(text: str, labels: dict[str, str] | None, expected: bool) -> None:
    assert LabelSelector.parse(text).matches(labels) is expected


def test_from_label_selector_none_selects_nothing_and_empty_everything() -> None:
    nothing = LabelSelector.from_label_selector(None)
    assert not nothing.matches({})
    assert not nothing.matches({"app": "web"})
    assert not nothing.empty
    everything = LabelSelector.from_label_selector({})
    assert everything.empty
    assert everything.matches({"anything": "goes"})
    assert LabelSelector.from_label_selector({"matchLabels": {}, "matchExpressions": []}).empty


def test_from_label_selector_combines_labels_and_expressions() -> None:
    selector = LabelSelector.from_label_selector(
        {
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["fe", "be"]},
                {"key": "track", "operator": "NotIn", "values": ["canary"]},
                {"key": "team", "operator": "Exists"},
                {"key": "legacy", "operator": "DoesNotExist", "values": []},
            ],
        }
    )
    assert str(selector) == "app=web,!legacy,team,tier in (be,fe),track notin (canary)"
    assert selector.matches({"app": "web", "tier": "fe", "team": "x"})
    assert not selector.matches({"app": "web", "tier": "fe", "team": "x", "track": "canary"})
    assert not selector.matches({"app": "web", "tier": "fe"})


@pytest.mark.parametrize(
    ("sel", "message"),
    [
        ({"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]},
         '"Gt" is not a valid label selector operator'),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": []}]},
         "values set can't be empty"),
        ({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
         "values set must be empty for exists and does not exist"),
        ({"matchExpressions": [{"operator": "Exists"}]}, "must be an object with a key"),
        ({"matchLabels": {"bad key": "v"}}, '"bad key"'),
        ({"matchLabels": {"app": "bad value"}}, '"bad value"'),
        ({"matchLabels": ["app"]}, "matchLabels must be an object"),
    ],
)
def test_from_label_selector_rejects_invalid(sel: dict[str, object], message: str) -> None:
    with pytest.raises(ApiError) as caught:
        LabelSelector.from_label_selector(sel)
    assert caught.value.code == 400
    assert message in caught.value.message


def test_from_match_labels_is_equality_on_every_key() -> None:
    selector = LabelSelector.from_match_labels({"app": "web", "tier": "fe"})
    assert selector.matches({"app": "web", "tier": "fe", "extra": "1"})
    assert not selector.matches({"app": "web"})
    assert not selector.matches({"app": "web", "tier": "be"})
    assert LabelSelector.from_match_labels({}).matches({"x": "y"})


# ---------------------------------------------------------------- label properties

_name = st.from_regex(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,20}[A-Za-z0-9])?", fullmatch=True)
_prefix = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?(\.[a-z0-9]{1,5}){0,2}", fullmatch=True)
_key = st.one_of(_name, st.builds(lambda p, n: f"{p}/{n}", _prefix, _name))
_value = st.one_of(st.just(""), _name)
_labels = st.dictionaries(_key, _value, max_size=6)


@st.composite
def _requirements(draw: st.DrawFn) -> Requirement:
    key = draw(_key)
    op = draw(st.sampled_from(list(Operator)))
    if op in (Operator.EXISTS, Operator.DOES_NOT_EXIST):
        values: list[str] = []
    elif op in (Operator.IN, Operator.NOT_IN):
        values = draw(st.lists(_value, min_size=1, max_size=4))
    elif op in (Operator.GREATER_THAN, Operator.LESS_THAN):
        values = [str(draw(st.integers(min_value=0, max_value=10**6)))]
    else:
        values = [draw(_value)]
    return Requirement.build(key, op, values)


@given(st.text(max_size=60))
def test_parse_never_raises_anything_but_api_error(text: str) -> None:
    try:
        LabelSelector.parse(text)
    except ApiError as exc:
        assert exc.code == 400


@given(st.text(alphabet="ab1 =!(),<>in/.-_$", max_size=40))
def test_parse_never_raises_anything_but_api_error_on_selector_like_text(text: str) -> None:
    try:
        selector = LabelSelector.parse(text)
    except ApiError:
        return
    # Whatever parses prints back to an equivalent selector.
    assert LabelSelector.parse(str(selector)) == selector


@given(st.lists(_requirements(), max_size=5))
def test_printed_selector_parses_back_to_itself(requirements: list[Requirement]) -> None:
    selector = LabelSelector.of(requirements)
    assert LabelSelector.parse(str(selector)) == selector


@given(_labels, _labels)
def test_from_match_labels_matches_the_map_and_every_superset(
    labels: dict[str, str], extra: dict[str, str]
) -> None:
    selector = LabelSelector.from_match_labels(labels)
    assert selector.matches(labels)
    assert selector.matches({**extra, **labels})
    # ... and, when it is not empty, the string form selects the same.
    assert LabelSelector.parse(str(selector)).matches({**extra, **labels})


@given(st.dictionaries(_key, _value, min_size=1, max_size=6), st.data())
def test_from_match_labels_rejects_a_changed_or_missing_label(
    labels: dict[str, str], data: st.DataObject
) -> None:
    selector = LabelSelector.from_match_labels(labels)
    key = data.draw(st.sampled_from(sorted(labels)))
    changed = {**labels, key: labels[key] + "x"}
    missing = {k: v for k, v in labels.items() if k != key}
    assert not selector.matches(changed)
    assert not selector.matches(missing)


# ---------------------------------------------------------------- field selectors

POD = {
    "metadata": {"name": "web-0", "namespace": "prod"},
    "spec": {"nodeName": "node-a", "hostNetwork": False, "priority": 10},
    "status": {"phase": "Running"},
}
POD_FIELDS = ("spec.nodeName", "spec.hostNetwork", "spec.priority", "status.phase")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", True),
        ("metadata.name=web-0", True),
        ("metadata.name==web-0", True),
        ("metadata.name!=web-0", False),
        ("metadata.namespace=prod,status.phase=Running", True),
        ("metadata.namespace=prod,status.phase!=Running", False),
        ("spec.nodeName=", False),
        ("spec.nodeName!=", True),
        ("spec.hostNetwork=false", True),
        ("spec.hostNetwork=False", False),
        ("spec.priority=10", True),
        # A field the object lacks reads as "".
        ("status.phase=Running", True),
    ],
)
def test_field_selector_matches(text: str, expected: bool) -> None:
    assert FieldSelector.parse(text, POD_FIELDS).matches(POD) is expected


def test_missing_field_is_empty_string() -> None:
    selector = FieldSelector.parse("spec.nodeName=", POD_FIELDS)
    assert selector.matches({"metadata": {"name": "pending"}})
    assert selector.matches({"metadata": {"name": "x"}, "spec": "not-a-map"})


def test_field_selector_parses_sorted_terms() -> None:
    selector = FieldSelector.parse("status.phase!=Failed,metadata.name==a", POD_FIELDS)
    assert selector.requirements == (
        FieldRequirement("metadata.name", FieldOperator.EQUALS, "a"),
        FieldRequirement("status.phase", FieldOperator.NOT_EQUALS, "Failed"),
    )
    assert str(selector) == "metadata.name=a,status.phase!=Failed"
    assert selector.requires_exact_match("metadata.name") == "a"
    assert selector.requires_exact_match("status.phase") is None
    assert FieldSelector.parse("", ()).empty


def test_field_selector_unescapes_values() -> None:
    selector = FieldSelector.parse(r"metadata.name=a\,b\=c\\d", ())
    assert selector.requirements[0].value == "a,b=c\\d"
    assert selector.matches({"metadata": {"name": "a,b=c\\d"}})
    assert str(selector) == r"metadata.name=a\,b\=c\\d"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("spec.replicas=1", "field label not supported: spec.replicas"),
        ("metadata.labels=x", "field label not supported: metadata.labels"),
        ("metadata.name", "invalid selector: 'metadata.name'; can't understand 'metadata.name'"),
        ("metadata.name=a=b", "invalid field selector: unescaped character in value: ="),
        (r"metadata.name=a\x", r"invalid field selector: invalid escape sequence: \x"),
        ("metadata.name=a\\", "invalid field selector: invalid escape sequence: \\"),
    ],
)
def test_field_selector_errors(text: str, message: str) -> None:
    with pytest.raises(ApiError) as caught:
        FieldSelector.parse(text, POD_FIELDS)
    assert caught.value.code == 400
    assert caught.value.message == message


@given(st.text(max_size=30))
def test_escaped_field_value_round_trips(value: str) -> None:
    selector = FieldSelector.parse(f"metadata.name={escape_field_value(value)}", ())
    assert selector.matches({"metadata": {"name": value}})
    assert not selector.matches({"metadata": {"name": value + "x"}})


@given(st.text(max_size=40))
def test_field_selector_parse_never_raises_anything_but_api_error(text: str) -> None:
    try:
        FieldSelector.parse(text, POD_FIELDS)
    except ApiError as exc:
        assert exc.code == 400
