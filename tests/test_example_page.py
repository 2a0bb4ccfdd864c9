"""The example page (``GET /``): served by the example app, and driven in a real headless
Chromium through a proxy that cuts the stream: the browser's EventSource reconnects by itself,
the page ends with every event once and in order, and the function ran once. Its notifications
panel follows a channel: what the page's button publishes, what another client publishes, and
what ``flask sse publish`` publishes from a shell through a real Redis all appear in it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import requests

from example_app import create_app
from tests.browser import chromium
from tests.live import ROOT, Server, gunicorn
from tests.redis_server import RedisServer
from tests.tcp_proxy import cuttable_proxy

UPPER_RANGE = 10  # one event a second: the cut after two events leaves eight to resume
FALCON_CONTEXT = 64  # the tiny Falcon's: a max_new_tokens the page's form allows can exceed it


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
    # Relative, nothing external; the icon is inline, so the browser asks for no /favicon.ico.
    icons = [url for url in assets.urls if url.startswith("data:")]
    assert len(icons) == 1
    assert sorted(set(assets.urls) - set(icons)) == ["page/page.css", "page/page.js"]
    types = {url: client.get(f"/{url}").mimetype for url in assets.urls if url not in icons}
    assert types == {"page/page.css": "text/css", "page/page.js": "text/javascript"}


def test_the_page_calls_run_and_falcon_with_get_urls_relative_to_itself() -> None:
    script = create_app().test_client().get("/page/page.js").get_data(as_text=True)
    assert "new EventSource(url)" in script
    assert "stream.start(`run?${query}`)" in script
    assert "stream.start(`falcon/run?${query}`)" in script
    assert 'fetch("falcon/health"' in script
    assert 'new EventSource("channels/notifications")' in script
    assert 'fetch("notify", {' in script
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
    # The page counts the reconnects that resumed the run, not the last one, answered 204.
    assert int(status["reconnects"]) == len(resumed) - 1 >= 1, heads
    assert "/favicon.ico" not in server.log()


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


@pytest.fixture(scope="module")
def falcon_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The example app with the tiny Falcon, its context short enough to exceed from the form."""
    pytest.importorskip("torch")
    from tests.tiny_falcon import save_model

    tmp_path = tmp_path_factory.mktemp("falcon-page")
    model = save_model(tmp_path / "falcon", context=FALCON_CONTEXT)
    env = {"FALCON_MODEL": str(model), "HF_HUB_OFFLINE": "1"}
    with gunicorn("wsgi:app", tmp_path=tmp_path, env=env) as server:
        yield server


def generate_on_the_page(driver: Any, server: Server, max_new_tokens: int) -> None:
    """Open the page, wait for its Falcon form (it appears once /falcon/health says ready; the
    page asks again every 5 s), and start a generation."""
    driver.get(f"{server.url}/")
    wait_for(
        driver,
        lambda d: d.find_element("id", "falcon-health").get_attribute("data-status") == "ready",
        120,
        "the model to be ready on the page",
    )
    field = driver.find_element("id", "falcon-max-new-tokens")
    field.clear()
    field.send_keys(str(max_new_tokens))
    driver.find_element("id", "falcon-start").click()


def text(driver: Any, element: str) -> str:
    return str(driver.execute_script(f"return document.getElementById('{element}').textContent"))


@pytest.mark.timeout(300)
def test_the_pages_falcon_panel_streams_a_generation_with_ids_and_closes_after_the_summary(
    falcon_server: Server, tmp_path: Path
) -> None:
    with chromium(tmp_path) as driver:
        generate_on_the_page(driver, falcon_server, 40)
        wait_for(
            driver,
            lambda d: d.find_element("id", "falcon-state").get_attribute("data-state") == "finished",
            60,
            "the generation to finish on the page",
        )
        generated, summary = text(driver, "falcon-text"), text(driver, "falcon-summary")
        ids, count = text(driver, "falcon-ids"), int(text(driver, "falcon-count"))
        time.sleep(1)  # long enough for an EventSource left open to reconnect (it must not)
        health = requests.get(f"{falcon_server.url}/falcon/health", timeout=10).json()
    sent = re.search(r"finish_reason (length|eos), (\d+) tokens", summary)
    assert sent, summary
    assert generated.strip() and count >= 2  # text pieces, then the summary
    # A resumable run: each event with its id, once and in order; one generation on the server.
    assert ids.endswith(f"#1\N{EN DASH}{count} (each once, in order)"), ids
    assert sum(health["finished"].values()) == 1
    assert health["tokens_generated"] == int(sent.group(2))


@pytest.mark.timeout(300)
def test_the_pages_falcon_panel_shows_the_servers_reason_when_it_refuses_the_stream(
    falcon_server: Server, tmp_path: Path
) -> None:
    before = requests.get(f"{falcon_server.url}/falcon/health", timeout=10).json()
    with chromium(tmp_path) as driver:
        generate_on_the_page(driver, falcon_server, FALCON_CONTEXT + 1)
        # The refusal first, then the server's reason once the page has read it.
        wait_for(
            driver,
            lambda d: "context" in text(d, "falcon-state"),
            60,
            "the server's reason on the page",
        )
        state = driver.find_element("id", "falcon-state")
        assert state.get_attribute("data-state") == "failed"
        assert state.text.startswith("failed: 422: max_new_tokens: "), state.text
        assert driver.find_element("id", "falcon-start").is_enabled()
        after = requests.get(f"{falcon_server.url}/falcon/health", timeout=10).json()
    # Reading the reason ran no generation.
    assert after["finished"] == before["finished"] and after["running"] == 0


@pytest.mark.timeout(300)
def test_the_pages_falcon_panel_shows_the_install_command_on_one_line(tmp_path: Path) -> None:
    with gunicorn("wsgi:app", tmp_path=tmp_path) as server, chromium(tmp_path) as driver:
        driver.get(f"{server.url}/")
        wait_for(
            driver,
            lambda d: d.find_element("id", "falcon-health").get_attribute("data-status") == "disabled",
            60,
            "the page's Falcon check",
        )
        # Each command, and the most lines the browser broke it into while the message took
        # every width from a phone's to a desktop's (where the lines break depends on it).
        commands = driver.execute_script(
            """
            const note = document.getElementById("falcon-health");
            const codes = [...note.querySelectorAll("code")];
            const most = codes.map(() => 0);
            for (let width = 200; width <= 1200; width += 4) {
              note.style.width = `${width}px`;
              codes.forEach((code, i) => {
                most[i] = Math.max(most[i], code.getClientRects().length);
              });
            }
            return codes.map((code, i) => [code.textContent, most[i]]);
            """
        )
        message = text(driver, "falcon-health")
    assert [command for command, _ in commands] == [
        "pip install 'flask-sse-run[llm]'",
        "pip install -e '.[llm]'",
    ], message
    assert all(lines == 1 for _, lines in commands), commands
    assert "FALCON_MODEL" in message


# --- the notifications panel: a channel -----------------------------------------------------------

#: What the page tells the user to run in the checkout.
PUBLISH_COMMAND = 'flask --app wsgi sse publish notifications "hello"'


def notifications(driver: Any) -> list[list[str]]:
    """Each list item of the notifications panel: its event id and its text."""
    return driver.execute_script(  # type: ignore[no-any-return]
        "return [...document.querySelectorAll('#notifications-events li')]"
        ".map((li) => [li.dataset.id, li.querySelector('.data').textContent])"
    )


def open_the_panel(driver: Any, server: Server) -> None:
    """Open the page and wait for its channel's EventSource to be open."""
    driver.get(f"{server.url}/")
    wait_for(
        driver,
        lambda d: d.find_element("id", "notifications-state").get_attribute("data-state") == "open",
        60,
        "the notifications panel's EventSource to open",
    )


def publish_with_the_button(driver: Any, message: str) -> None:
    field = driver.find_element("id", "notify-message")
    field.clear()
    field.send_keys(message)
    driver.find_element("id", "notify-send").click()


def publish_command(message: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The page's command, with ``message``, run in the checkout as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "sse", "publish", "notifications", message],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_publish_command_the_page_names_refuses_without_redis() -> None:
    # The example app as command 1 starts it: channels in each process's memory.
    page = create_app().test_client().get("/").get_data(as_text=True)
    assert f'id="notifications-command">{PUBLISH_COMMAND}</code>' in page.replace("&#34;", '"')
    assert "EXAMPLE_SSE_RUN_REDIS_URL=redis://" in page
    environment = {key: value for key, value in os.environ.items() if not key.startswith("EXAMPLE_")}
    refused = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "sse", "publish", "notifications", "hello"],
        cwd=ROOT,
        env={**environment, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1, refused
    assert "set SSE_RUN_REDIS_URL" in refused.stderr, refused.stderr


@pytest.mark.timeout(300)
def test_the_pages_notifications_panel_shows_what_is_published_in_the_servers_process(tmp_path: Path) -> None:
    with gunicorn("wsgi:app", tmp_path=tmp_path) as server, chromium(tmp_path) as driver:
        open_the_panel(driver, server)
        assert driver.find_element("id", "notifications-command").text == PUBLISH_COMMAND
        assert notifications(driver) == []

        # The page's button: POST /notify, whose function calls sse.publish.
        publish_with_the_button(driver, "hello from the button")
        wait_for(
            driver,
            lambda d: notifications(d) == [["notifications:1", "hello from the button"]],
            30,
            "the button's event in the panel",
        )
        wait_for(
            driver,
            lambda d: text(d, "notifications-published") == "as notifications:1",
            30,
            "the id of the button's event",
        )

        # A second page on the same channel, and a publish from another client: both pages get it.
        first = driver.current_window_handle
        driver.switch_to.new_window("tab")
        open_the_panel(driver, server)
        answer = requests.post(f"{server.url}/notify", json={"message": "hello from requests"}, timeout=10)
        assert answer.status_code == 200 and answer.json()["result"] == "notifications:2"
        wait_for(
            driver,
            lambda d: notifications(d) == [["notifications:2", "hello from requests"]],
            30,
            "the event in the second page",
        )
        driver.switch_to.window(first)
        wait_for(
            driver,
            lambda d: notifications(d)[-1:] == [["notifications:2", "hello from requests"]],
            30,
            "the event in the first page",
        )
        assert text(driver, "notifications-count") == "2"
        assert text(driver, "notifications-last-id") == "notifications:2"


@pytest.mark.timeout(300)
def test_a_publish_from_the_pages_command_appears_in_its_panel_through_redis(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as redis_server:
        env = {"EXAMPLE_SSE_RUN_REDIS_URL": redis_server.url}
        with (
            gunicorn("wsgi:app", tmp_path=tmp_path, env={**env, "GUNICORN_WORKERS": "2"}) as server,
            chromium(tmp_path) as driver,
        ):
            open_the_panel(driver, server)
            published = publish_command("hello from the shell", env)
            assert published.returncode == 0, published
            assert published.stdout == "notifications:1\n"
            wait_for(
                driver,
                lambda d: notifications(d) == [["notifications:1", "hello from the shell"]],
                30,
                "the command's event in the panel",
            )
            # The button publishes on the same channel, now in Redis: the next seq.
            publish_with_the_button(driver, "and from the button")
            wait_for(
                driver,
                lambda d: notifications(d)[-1:] == [["notifications:2", "and from the button"]],
                30,
                "the button's event in the panel",
            )
            assert published.stderr == ""
