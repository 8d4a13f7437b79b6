"""Label and field selectors: parsing the `labelSelector` / `fieldSelector` query
strings and metav1.LabelSelector objects, and matching objects against them.

The grammar, the validation and the error texts follow k8s.io/apimachinery's
`labels.Parse` and `fields.ParseSelector`, so that kubectl shows a user the
message it would get from kube-apiserver. Everything here is pure logic; every
failure is an `ApiError` (400 BadRequest), which the server sends unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from localcluster.errors import ApiError


class Operator(Enum):
    """A label requirement's operator; values are kube's `selection.Operator` strings."""

    EQUALS = "="
    DOUBLE_EQUALS = "=="
    NOT_EQUALS = "!="
    IN = "in"
    NOT_IN = "notin"
    EXISTS = "exists"
    DOES_NOT_EXIST = "!"
    GREATER_THAN = "gt"
    LESS_THAN = "lt"


# metav1.LabelSelectorRequirement operators; Gt/Lt exist only in the string syntax.
_EXPRESSION_OPERATORS = {
    "In": Operator.IN,
    "NotIn": Operator.NOT_IN,
    "Exists": Operator.EXISTS,
    "DoesNotExist": Operator.DOES_NOT_EXIST,
}

# The list kube prints when it finds no operator after a key.
_BINARY_OPERATORS = "in, notin, =, ==, !=, gt, lt"

_QUALIFIED_NAME_FMT = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_QUALIFIED_NAME = re.compile(_QUALIFIED_NAME_FMT)
_LABEL_VALUE_FMT = f"({_QUALIFIED_NAME_FMT})?"
_LABEL_VALUE = re.compile(_LABEL_VALUE_FMT)
_DNS1123_LABEL_FMT = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_FMT = f"{_DNS1123_LABEL_FMT}(\\.{_DNS1123_LABEL_FMT})*"
_DNS1123_SUBDOMAIN = re.compile(_DNS1123_SUBDOMAIN_FMT)
# strconv.ParseInt(s, 10, 64) syntax: an optional sign and decimal digits, nothing else.
_INT64 = re.compile(r"[+-]?[0-9]+")


def _regex_error(message: str, fmt: str, *examples: str) -> str:
    listed = " or ".join(f"'{e}'," for e in examples)
    return f"{message} (e.g. {listed} regex used for validation is '{fmt}')"


def _key_errors(key: str) -> list[str]:
    """validation.IsQualifiedName: an optional DNS-1123 subdomain prefix, '/', a name."""
    name_rule = _regex_error(
        "must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
        "with an alphanumeric character",
        _QUALIFIED_NAME_FMT, "MyName", "my.name", "123-abc",
    )
    parts = key.split("/")
    if len(parts) > 2:
        return [
            f"a qualified name {name_rule} with an optional DNS subdomain prefix and '/' "
            "(e.g. 'example.com/MyName')"
        ]
    errors: list[str] = []
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix:
            errors.append("prefix part must be non-empty")
        else:
            if len(prefix) > 253:
                errors.append("prefix part must be no more than 253 characters")
            if not _DNS1123_SUBDOMAIN.fullmatch(prefix):
                errors.append("prefix part " + _regex_error(
                    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                    "characters, '-' or '.', and must start and end with an alphanumeric "
                    "character",
                    _DNS1123_SUBDOMAIN_FMT, "example.com",
                ))
    name = parts[-1]
    if not name:
        errors.append("name part must be non-empty")
    elif len(name) > 63:
        errors.append("name part must be no more than 63 characters")
    if not _QUALIFIED_NAME.fullmatch(name):
        errors.append("name part " + name_rule)
    return errors


def _value_errors(value: str) -> list[str]:
    """validation.IsValidLabelValue: empty, or <= 63 characters of the qualified-name form."""
    errors: list[str] = []
    if len(value) > 63:
        errors.append("must be no more than 63 characters")
    if not _LABEL_VALUE.fullmatch(value):
        errors.append(_regex_error(
            "a valid label must be an empty string or consist of alphanumeric characters, "
            "'-', '_' or '.', and must start and end with an alphanumeric character",
            _LABEL_VALUE_FMT, "MyValue", "my_value", "12345",
        ))
    return errors


def _parse_int64(text: str) -> int | None:
    if not _INT64.fullmatch(text):
        return None
    number = int(text)
    return number if -(2**63) <= number < 2**63 else None


def _aggregate(errors: list[str]) -> str:
    # utilerrors.Aggregate prints one error bare and several in brackets.
    return errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"


@dataclass(frozen=True)
class Requirement:
    """One term of a label selector; `values` is sorted and free of duplicates."""

    key: str
    operator: Operator
    values: tuple[str, ...] = ()

    @classmethod
    def build(cls, key: str, operator: Operator, values: Iterable[str] = ()) -> Requirement:
        """Validate like labels.NewRequirement; a 400 lists every problem found."""
        listed = sorted(set(values))
        errors: list[str] = []
        key_problems = _key_errors(key)
        if key_problems:
            errors.append(f'Invalid value: "{key}": {"; ".join(key_problems)}')
        if operator in (Operator.IN, Operator.NOT_IN) and not listed:
            errors.append("for 'in', 'notin' operators, values set can't be empty")
        elif operator in (Operator.EQUALS, Operator.DOUBLE_EQUALS, Operator.NOT_EQUALS):
            if len(listed) != 1:
                errors.append("exact-match compatibility requires one single value")
        elif operator in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and listed:
            errors.append("values set must be empty for exists and does not exist")
        elif operator in (Operator.GREATER_THAN, Operator.LESS_THAN):
            if len(listed) != 1:
                errors.append("for 'Gt', 'Lt' operators, exactly one value is required")
            errors.extend(
                f'Invalid value: "{v}": for \'Gt\', \'Lt\' operators, the value must be an integer'
                for v in listed if _parse_int64(v) is None
            )
        for value in listed:
            problems = _value_errors(value)
            if problems:
                errors.append(f'Invalid value: "{value}": {"; ".join(problems)}')
        if errors:
            raise ApiError.bad_request(_aggregate(errors))
        return cls(key, operator, tuple(listed))

    def matches(self, labels: Mapping[str, str]) -> bool:
        op = self.operator
        present = self.key in labels
        if op in (Operator.IN, Operator.EQUALS, Operator.DOUBLE_EQUALS):
            return present and labels[self.key] in self.values
        if op in (Operator.NOT_IN, Operator.NOT_EQUALS):
            return not present or labels[self.key] not in self.values
        if op is Operator.EXISTS:
            return present
        if op is Operator.DOES_NOT_EXIST:
            return not present
        # Gt / Lt: a label that is missing or not an integer never matches.
        actual = _parse_int64(labels[self.key]) if present else None
        bound = _parse_int64(self.values[0]) if len(self.values) == 1 else None
        if actual is None or bound is None:
            return False
        return actual > bound if op is Operator.GREATER_THAN else actual < bound

    def __str__(self) -> str:
        op = self.operator
        if op is Operator.EXISTS:
            return self.key
        if op is Operator.DOES_NOT_EXIST:
            return "!" + self.key
        joined = ",".join(self.values)
        if op in (Operator.IN, Operator.NOT_IN):
            return f"{self.key} {op.value} ({joined})"
        symbol = {Operator.GREATER_THAN: ">", Operator.LESS_THAN: "<"}.get(op, op.value)
        return f"{self.key}{symbol}{joined}"


class _Tok(Enum):
    IDENTIFIER = "identifier"
    IN = "in"
    NOT_IN = "notin"
    EQUALS = "="
    DOUBLE_EQUALS = "=="
    NOT_EQUALS = "!="
    BANG = "!"
    OPEN = "("
    CLOSE = ")"
    COMMA = ","
    GREATER = ">"
    LESS = "<"
    END = "end of string"


_SYMBOLS = {t.value: t for t in (
    _Tok.EQUALS, _Tok.DOUBLE_EQUALS, _Tok.NOT_EQUALS, _Tok.BANG, _Tok.OPEN, _Tok.CLOSE,
    _Tok.COMMA, _Tok.GREATER, _Tok.LESS,
)}
_SPECIAL = frozenset("=!(),<>")
_WHITESPACE = frozenset(" \t\r\n")
_OPERATOR_TOKENS = {
    _Tok.IN: Operator.IN,
    _Tok.NOT_IN: Operator.NOT_IN,
    _Tok.EQUALS: Operator.EQUALS,
    _Tok.DOUBLE_EQUALS: Operator.DOUBLE_EQUALS,
    _Tok.NOT_EQUALS: Operator.NOT_EQUALS,
    _Tok.GREATER: Operator.GREATER_THAN,
    _Tok.LESS: Operator.LESS_THAN,
}


def _lex(text: str) -> list[tuple[_Tok, str]]:
    """Split like labels.Lexer: identifiers run until whitespace or a special symbol."""
    tokens: list[tuple[_Tok, str]] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _WHITESPACE:
            i += 1
        if i >= n:
            tokens.append((_Tok.END, ""))
            return tokens
        if text[i] in _SPECIAL:
            width = 2 if text[i:i + 2] in ("==", "!=") else 1
            symbol = text[i:i + width]
            tokens.append((_SYMBOLS[symbol], symbol))
            i += width
            continue
        start = i
        while i < n and text[i] not in _SPECIAL and text[i] not in _WHITESPACE:
            i += 1
        word = text[start:i]
        tok = {"in": _Tok.IN, "notin": _Tok.NOT_IN}.get(word, _Tok.IDENTIFIER)
        tokens.append((tok, word))


class _Parser:
    """labels.Parser: recursive descent over the token list, one requirement at a time."""

    def __init__(self, text: str) -> None:
        self._tokens = _lex(text)
        self._pos = 0

    def _peek(self, *, keywords: bool = False) -> tuple[_Tok, str]:
        return self._as(self._tokens[self._pos], keywords)

    def _take(self, *, keywords: bool = False) -> tuple[_Tok, str]:
        token = self._tokens[self._pos]
        self._pos = min(self._pos + 1, len(self._tokens) - 1)
        return self._as(token, keywords)

    @staticmethod
    def _as(token: tuple[_Tok, str], keywords: bool) -> tuple[_Tok, str]:
        # Outside the operator position `in` and `notin` are ordinary words, so
        # that `in in (in)` selects the label "in".
        if not keywords and token[0] in (_Tok.IN, _Tok.NOT_IN):
            return _Tok.IDENTIFIER, token[1]
        return token

    def parse(self) -> list[Requirement]:
        requirements: list[Requirement] = []
        while True:
            tok, lit = self._peek()
            if tok is _Tok.END:
                return requirements
            if tok not in (_Tok.IDENTIFIER, _Tok.BANG):
                raise ValueError(f"found '{lit}', expected: !, identifier, or 'end of string'")
            try:
                requirements.append(self._requirement())
            except (ValueError, ApiError) as exc:
                raise ValueError(f"unable to parse requirement: {exc}") from None
            tok, lit = self._take()
            if tok is _Tok.END:
                return requirements
            if tok is not _Tok.COMMA:
                raise ValueError(f"found '{lit}', expected: ',' or 'end of string'")
            tok, lit = self._peek()
            if tok not in (_Tok.IDENTIFIER, _Tok.BANG):
                raise ValueError(f"found '{lit}', expected: identifier after ','")

    def _requirement(self) -> Requirement:
        negated = False
        tok, lit = self._take()
        if tok is _Tok.BANG:
            negated = True
            tok, lit = self._take()
        if tok is not _Tok.IDENTIFIER:
            raise ValueError(f"found '{lit}', expected: identifier")
        key = lit
        errors = _key_errors(key)
        if errors:
            raise ValueError(f'Invalid value: "{key}": {"; ".join(errors)}')
        if negated:
            return Requirement.build(key, Operator.DOES_NOT_EXIST)
        if self._peek()[0] in (_Tok.END, _Tok.COMMA):
            return Requirement.build(key, Operator.EXISTS)
        tok, lit = self._take(keywords=True)
        operator = _OPERATOR_TOKENS.get(tok)
        if operator is None:
            raise ValueError(f"found '{lit}', expected: {_BINARY_OPERATORS}")
        if operator in (Operator.IN, Operator.NOT_IN):
            return Requirement.build(key, operator, self._value_set())
        return Requirement.build(key, operator, [self._exact_value()])

    def _exact_value(self) -> str:
        tok, lit = self._peek()
        if tok in (_Tok.END, _Tok.COMMA):
            return ""  # `a=` selects the empty value
        tok, lit = self._take()
        if tok is not _Tok.IDENTIFIER:
            raise ValueError(f"found '{lit}', expected: identifier")
        return lit

    def _value_set(self) -> set[str]:
        tok, lit = self._take()
        if tok is not _Tok.OPEN:
            raise ValueError(f"found '{lit}' expected: '('")
        tok, lit = self._peek()
        if tok is _Tok.CLOSE:
            self._take()
            return {""}  # `a in ()` is kube's way of writing the empty value
        if tok not in (_Tok.IDENTIFIER, _Tok.COMMA):
            raise ValueError(f"found '{lit}', expected: ',', ')' or identifier")
        values = self._identifiers()
        tok, lit = self._take()
        if tok is not _Tok.CLOSE:
            raise ValueError(f"found '{lit}', expected: ')'")
        return values

    def _identifiers(self) -> set[str]:
        # A missing item between commas ("(a,,b)", "(,a)", "(a,)") is the empty value.
        values: set[str] = set()
        while True:
            tok, lit = self._take()
            if tok is _Tok.IDENTIFIER:
                values.add(lit)
                after, after_lit = self._peek()
                if after is _Tok.CLOSE:
                    return values
                if after is not _Tok.COMMA:
                    raise ValueError(f"found '{after_lit}', expected: ',' or ')'")
            elif tok is _Tok.COMMA:
                if not values:
                    values.add("")
                after, _ = self._peek()
                if after is _Tok.CLOSE:
                    values.add("")
                    return values
                if after is _Tok.COMMA:
                    self._take()
                    values.add("")
            else:
                raise ValueError(f"found '{lit}', expected: ',', or identifier")


@dataclass(frozen=True)
class LabelSelector:
    """A conjunction of label requirements, kept sorted by key like kube's selector.

    `selects_nothing` is the selector of a nil metav1.LabelSelector, which
    matches no object at all; no requirements otherwise means "everything".
    """

    requirements: tuple[Requirement, ...] = ()
    selects_nothing: bool = False

    @classmethod
    def of(cls, requirements: Iterable[Requirement]) -> LabelSelector:
        return cls(tuple(sorted(requirements, key=lambda r: r.key)))

    @classmethod
    def everything(cls) -> LabelSelector:
        return cls()

    @classmethod
    def nothing(cls) -> LabelSelector:
        return cls(selects_nothing=True)

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        """Parse a `labelSelector` query string; the empty string selects everything."""
        try:
            return cls.of(_Parser(text).parse())
        except ValueError as exc:
            raise ApiError.bad_request(str(exc)) from None

    @classmethod
    def from_label_selector(cls, sel: Mapping[str, Any] | None) -> LabelSelector:
        """metav1.LabelSelectorAsSelector: None selects nothing, `{}` selects everything."""
        if sel is None:
            return cls.nothing()
        if not isinstance(sel, Mapping):
            raise ApiError.bad_request(f"a label selector must be an object, not {sel!r}")
        match_labels = sel.get("matchLabels") or {}
        expressions = sel.get("matchExpressions") or []
        if not isinstance(match_labels, Mapping) or not isinstance(expressions, list):
            raise ApiError.bad_request(
                "a label selector's matchLabels must be an object and matchExpressions a list"
            )
        requirements = [
            Requirement.build(str(key), Operator.EQUALS, [str(value)])
            for key, value in match_labels.items()
        ]
        requirements.extend(_expression(expr) for expr in expressions)
        return cls.of(requirements)

    @classmethod
    def from_match_labels(cls, d: Mapping[str, str]) -> LabelSelector:
        """labels.SelectorFromValidatedSet: equality on every key, no validation.

        The map (e.g. a Service's spec.selector) was validated when its object was
        written; an empty map selects everything, as in kube.
        """
        return cls.of(Requirement(k, Operator.EQUALS, (v,)) for k, v in d.items())

    @property
    def empty(self) -> bool:
        """True if the selector matches every object (kube's `Selector.Empty()`)."""
        return not self.requirements and not self.selects_nothing

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        if self.selects_nothing:
            return False
        present = labels if labels is not None else {}
        return all(r.matches(present) for r in self.requirements)

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)


def _expression(expr: Any) -> Requirement:
    if not isinstance(expr, Mapping) or not isinstance(expr.get("key"), str):
        raise ApiError.bad_request(
            f"a label selector requirement must be an object with a key: {expr!r}"
        )
    name = expr.get("operator")
    operator = _EXPRESSION_OPERATORS.get(name) if isinstance(name, str) else None
    if operator is None:
        raise ApiError.bad_request(f'"{name}" is not a valid label selector operator')
    values = expr.get("values") or []
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ApiError.bad_request(
            f"values of label selector requirement {expr['key']!r} must be strings"
        )
    return Requirement.build(expr["key"], operator, values)


class FieldOperator(Enum):
    """A field requirement's operator; `==` parses to EQUALS, as in kube's hasTerm."""

    EQUALS = "="
    NOT_EQUALS = "!="


@dataclass(frozen=True)
class FieldRequirement:
    field: str
    operator: FieldOperator
    value: str

    def __str__(self) -> str:
        return f"{self.field}{self.operator.value}{escape_field_value(self.value)}"


ALWAYS_SELECTABLE = ("metadata.name", "metadata.namespace")


@dataclass(frozen=True)
class FieldSelector:
    """A conjunction of field equalities and inequalities, sorted like kube's."""

    requirements: tuple[FieldRequirement, ...] = ()

    @classmethod
    def parse(cls, text: str, allowed: Iterable[str]) -> FieldSelector:
        """Parse a `fieldSelector` query string for a kind whose extra selectable
        fields are `allowed` (metadata.name and metadata.namespace always are)."""
        known = set(ALWAYS_SELECTABLE) | set(allowed)
        requirements: list[FieldRequirement] = []
        for term in sorted(_split_terms(text)):
            if not term:
                continue
            split = _split_term(term)
            if split is None:
                raise ApiError.bad_request(
                    f"invalid selector: '{text}'; can't understand '{term}'"
                )
            field, operator, raw = split
            value = _unescape(raw)
            if field not in known:
                raise ApiError.bad_request(f"field label not supported: {field}")
            requirements.append(FieldRequirement(field, operator, value))
        return cls(tuple(requirements))

    @property
    def empty(self) -> bool:
        return not self.requirements

    def requires_exact_match(self, field: str) -> str | None:
        """The value `field` must equal, if the selector says (kube's RequiresExactMatch);
        lets a list by metadata.name or metadata.namespace skip a full scan."""
        for r in self.requirements:
            if r.field == field and r.operator is FieldOperator.EQUALS:
                return r.value
        return None

    def matches(self, obj: Mapping[str, Any]) -> bool:
        for r in self.requirements:
            equal = _field_value(obj, r.field) == r.value
            if equal != (r.operator is FieldOperator.EQUALS):
                return False
        return True

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)


def escape_field_value(value: str) -> str:
    """fields.EscapeValue: the inverse of the unescaping `FieldSelector.parse` does."""
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")


def _split_terms(text: str) -> list[str]:
    """Split on commas that are not escaped; escapes stay in the terms for `_unescape`."""
    if not text:
        return []
    terms: list[str] = []
    start = 0
    escaped = False
    for i, c in enumerate(text):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == ",":
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    return terms


def _split_term(term: str) -> tuple[str, FieldOperator, str] | None:
    # The first operator wins, and "==" is tried before "=" so that the value
    # of `a==b` does not start with "=".
    for i in range(len(term)):
        for symbol, operator in (("!=", FieldOperator.NOT_EQUALS),
                                 ("==", FieldOperator.EQUALS),
                                 ("=", FieldOperator.EQUALS)):
            if term.startswith(symbol, i):
                return term[:i], operator, term[i + len(symbol):]
    return None


def _unescape(raw: str) -> str:
    out: list[str] = []
    escaped = False
    for c in raw:
        if escaped:
            if c not in "\\,=":
                raise ApiError.bad_request(
                    f"invalid field selector: invalid escape sequence: \\{c}"
                )
            out.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif c in ",=":
            raise ApiError.bad_request(
                f"invalid field selector: unescaped character in value: {c}"
            )
        else:
            out.append(c)
    if escaped:
        raise ApiError.bad_request("invalid field selector: invalid escape sequence: \\")
    return "".join(out)


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    """The value at a dotted path as kube's field sets hold it: a string, "" if absent."""
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return ""
        node = node[part]
    if isinstance(node, bool):
        return "true" if node else "false"
    if isinstance(node, str | int | float):
        return str(node)
    return ""
