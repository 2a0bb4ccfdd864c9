"""CORS with flask-cors, unchanged: preflights, streams, reconnects and errors all carry its
headers, and a page on another origin reads a stream in a real browser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_sse_run import SSERun
from flask_sse_run.testing import parse_events
from tests.blueprint_app import create_app
from tests.browser import chromium
from tests.live import gunicorn

ORIGIN = "https://app.example"
TOKEN = "cors-test-token-0123"
ACAO = "Access-Control-Allow-Origin"


def client(**config: Any) -> FlaskClient:
    return create_app(CORS_ORIGINS=[ORIGIN], **config).test_client()


def assert_cors(response: Any) -> None:
    assert response.headers[ACAO] == ORIGIN
    assert response.headers["Access-Control-Expose-Headers"] == "X-Request-ID, X-Run-ID"


def preflight(method: str, headers: str) -> dict[str, str]:
    return {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    }


def test_without_flask_cors_a_preflight_is_204_with_no_allow_origin() -> None:
    # What a browser meets without CORS: the preflight succeeds but allows nobody, and fetch fails.
    app = Flask(__name__)
    SSERun(app).function(name="run")(lambda: iter(["x"]))
    response = app.test_client().options("/run", headers=preflight("POST", "content-type"))
    assert response.status_code == 204
    assert ACAO not in response.headers


def test_a_preflight_allows_the_origin_methods_and_headers_a_client_sends() -> None:
    sent = "content-type, last-event-id, authorization, prefer, x-request-id"
    response = client().options("/t/acme/ticks", headers=preflight("POST", sent))
    assert response.status_code == 204
    assert response.headers["Allow"] == "GET, OPTIONS, POST"  # our own answer, kept
    assert_cors(response)
    assert set(response.headers["Access-Control-Allow-Headers"].split(", ")) == set(sent.split(", "))
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    runs = client().options("/t/acme/runs/" + "0" * 32, headers=preflight("DELETE", "last-event-id"))
    assert runs.status_code == 204 and "DELETE" in runs.headers["Access-Control-Allow-Methods"]
    assert runs.headers["Access-Control-Allow-Headers"] == "last-event-id"


def test_a_preflight_allows_neither_other_origins_nor_other_headers() -> None:
    other = client().options(
        "/t/acme/ticks", headers={**preflight("POST", "content-type"), "Origin": "https://evil.example"}
    )
    assert other.status_code == 204 and ACAO not in other.headers
    unlisted = client().options("/t/acme/ticks", headers=preflight("POST", "x-evil"))
    assert "Access-Control-Allow-Headers" not in unlisted.headers


def test_a_stream_carries_the_cors_headers_and_exposes_its_request_and_run_ids() -> None:
    response = client().post(
        "/t/acme/ticks",
        json={"n": 2},
        headers={"Origin": ORIGIN, "Accept": "text/event-stream", "X-Request-ID": "cors-1"},
    )
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    assert_cors(response)
    assert response.headers["X-Request-ID"] == "cors-1"
    run_id = response.headers["X-Run-ID"]
    assert [(e.id, e.data) for e in parse_events(response.data)] == [
        (f"{run_id}:1", "acme 0"),
        (f"{run_id}:2", "acme 1"),
    ]


def test_a_reconnect_and_a_run_followed_at_its_url_carry_the_cors_headers() -> None:
    c = client()
    started = c.post("/t/acme/ticks", json={"n": 3}, headers={"Origin": ORIGIN, "Prefer": "respond-async"})
    assert started.status_code == 202
    assert_cors(started)
    run_id = started.get_json()["run_id"]
    resumed = c.post("/t/acme/ticks", headers={"Origin": ORIGIN, "Last-Event-ID": f"{run_id}:1"})
    assert_cors(resumed)
    assert [e.data for e in parse_events(resumed.data)] == ["acme 1", "acme 2"]
    followed = c.get(f"/t/acme/runs/{run_id}?last_event_id=2", headers={"Origin": ORIGIN})
    assert_cors(followed)
    assert [e.data for e in parse_events(followed.data)] == ["acme 2"]
    ended = c.post("/t/acme/ticks", headers={"Origin": ORIGIN, "Last-Event-ID": f"{run_id}:3"})
    assert ended.status_code == 204
    assert_cors(ended)
    cancelled = c.delete(f"/t/acme/runs/{run_id}", headers={"Origin": ORIGIN})
    assert cancelled.status_code == 204
    assert_cors(cancelled)


@pytest.mark.parametrize(
    ("path", "kwargs", "status"),
    [
        ("/t/acme/ticks", {"json": {"n": 1}}, 401),  # the extension's bearer auth
        ("/t/acme/ticks", {"json": {"n": "x"}, "token": True}, 422),
        ("/t/acme/walk", {"token": True}, 404),
        ("/t/acme/ticks", {"method": "PUT", "token": True}, 405),
        ("/t/closed/ticks", {"json": {"n": 1}}, 403),  # raised by the blueprint's hook
        ("/t/nowhere/ticks", {"json": {"n": 1}}, 404),
        ("/t/acme/runs/" + "0" * 32, {"method": "GET", "token": True}, 404),
    ],
)
def test_error_responses_carry_the_cors_headers(path: str, kwargs: dict[str, Any], status: int) -> None:
    headers = {"Origin": ORIGIN}
    if kwargs.pop("token", False):
        headers["Authorization"] = f"Bearer {TOKEN}"
    response = client(SSE_RUN_AUTH_TOKENS=[TOKEN]).open(
        path, method=kwargs.pop("method", "POST"), headers=headers, **kwargs
    )
    assert response.status_code == status
    assert response.mimetype == "application/json"
    assert_cors(response)


def test_openapi_json_carries_them_and_paths_outside_the_resources_do_not() -> None:
    assert_cors(client().get("/t/acme/openapi.json", headers={"Origin": ORIGIN}))
    private = client().post("/private/acme/ticks", json={"n": 1}, headers={"Origin": ORIGIN})
    assert private.status_code == 200 and ACAO not in private.headers


# --- a real browser -----------------------------------------------------------------------------

# Runs in the page at http://localhost:<port>/blank; the API is http://127.0.0.1:<port>: another
# origin (another host), so every call is a CORS request, preflighted where a browser must.
CROSS_ORIGIN_SCRIPT = """
const [api, done] = arguments;
const result = {origin: location.origin};
async function stream(path, headers, body) {
  const response = await fetch(api + path, {
    method: "POST",
    headers: {"Content-Type": "application/json", "Accept": "text/event-stream", ...headers},
    body: JSON.stringify(body),
  });
  return {
    status: response.status,
    requestId: response.headers.get("X-Request-ID"),
    runId: response.headers.get("X-Run-ID"),
    body: await response.text(),
  };
}
function eventSource(url, count) {
  return new Promise((resolve, reject) => {
    const source = new EventSource(url), seen = [];
    source.onmessage = (event) => {
      seen.push([event.lastEventId, event.data]);
      if (seen.length === count) { source.close(); resolve(seen); }
    };
    source.onerror = () => { source.close(); reject(new Error("EventSource failed")); };
  });
}
(async () => {
  try {
    result.first = await stream("/t/acme/ticks", {"X-Request-ID": "browser-1"}, {n: 3});
    result.resumed = await stream("/t/acme/ticks", {"Last-Event-ID": `${result.first.runId}:1`}, {});
    result.invalid = await stream("/t/acme/ticks", {}, {n: "three"});
    result.closed = await stream("/t/closed/ticks", {}, {n: 1});
    result.eventSource = await eventSource(api + "/t/acme/ticks?n=2", 2);
    try {
      await stream("/private/acme/ticks", {}, {n: 1});
      result.private = "read";
    } catch (error) {
      result.private = error.name;  // TypeError: "Failed to fetch", as without CORS
    }
  } catch (error) {
    result.error = String(error);
  }
  done(result);
})();
"""


@pytest.mark.timeout(180)
def test_a_page_on_another_origin_streams_resumes_and_reads_errors_in_a_real_browser(tmp_path: Path) -> None:
    with (
        gunicorn("tests.blueprint_app:create_app()", tmp_path=tmp_path) as server,
        chromium(tmp_path) as driver,
    ):
        driver.get(f"http://localhost:{server.port}/blank")
        result = driver.execute_async_script(CROSS_ORIGIN_SCRIPT, server.url)
        log = server.log()
    assert "error" not in result, (result, log)
    assert result["origin"] == f"http://localhost:{server.port}" != server.url
    first, run_id = result["first"], result["first"]["runId"]
    assert (first["status"], first["requestId"]) == (200, "browser-1")
    assert first["body"] == "".join(f"id: {run_id}:{i + 1}\ndata: acme {i}\n\n" for i in range(3))
    resumed = result["resumed"]
    assert (resumed["status"], resumed["runId"]) == (200, run_id)
    assert resumed["body"] == f"id: {run_id}:2\ndata: acme 1\n\nid: {run_id}:3\ndata: acme 2\n\n"
    assert result["invalid"]["status"] == 422 and '"loc":["n"]' in result["invalid"]["body"]
    assert result["closed"] == {
        "status": 403,
        "requestId": None,  # the hook's answer is the app's own, not the extension's
        "runId": None,
        "body": '{"error":"this tenant is closed"}\n',
    }
    event_source = result["eventSource"]
    assert [data for _, data in event_source] == ["acme 0", "acme 1"]
    assert event_source[0][0].endswith(":1")
    assert result["private"] == "TypeError"
