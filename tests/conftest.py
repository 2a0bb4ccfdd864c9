from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.apps import create_app

#: Set by .ci/run: there, a test that skips (a tool missing) fails instead.
REQUIRE_ALL = os.environ.get("FLASK_SSE_RUN_REQUIRE_ALL_TESTS") == "1"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    report = yield
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, but CI runs every test: {report.longrepr}"
    return report


@pytest.fixture
def app() -> Flask:
    return create_app(TESTING=True)


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    with app.test_client() as client:
        yield client
