"""The example page (``GET /``): served by the example app, and driven in a real headless
Chromium through a proxy that cuts the stream: the browser's EventSource reconnects by itself,
the page ends with every event once and in order, and the function ran once."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import requests

from example_app import create_app
from tests.browser import chromium
from tests.live import gunicorn
from tests.tcp_proxy import cuttable_proxy

UPPER_RANGE = 10  # one event a second: the cut after two events leaves eight to resume


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


def test_the_example_app_serves_the_page_and_every_file_it_loads() -> None:
    client = create_app().test_client()
    response = client.get("/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    assets = _Assets()
    assets.feed(response.get_data(as_text=True))
    assert sorted(assets.urls) == ["page/page.css", "page/page.js"]  # relative, nothing external
    types = {url: client.get(f"/{url}").mimetype for url in assets.urls}
    assert types == {"page/page.css": "text/css", "page/page.js": "text/javascript"}


def test_the_page_calls_run_and_falcon_with_get_urls_relative_to_itself() -> None:
    script = create_app().test_client().get("/page/page.js").get_data(as_text=True)
    assert "new EventSource(url)" in script
    assert "stream.start(`run?${query}`)" in script
    assert "stream.start(`falcon/run?${query}`)" in script
    assert 'fetch("falcon/health"' in script
    assert "http://" not in script and "https://" not in script


def wait_for(driver: Any, condition: Callable[[Any], Any], timeout: float, what: str) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}; the page says: {page_status(driver)}") from None


def page_status(driver: Any) -> dict[str, str]:
    return {
        name: driver.execute_script(f"return document.getElementById('run-{name}').textContent")
        for name in ("state", "count", "reconnects", "ids")
    }


def page_events(driver: Any) -> list[list[str]]:
    """Each list item of the page: its event id and its data, as the page shows them."""
    return driver.execute_script(  # type: ignore[no-any-return]
        "return [...document.querySelectorAll('#run-events li')]"
        ".map((li) => [li.dataset.id, li.querySelector('.data').textContent])"
    )


@pytest.mark.timeout(300)  # its waits are bounded one by one (240 s at most)
def test_the_page_survives_a_cut_connection_with_every_event_once_in_order_and_one_run(
    tmp_path: Path,
) -> None:
    with (
        gunicorn("tests.page_app:create_app()", tmp_path=tmp_path) as server,
        cuttable_proxy(server.port) as proxy,
        chromium(tmp_path) as driver,
    ):
        driver.get(f"{proxy.url}/")
        # The script ran: it asked /falcon/health, and offers no Falcon form on an app without it.
        wait_for(
            driver,
            lambda d: d.find_element("id", "falcon-health").get_attribute("data-status") == "absent",
            60,
            "the page's Falcon check",
        )
        assert not driver.find_element("id", "falcon-form").is_displayed()

        field = driver.find_element("id", "run-upper-range")
        field.clear()
        field.send_keys(str(UPPER_RANGE))
        driver.find_element("id", "run-start").click()
        wait_for(driver, lambda d: len(page_events(d)) >= 2, 60, "two events")

        # Mid-stream: the run is still going when every connection is cut.
        before = requests.get(f"{server.url}/stats", timeout=10).json()
        assert before == {"started": 1, "finished": 0}, "the run ended before the cut"
        assert proxy.cut() >= 1

        # EventSource reconnects on its own (after its retry delay), follows the run to its
        # end, reconnects once more and gets 204, and the page closes it.
        wait_for(
            driver,
            lambda d: d.find_element("id", "run-state").get_attribute("data-state") == "finished",
            120,
            "the run to finish on the page",
        )
        events = page_events(driver)
        status = page_status(driver)
        after = requests.get(f"{server.url}/stats", timeout=10).json()
        sent = b"".join(proxy.requests()).decode("latin-1")
    # The request lines and Last-Event-ID headers, for the failure messages.
    heads = [line for line in sent.split("\r\n") if re.match(r"(?i)GET |last-event-id:", line)]

    run_id = events[0][0].split(":")[0]
    assert re.fullmatch(r"[0-9a-f]{32}", run_id), events[0]
    assert events == [[f"{run_id}:{i + 1}", f"Number {i} "] for i in range(UPPER_RANGE)]
    assert status["count"] == str(UPPER_RANGE)
    assert status["ids"].endswith(f"#1\N{EN DASH}{UPPER_RANGE} (each once, in order)"), status
    assert after == {"started": 1, "finished": 1}  # the reconnect followed the run, never re-ran it

    # What the browser sent through the proxy: the first GET, a reconnect that resumed the run
    # mid-way (the cut's), and, after the last event, the one the server answered with 204.
    runs = re.findall(rf"GET /run\?upper_range={UPPER_RANGE} HTTP/1\.1\r\n", sent)
    resumed = [int(seq) for seq in re.findall(rf"(?i)\r\nlast-event-id: {run_id}:(\d+)\r\n", sent)]
    assert len(runs) == 1 + len(resumed), heads
    assert resumed and resumed[0] < UPPER_RANGE, heads
    assert resumed[-1] == UPPER_RANGE, heads
    assert int(status["reconnects"]) == len(resumed)


@pytest.mark.timeout(300)
def test_the_pages_stop_button_closes_the_stream_and_cancels_the_run_on_the_server(tmp_path: Path) -> None:
    with (
        gunicorn("tests.page_app:create_app()", tmp_path=tmp_path) as server,
        chromium(tmp_path) as driver,
    ):
        driver.get(f"{server.url}/")
        field = wait_for(driver, lambda d: d.find_element("id", "run-upper-range"), 60, "the form")
        field.clear()
        field.send_keys("3600")
        driver.find_element("id", "run-start").click()
        wait_for(driver, lambda d: len(page_events(d)) >= 1, 60, "the first event")
        driver.find_element("id", "run-stop").click()
        wait_for(
            driver,
            lambda d: d.find_element("id", "run-state").text == "stopped: run cancelled on the server",
            60,
            "the DELETE of the run",
        )
        # The run of an hour ended now: cancelled, not left running without a client.
        deadline = time.monotonic() + 30
        while (stats := requests.get(f"{server.url}/stats", timeout=10).json())["finished"] == 0:
            assert time.monotonic() < deadline, stats
            time.sleep(0.1)
        assert stats == {"started": 1, "finished": 1}
        assert driver.find_element("id", "run-start").is_enabled()
        assert not driver.find_element("id", "run-stop").is_enabled()


@pytest.mark.timeout(300)
def test_the_pages_falcon_panel_streams_a_generation_with_ids_and_closes_after_the_summary(
    tmp_path: Path,
) -> None:
    pytest.importorskip("torch")
    from tests.tiny_falcon import save_model

    model = save_model(tmp_path / "falcon")
    env = {"FALCON_MODEL": str(model), "HF_HUB_OFFLINE": "1"}
    with gunicorn("wsgi:app", tmp_path=tmp_path, env=env) as server, chromium(tmp_path) as driver:
        driver.get(f"{server.url}/")
        # The form appears once /falcon/health says ready (the page asks again every 5 s).
        wait_for(
            driver,
            lambda d: d.find_element("id", "falcon-health").get_attribute("data-status") == "ready",
            120,
            "the model to be ready on the page",
        )
        field = driver.find_element("id", "falcon-max-new-tokens")
        field.clear()
        field.send_keys("40")
        driver.find_element("id", "falcon-start").click()
        wait_for(
            driver,
            lambda d: d.find_element("id", "falcon-state").get_attribute("data-state") == "finished",
            60,
            "the generation to finish on the page",
        )

        def text(element: str) -> str:
            return str(driver.execute_script(f"return document.getElementById('{element}').textContent"))

        generated, summary, ids = text("falcon-text"), text("falcon-summary"), text("falcon-ids")
        count = int(text("falcon-count"))
        time.sleep(1)  # long enough for an EventSource left open to reconnect (it must not)
        health = requests.get(f"{server.url}/falcon/health", timeout=10).json()
    sent = re.search(r"finish_reason (length|eos), (\d+) tokens", summary)
    assert sent, summary
    assert generated.strip() and count >= 2  # text pieces, then the summary
    # A resumable run: each event with its id, once and in order; one generation on the server.
    assert ids.endswith(f"#1\N{EN DASH}{count} (each once, in order)"), ids
    assert sum(health["finished"].values()) == 1
    assert health["tokens_generated"] == int(sent.group(2))
