"""Turn a JSON request body into a registered function's keyword arguments.

The function's signature is inspected once, at registration: each parameter becomes a field of
a pydantic model, so types, defaults, ``Optional``, ``Literal``, enums, nested models and
``Annotated[..., Field(...)]`` constraints are checked and coerced by pydantic, not by hand.
A signature that cannot be served raises :class:`RegistrationError` at start-up.

A 422's ``detail`` is bounded whatever the body held: at most ``MAX_PROBLEMS`` entries, and each
``loc`` keeps indexes and declared parameter names but shortens any other key (an unknown
parameter, a ``dict`` key) to ``MAX_KEY_SHOWN`` characters, since those keys are the client's input.
Its messages name the rule, never the value (:func:`problem_message`).
"""

from __future__ import annotations

import inspect
import itertools
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .errors import RegistrationError, RequestError

__all__ = [
    "MAX_KEY_SHOWN",
    "MAX_PROBLEMS",
    "NAME_PATTERN",
    "Binder",
    "check_query_parameters",
    "inspect_function",
    "problem_message",
    "validate_name",
]

#: What a function's name (its URL segment) may be.
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")
#: Names the extension's own URLs take below the prefix (``{prefix}/channels``).
RESERVED_NAMES = frozenset({"channels"})
#: The most problems a 422 lists; one more entry says how many were left out.
MAX_PROBLEMS = 50
#: The longest client-sent key shown in a problem's ``loc``; longer ones are cut to half of it.
MAX_KEY_SHOWN = 64
#: Pydantic's messages that quote part of the input (a discriminator's tag, a character of a
#: UUID or of base64, an offset), as the rule alone. The rest quote only the schema's values.
_RULE_ONLY = {
    "union_tag_invalid": "Input tag does not match any of the expected tags: {expected_tags}",
    "uuid_parsing": "Input should be a valid UUID",
    "bytes_invalid_encoding": "Data should be valid {encoding}",
    "timezone_offset": "Timezone offset of {tz_expected} required",
}
_UNSERVABLE_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional-only parameters cannot come from a JSON object",
    inspect.Parameter.VAR_POSITIONAL: "*args cannot come from a JSON object",
    inspect.Parameter.VAR_KEYWORD: "**kwargs would accept any key; name each parameter",
}


def validate_name(name: str) -> str:
    """Check that ``name`` can be a function's URL segment; return it.

    Raises :class:`RegistrationError` for names starting with ``_`` (private) or holding
    anything but letters, digits, ``_`` and ``-``.
    """
    if not isinstance(name, str) or not name:
        raise RegistrationError("a function name must be a non-empty str")
    if name.startswith("_"):
        raise RegistrationError(f"{name!r}: names starting with '_' are private and not served")
    if not NAME_PATTERN.match(name):
        raise RegistrationError(
            f"{name!r}: a name must start with a letter and hold only letters, digits, '_' and '-'"
        )
    if name in RESERVED_NAMES:
        raise RegistrationError(f"{name!r} is taken by the extension's own URL ({{prefix}}/{name})")
    return name


@dataclass(frozen=True)
class Binder:
    """A registered function's parameters as a pydantic model."""

    name: str
    model: type[BaseModel]
    # model field name -> parameter name; fields are named f0, f1, ... and aliased to the
    # parameter so that a parameter called e.g. ``json`` or ``model_config`` cannot clash
    # with BaseModel's own attributes.
    params: tuple[tuple[str, str], ...]
    #: Parameters that take a list (or tuple): in a query string, even one value is a list.
    sequences: frozenset[str] = frozenset()

    def query_payload(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """The arguments in a query string (``GET /run?upper_range=3``), for :meth:`bind`.

        ``args`` is Werkzeug's ``MultiDict``: a repeated key, or any key of a list parameter,
        gives a list of strings; any other key its string, which pydantic's lax mode coerces
        (``"3"`` to ``3``, ``"true"`` to ``True``).
        """
        getlist = args.getlist  # type: ignore[attr-defined]
        payload: dict[str, Any] = {}
        for key in args:
            values = getlist(key)
            payload[key] = values if len(values) > 1 or key in self.sequences else values[0]
        return payload

    def bind(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Validate ``payload`` and return the keyword arguments for the function.

        Raises :class:`RequestError` (422) listing the problems (the first ``MAX_PROBLEMS``),
        without echoing input values or long keys.
        """
        if len(payload) > len(self.params) + MAX_PROBLEMS:
            raise RequestError(422, "invalid parameters", self._too_many_keys(payload))
        try:
            values = self.model.model_validate(payload)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False)
            raise RequestError(422, "invalid parameters", self._detail(errors, len(errors))) from None
        return {param: getattr(values, field) for field, param in self.params}

    def _too_many_keys(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        # More than MAX_PROBLEMS keys are unknown, so the request fails whatever they hold; but
        # pydantic would build an error for each of them (90,000 took 0.29 s, holding the
        # worker's hub) to show 50. The same detail, built from the known keys alone: pydantic
        # lists the parameters' problems first, then each unknown key in the body's order.
        names = self._names()
        known = {key: value for key, value in payload.items() if key in names}
        try:
            self.model.model_validate(known)
            errors: list[Any] = []
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False)
        total = len(errors) + len(payload) - len(known)
        unknown = (key for key in payload if key not in names)
        for key in itertools.islice(unknown, max(0, MAX_PROBLEMS - len(errors))):
            errors.append({"loc": (key,), "msg": "Extra inputs are not permitted", "type": "extra_forbidden"})
        return self._detail(errors, total)

    def _names(self) -> set[str]:
        return {param for _, param in self.params}

    def _detail(self, errors: Sequence[Any], total: int) -> list[dict[str, Any]]:
        """The first ``MAX_PROBLEMS`` of ``total`` problems, and how many were left out."""
        names = self._names()
        detail: list[dict[str, Any]] = [
            {
                "loc": [_shown(part, names) for part in err["loc"]],
                "msg": problem_message(err),
                "type": err["type"],
            }
            for err in errors[:MAX_PROBLEMS]
        ]
        if total > MAX_PROBLEMS:
            omitted = total - MAX_PROBLEMS
            detail.append(
                {"loc": [], "msg": f"{omitted} more problems were omitted", "type": "too_many_errors"}
            )
        return detail

    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema of the request body (parameter names as properties)."""
        return self.model.model_json_schema(by_alias=True)


def problem_message(error: Mapping[str, Any]) -> str:
    """The message of one of pydantic's errors (``ValidationError.errors()``) that does not quote
    the client's input: the rule it broke, with the schema's own values (bounds, expected tags).

    Messages of the app's own validators (``value_error``, ``assertion_error``) are its author's
    and kept as they are.
    """
    template = _RULE_ONLY.get(error["type"])
    if template is None:
        return str(error["msg"])
    # Pydantic formatted its own message from the same ``ctx``: the keys are there.
    return template.format(**error.get("ctx", {}))


def _shown(part: str | int, names: set[str]) -> str | int:
    # An unknown key or a dict key is whatever the client sent (500 KB of it, once): only
    # indexes and the function's own parameter names are shown as they are.
    if isinstance(part, int) or part in names or len(part) <= MAX_KEY_SHOWN:
        return part
    return part[: MAX_KEY_SHOWN // 2] + "\u2026"


def inspect_function(func: Callable[..., Any], name: str, *, model_name: str | None = None) -> Binder:
    """Build the :class:`Binder` for ``func``; raise :class:`RegistrationError` if unservable.

    ``model_name`` names the parameters' model (and its JSON Schema); default ``{name}_parameters``.
    ``async def`` functions and async generators are refused: a WSGI worker has no event loop
    to run them in, so they would fail on every request.
    """
    if _is_async(func):
        raise RegistrationError(
            f"{name}: async functions are not supported on WSGI; write a plain function or "
            "generator (hand blocking work to flask_sse_run.iterate_in_thread or run_in_thread)"
        )
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise RegistrationError(f"{name}: cannot read the signature: {exc}") from exc
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception as exc:  # NameError for unresolvable forward references, and kin
        raise RegistrationError(f"{name}: cannot resolve the type hints: {exc}") from exc

    fields: dict[str, Any] = {}
    params = []
    for index, param in enumerate(signature.parameters.values()):
        if param.kind in _UNSERVABLE_KINDS:
            raise RegistrationError(f"{name}: parameter {param.name}: {_UNSERVABLE_KINDS[param.kind]}")
        annotation = hints.get(param.name, Any)
        field_name = f"f{index}"
        if param.default is inspect.Parameter.empty:
            info = Field(alias=param.name)
        else:
            info = Field(default=param.default, alias=param.name)
        fields[field_name] = (annotation, info)
        params.append((field_name, param.name))

    try:
        model = create_model(
            model_name or f"{name}_parameters",
            # allow_inf_nan off: lax mode would turn the string "NaN" into a float that JSON
            # cannot carry back out (the body parser already refuses NaN as a number).
            __config__=ConfigDict(extra="forbid", populate_by_name=False, allow_inf_nan=False),
            __doc__=inspect.getdoc(func),
            **fields,
        )
        # A schema that pydantic cannot describe would fail for every request (and in the
        # OpenAPI document): find out now.
        model.model_json_schema(by_alias=True)
    except Exception as exc:
        raise RegistrationError(f"{name}: cannot validate these parameters: {exc}") from exc
    properties = model.model_json_schema(by_alias=True).get("properties", {})
    sequences = frozenset(param for param, prop in properties.items() if _takes_a_list(prop))
    return Binder(name=name, model=model, params=tuple(params), sequences=sequences)


def check_query_parameters(binder: Binder) -> None:
    """Raise :class:`RegistrationError` unless every parameter can come from a query string.

    A query string carries strings, and lists of them: a parameter that takes a model, a
    ``dict`` or a list of lists could never be bound from one, so a function with such a
    parameter cannot be served with ``GET``.
    """
    schema = binder.model.model_json_schema(by_alias=True)
    defs = schema.get("$defs", {})
    for name, prop in schema.get("properties", {}).items():
        if not (_is_scalar(prop, defs) or _is_scalar_list(prop, defs)):
            raise RegistrationError(
                f"{binder.name}: parameter {name}: a query string cannot carry it (only text, numbers, "
                "booleans, enums and lists of them); serve this function with POST only"
            )


def _resolve(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = schema.get("$ref")
    return defs.get(ref.rsplit("/", 1)[1], {}) if isinstance(ref, str) else schema


def _is_scalar(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> bool:
    schema = _resolve(schema, defs)
    if "anyOf" in schema:
        return all(_is_scalar(part, defs) for part in schema["anyOf"])
    if "enum" in schema or "const" in schema:
        return True
    return schema.get("type") in ("string", "integer", "number", "boolean", "null")


def _is_scalar_list(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> bool:
    schema = _resolve(schema, defs)
    if "anyOf" in schema:
        return all(_is_scalar(part, defs) or _is_scalar_list(part, defs) for part in schema["anyOf"])
    if schema.get("type") != "array":
        return False
    items = [
        *schema.get("prefixItems", ()),
        *([schema["items"]] if isinstance(schema.get("items"), dict) else []),
    ]
    return all(_is_scalar(item, defs) for item in items)


def _takes_a_list(schema: Mapping[str, Any]) -> bool:
    # list[int], tuple[str, ...], Optional[list[int]] (an anyOf holding an array).
    return schema.get("type") == "array" or any(_takes_a_list(s) for s in schema.get("anyOf", ()))


def _is_async(func: Callable[..., Any]) -> bool:
    # A callable object is async when its __call__ is; inspect sees through functools.partial.
    return any(
        inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f) for f in (func, type(func).__call__)
    )
