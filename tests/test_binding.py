from __future__ import annotations

import enum
import functools
import re
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal, Optional

import pytest
from pydantic import BaseModel, Field, ValidationError

from flask_sse_run import SSERun
from flask_sse_run.binding import MAX_PROBLEMS, check_query_parameters, inspect_function, validate_name
from flask_sse_run.errors import RegistrationError, RequestError


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Options(BaseModel):
    depth: int
    label: str = "x"


def everything(
    text: str,
    number: int,
    ratio: float,
    flag: bool,
    items: list[int],
    weights: dict[str, float],
    maybe: Optional[str] = None,  # noqa: UP045 - the Optional spelling is what users write
    mode: Literal["fast", "slow"] = "fast",
    color: Color = Color.RED,
    options: Options | None = None,
    bounded: Annotated[int, Field(ge=1, le=1000)] = 10,
    json: str = "a parameter named like a BaseModel attribute",
) -> None:
    pass


binder = inspect_function(everything, "everything")
VALID = {"text": "t", "number": 1, "ratio": 0.5, "flag": True, "items": [1], "weights": {"a": 1.0}}


def test_binds_and_coerces_every_supported_type() -> None:
    kwargs = binder.bind(
        {
            **VALID,
            "number": "42",
            "ratio": 3,
            "maybe": "m",
            "mode": "slow",
            "color": "blue",
            "options": {"depth": 2},
            "bounded": 1000,
            "json": "j",
        }
    )
    assert kwargs["number"] == 42
    assert kwargs["ratio"] == 3.0 and isinstance(kwargs["ratio"], float)
    assert kwargs["color"] is Color.BLUE
    assert kwargs["options"] == Options(depth=2)
    assert kwargs["json"] == "j"
    assert kwargs["mode"] == "slow"


def test_defaults_fill_missing_optional_parameters() -> None:
    kwargs = binder.bind(dict(VALID))
    assert kwargs["maybe"] is None and kwargs["mode"] == "fast" and kwargs["color"] is Color.RED
    assert kwargs["bounded"] == 10


def test_every_problem_is_listed_without_echoing_values() -> None:
    secret = "s3cr3t-value-" * 20
    with pytest.raises(RequestError) as info:
        binder.bind(
            {"number": secret, "ratio": "x", "flag": "maybe", "items": [secret], "bounded": 0, "nope": 1}
        )
    error = info.value
    assert error.status == 422
    locs = {tuple(d["loc"]) for d in error.detail or []}
    assert locs == {
        ("text",),
        ("number",),
        ("ratio",),
        ("flag",),
        ("items", 0),
        ("weights",),
        ("bounded",),
        ("nope",),
    }
    assert secret not in repr(error.body())
    assert all(set(d) == {"loc", "msg", "type"} for d in error.detail or [])


def _long(a_parameter_name_that_is_longer_than_sixty_four_characters_and_still_shown: int) -> None: ...


def test_client_sent_keys_in_loc_are_shortened_but_parameter_names_are_kept() -> None:
    name = "a_parameter_name_that_is_longer_than_sixty_four_characters_and_still_shown"
    with pytest.raises(RequestError) as info:
        inspect_function(_long, "long").bind({name: "x", "u" * 500_000: 1})
    assert [d["loc"] for d in info.value.detail or []] == [[name], ["u" * 32 + "\u2026"]]


def test_dict_keys_in_loc_are_shortened() -> None:
    with pytest.raises(RequestError) as info:
        binder.bind({**VALID, "weights": {"k" * 100_000: "heavy"}, "items": ["x"]})
    locs = [d["loc"] for d in info.value.detail or []]
    assert locs == [["items", 0], ["weights", "k" * 32 + "\u2026"]]


def test_a_key_of_exactly_64_characters_is_shown_as_sent() -> None:
    with pytest.raises(RequestError) as info:
        binder.bind({**VALID, "w" * 64: 1})
    assert [d["loc"] for d in info.value.detail or []] == [["w" * 64]]


def test_at_most_50_problems_are_listed_then_how_many_more() -> None:
    with pytest.raises(RequestError) as info:
        binder.bind({**VALID, "items": ["x"] * 200})
    detail = info.value.detail or []
    assert len(detail) == 51
    assert [d["loc"] for d in detail[:50]] == [["items", i] for i in range(50)]
    assert detail[50] == {"loc": [], "msg": "150 more problems were omitted", "type": "too_many_errors"}


def test_exactly_50_problems_are_all_listed() -> None:
    with pytest.raises(RequestError) as info:
        binder.bind({**VALID, "items": ["x"] * 50})
    assert len(info.value.detail or []) == 50


def _pydantic_detail(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """What the 422 would list if pydantic saw every key (the slow way)."""
    with pytest.raises(ValidationError) as info:
        binder.model.model_validate(payload)
    errors = info.value.errors(include_url=False, include_input=False, include_context=False)
    return binder._detail(errors, len(errors))


@pytest.mark.parametrize(
    "payload",
    [
        {**VALID, **{f"k{i}": i for i in range(90_000)}},  # far more unknown keys than shown
        {**{f"k{i}": i for i in range(62)}, "number": "x"},  # unknown first, then a bad value
        {f"k{i}": i for i in range(63)},  # every required parameter missing too
        {**VALID, "items": ["x"] * 30, **{f"{'w' * 70}{i}": i for i in range(70)}},  # long keys
    ],
    ids=["90000-unknown", "unknown-and-invalid", "unknown-and-missing", "long-unknown-keys"],
)
def test_too_many_keys_are_refused_before_validation_with_pydantics_own_detail(
    payload: dict[str, Any],
) -> None:
    # More keys than parameters + MAX_PROBLEMS: pydantic never sees the unknown ones, but the
    # 422 lists exactly what it would have listed.
    assert len(payload) > len(binder.params) + MAX_PROBLEMS
    with pytest.raises(RequestError) as info:
        binder.bind(payload)
    assert info.value.status == 422
    assert info.value.detail == _pydantic_detail(payload)


async def _coroutine() -> None: ...


async def _agen() -> AsyncIterator[int]:
    yield 1


class _AsyncCallable:
    async def __call__(self) -> None: ...


@pytest.mark.parametrize(
    "func", [_coroutine, _agen, functools.partial(_coroutine), _AsyncCallable()], ids=repr
)
def test_async_functions_fail_at_registration(func: Any) -> None:
    with pytest.raises(RegistrationError, match="async functions are not supported on WSGI"):
        inspect_function(func, "f")


@pytest.mark.parametrize(
    "body",
    [{"mode": "medium"}, {"color": "green"}, {"options": {"depth": "deep"}}, {"bounded": 1001}, {"maybe": 5}],
)
def test_constraints_reject_bad_values(body: dict[str, Any]) -> None:
    with pytest.raises(RequestError) as info:
        binder.bind({**VALID, **body})
    assert info.value.status == 422


def test_unannotated_parameters_accept_any_json() -> None:
    def loose(x, y=1):  # type: ignore[no-untyped-def]
        pass

    assert inspect_function(loose, "loose").bind({"x": [1, {"a": None}]}) == {"x": [1, {"a": None}], "y": 1}


def _args(*args: int) -> None: ...
def _kwargs(**kwargs: int) -> None: ...
def _positional(a: int, /) -> None: ...
def _unknown_type(a: object.__class__) -> None: ...  # type: ignore[valid-type]
def _forward(a: DoesNotExist) -> None: ...  # type: ignore[name-defined]  # noqa: F821


class Opaque:
    pass


def _opaque(a: Opaque) -> None: ...


@pytest.mark.parametrize(
    ("func", "reason"),
    [
        (_args, "*args"),
        (_kwargs, "**kwargs"),
        (_positional, "positional-only"),
        (_forward, "type hints"),
        (_opaque, "cannot validate"),
    ],
)
def test_unservable_signatures_fail_at_registration(func: Any, reason: str) -> None:
    with pytest.raises(RegistrationError, match=re.escape(reason)):
        inspect_function(func, "f")


@pytest.mark.parametrize(
    "name", ["_private", "", "has space", "slash/name", "1starts-with-digit", "dot.name"]
)
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(RegistrationError):
        validate_name(name)


def test_good_names_pass() -> None:
    assert validate_name("run") == "run"
    assert validate_name("run-2_b") == "run-2_b"


def test_json_schema_uses_parameter_names_and_defaults() -> None:
    schema = binder.json_schema()
    assert schema["required"] == ["text", "number", "ratio", "flag", "items", "weights"]
    assert schema["properties"]["bounded"]["maximum"] == 1000
    assert schema["properties"]["mode"]["default"] == "fast"
    assert schema["additionalProperties"] is False


def _get_friendly(
    text: str,
    number: int,
    ratio: float,
    flag: bool,
    mode: Literal["fast", "slow"],
    color: Color,
    items: list[int],
    pair: tuple[str, str] = ("a", "b"),
    maybe: int | None = None,
    maybe_items: list[str] | None = None,
) -> None:
    pass


def test_text_numbers_booleans_enums_and_lists_of_them_can_come_from_a_query_string() -> None:
    check_query_parameters(inspect_function(_get_friendly, "friendly"))


@pytest.mark.parametrize(
    "annotation",
    [dict[str, int], Options, list[list[int]], list[Options], Optional[Options]],  # noqa: UP045
)
def test_a_parameter_a_query_string_cannot_carry_refuses_get_at_registration(annotation: Any) -> None:
    def func(value: Any) -> None:
        pass

    func.__annotations__["value"] = annotation
    with pytest.raises(RegistrationError, match="parameter value: a query string cannot carry it"):
        check_query_parameters(inspect_function(func, "func"))
    sse = SSERun()
    with pytest.raises(RegistrationError):
        sse.function(methods=("GET", "POST"))(func)
    sse.function(methods=("POST",))(func)  # fine with a JSON body


class Circle(BaseModel):
    kind: Literal["circle"]


class Square(BaseModel):
    kind: Literal["square"]


def shapes(shape: Annotated[Circle | Square, Field(discriminator="kind")], key: uuid.UUID) -> None:
    pass


def test_problems_name_the_rule_never_the_clients_value() -> None:
    with pytest.raises(RequestError) as refused:
        inspect_function(shapes, "shapes").bind({"shape": {"kind": "s3cr3t"}, "key": "zz-s3cr3t"})
    detail = refused.value.detail
    assert detail is not None
    assert [(d["loc"], d["msg"]) for d in detail] == [
        (["shape"], "Input tag does not match any of the expected tags: 'circle', 'square'"),
        (["key"], "Input should be a valid UUID"),
    ]
