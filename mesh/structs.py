"""Checked structs: the models the proxy and the gateway load (configuration,
discovery, policy on the wire) are msgspec Structs, and this module turns a
msgspec.ValidationError into what a person acts on: the field path and the reason.

A Struct checks what its types cannot say in ``__post_init__``, which runs both
when code builds one and when msgspec decodes one; it raises `FieldError` naming
the field, so the path points at the field rather than at the struct holding it
(`Checked` does it for fields given a check function). msgspec stops at the
first error; `problems` finds every one, for a file a person fixes in one go.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import msgspec

if TYPE_CHECKING:
    import msgspec.inspect

T = TypeVar("T")

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_FIELD = re.compile(r"^Object (?P<what>missing required|contains unknown) field `(?P<name>[^`]*)`$")
_EXPECTED = re.compile(r"^Expected `(?P<kinds>[^`]*)`(?P<rest>.*?)(?:, got `(?P<got>[^`]*)`)?$")
_NAMES = {"int": "an integer", "str": "a string", "bool": "true or false", "float": "a number",
          "array": "a list", "object": "a mapping", "null": "null"}
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


class FieldError(ValueError):
    """A field's value that its type allows but the model does not; ``field`` is the
    name as written in the input ("" for the struct as a whole)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


def convert(raw: Any, model: type[T]) -> T:
    """`raw` (a dict read from YAML or JSON) as `model`; msgspec.ValidationError if it
    does not fit (see `explain`). A type with a ``parse(value)`` classmethod (as
    mesh.config's Duration) is built by it."""
    return msgspec.convert(raw, model, dec_hook=_decode)


class Checked(msgspec.Struct, frozen=True, kw_only=True):
    """A Struct whose fields named in ``__field_checks__`` (attribute name -> a check
    that raises ValueError) are checked whenever one is built or decoded; a list's
    items are checked one by one. `problems` applies the same checks field by field."""

    __field_checks__: ClassVar[Mapping[str, Callable[[Any], object]]] = {}

    def __post_init__(self) -> None:
        for field in msgspec.structs.fields(self):
            check = self.__field_checks__.get(field.name)
            if check is not None:
                _check_value(field.encode_name, check, getattr(self, field.name))


def _check_value(name: str, check: Callable[[Any], object], value: Any) -> None:
    if value is None:
        return
    items = enumerate(value) if isinstance(value, list | tuple) else [(None, value)]
    for i, item in items:
        try:
            check(item)
        except ValueError as e:
            raise FieldError(name if i is None else f"{name}[{i}]", str(e)) from None


def _decode(kind: type, value: Any) -> Any:
    """Types msgspec does not convert itself: paths (from strings), and types with
    a ``parse`` classmethod."""
    parse = getattr(kind, "parse", None)
    if parse is not None:
        return parse(value)
    if kind is Path and isinstance(value, str):
        return Path(value)
    raise NotImplementedError(f"no conversion to {kind.__name__}")


def explain(error: msgspec.ValidationError, raw: Any = None,
            model: Any = None) -> tuple[str, str]:
    """(field path, reason), e.g. ``("services[1].endpoints[0].targetPort",
    "expected an integer, got 'http'")``; `raw`, the input when there is one, shows
    the value found, and `model`, the type it was converted to, the values a field
    may take. The path is "" for the input as a whole."""
    message = str(error)
    match = _AT.search(message)
    path = match.group("path") if match else ""
    if match:
        message = message[:match.start()]
    cause = error.__cause__
    if isinstance(cause, FieldError):
        return _join(path, cause.field), cause.reason
    if isinstance(cause, ValueError) and not isinstance(cause, msgspec.ValidationError):
        return _join(path, ""), str(cause)
    field = _FIELD.match(message)
    if field:
        where = _join(path, field.group("name"))
        if field.group("what") == "missing required":
            return where, "required field is missing"
        return where, "unknown field (check its spelling and indentation)"
    found, value = _value_at(raw, path) if raw is not None else (False, None)
    if message.startswith("Invalid enum value") and model is not None:
        from msgspec import inspect  # only to explain an error: kept out of the steady state

        choices = _choices(inspect.type_info(model), path)
        if choices:
            expected = " or ".join(choices) if len(choices) < 3 else f"one of {', '.join(choices)}"
            return _join(path, ""), (f"expected {expected}"
                                     + (f", got {_shown(value)}" if found else ""))
    return _join(path, ""), _reason(message, found, value)


def problems(raw: Any, model: Any) -> list[tuple[str, str]]:
    """Every problem of `raw` as `model`, one (field path, reason) each, in input order:
    msgspec stops at the first, so the fields that fail are converted again one by one
    (only on the error path). Empty when `raw` converts."""
    try:
        convert(raw, model)
    except msgspec.ValidationError as e:
        return _problems(raw, model) or [explain(e, raw, model)]
    return []


def _problems(raw: Any, model: Any) -> list[tuple[str, str]]:
    """The problems found inside `raw`, field by field or item by item; empty when the
    problem is `raw` as a whole (its type, or a check across its fields)."""
    out: list[tuple[str, str]] = []
    if isinstance(model, type) and issubclass(model, msgspec.Struct) and isinstance(raw, dict):
        fields = msgspec.structs.fields(model)
        checks: Mapping[str, Callable[[Any], object]] = getattr(model, "__field_checks__", {})
        for field in fields:
            if field.encode_name in raw:
                found = [(_join(field.encode_name, where), reason) for where, reason in
                         problems(raw[field.encode_name], field.type)]
                check = checks.get(field.name)
                if not found and check is not None:
                    try:
                        _check_value(field.encode_name, check,
                                     convert(raw[field.encode_name], field.type))
                    except FieldError as e:
                        found = [(e.field, e.reason)]
                out += found
            elif field.required:
                out.append((field.encode_name, "required field is missing"))
        if model.__struct_config__.forbid_unknown_fields:
            known = {field.encode_name for field in fields}
            out += [(str(key), "unknown field (check its spelling and indentation)")
                    for key in raw if key not in known]
    elif getattr(model, "__origin__", None) is list and isinstance(raw, list):
        (item,) = model.__args__
        for i, value in enumerate(raw):
            out += [(_join(f"[{i}]", where), reason) for where, reason in problems(value, item)]
    return out


def _reason(message: str, found: bool, value: Any) -> str:
    """msgspec's message in the words of the input: ``expected an integer >= 1, got 0``."""
    expected = _EXPECTED.match(message)
    if expected is None:
        reason = message.replace("`", "")
        return reason[:1].lower() + reason[1:]
    kinds = " or ".join(_NAMES.get(kind, kind) for kind in expected.group("kinds").split(" | "))
    reason = f"expected {kinds}{expected.group('rest')}"
    if found and _scalar(value):
        return f"{reason}, got {_shown(value)}"
    got = expected.group("got")
    return f"{reason}, got {_NAMES.get(got, got)}" if got else reason


def _scalar(value: Any) -> bool:
    return not isinstance(value, dict | list)


def _shown(value: Any) -> str:
    # As the input was written (YAML or JSON): true, false, null.
    shown = json.dumps(value) if value is None or isinstance(value, bool) else repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _join(path: str, field: str) -> str:
    path = path.removeprefix(".")
    if not field or not path:
        return path or field
    return f"{path}{field}" if field.startswith("[") else f"{path}.{field}"


def _choices(info: msgspec.inspect.Type, path: str) -> list[str]:
    """The values the field at `path` may take, when it is a Literal or an enum."""
    for name, index in _STEP.findall(path):
        info = _unwrap(info)
        if index:
            if not isinstance(info, msgspec.inspect.ListType | msgspec.inspect.VarTupleType):
                return []
            info = info.item_type
        elif isinstance(info, msgspec.inspect.StructType):
            fields = [f for f in info.fields if f.encode_name == name]
            if not fields:
                return []
            info = fields[0].type
        else:
            return []
    info = _unwrap(info)
    if isinstance(info, msgspec.inspect.LiteralType):
        return [repr(v) for v in info.values]
    if isinstance(info, msgspec.inspect.EnumType):
        return [repr(member.value) for member in info.cls]
    return []


def _unwrap(info: msgspec.inspect.Type) -> msgspec.inspect.Type:
    """The member of an optional type that the next step of a path goes into."""
    if isinstance(info, msgspec.inspect.UnionType):
        for member in info.types:
            if not isinstance(member, msgspec.inspect.NoneType):
                return member
    return info


def _value_at(raw: Any, path: str) -> tuple[bool, Any]:
    value = raw
    for name, index in _STEP.findall(path):
        if index:
            if not isinstance(value, list) or int(index) >= len(value):
                return False, None
            value = value[int(index)]
        elif isinstance(value, dict) and name in value:
            value = value[name]
        else:
            return False, None
    return True, value

