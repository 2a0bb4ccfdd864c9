"""Relay an upstream Server-Sent Events stream into this one: ``return relay(open_stream(url))``.

An inference engine (vLLM, TGI, ``transformers serve``) or any other server streams events;
the Flask app in front of it keeps auth, validation and the SSE contract with its clients::

    from flask_sse_run import open_stream, relay

    @sse.function
    def story(prompt: str):
        # Opened here, in the function body: a refusal (the upstream's 4xx, or 502/503/504)
        # becomes this endpoint's JSON error before the stream starts.
        upstream = open_stream("http://engine:8000/v1/completions", json={"prompt": prompt, "stream": True})
        return relay(upstream)  # each upstream event becomes one event of this stream

What the relay guarantees:

* **The upstream is closed the moment our client leaves.** Under gevent the runtime interrupts
  the read the stream waits in; elsewhere the runtime closes the stream at its next write.
  Either way the returned iterator's ``close`` runs and closes the upstream response, also if
  iteration never began (a plain generator ignores ``close`` until it has started). An engine
  aborts a request whose client closed the connection (vLLM does; so does ``transformers serve``).
* **Upstream failures become one error event.** A refusal, an unreachable or silent upstream,
  a connection cut mid-stream or an event over ``max_event_bytes`` raise
  :class:`~flask_sse_run.errors.UpstreamError`; the runtime turns it into this stream's ``error``
  event, with the upstream's status and message, and ends the stream cleanly.
* **Timeouts.** :func:`open_stream` gives up connecting after ``connect_timeout`` seconds and
  reading after ``silence_timeout`` seconds without a byte (requests' ``timeout=(connect,
  read)``: the read timeout bounds each wait, not the whole stream); under gevent, the
  response's headers must all be there ``connect_timeout + silence_timeout`` seconds after the
  call (504 beyond, the connection closed). For a response you open yourself, set your
  client's timeouts; the relay maps its timeout errors to a 504.
* **No unbounded buffering.** The body is read ``chunk_size`` bytes at most at a time, and the
  next read waits until every event of the last one has been taken by the stream, which waits
  for the client's socket: a slow client slows the read, and TCP slows the upstream. One event
  may hold at most ``max_event_bytes``.

A source is a ``requests`` response opened with ``stream=True``, an ``httpx`` response opened
for streaming (``client.stream(...)`` or ``client.send(..., stream=True)``), or any iterable of
``bytes``. Both HTTP clients are cooperative under gunicorn's gevent worker (sockets are
patched): a stream waiting on its upstream costs a parked greenlet, not a thread.
"""

from __future__ import annotations

import contextlib
import http
import http.client
import json as jsonlib
import os
import re
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .errors import UpstreamError
from .events import Event
from .sse_parser import MAX_EVENT_BYTES, EventStreamParser, ParsedEvent

if TYPE_CHECKING:
    import requests

__all__ = [
    "CHUNK_SIZE",
    "CONNECT_TIMEOUT",
    "SILENCE_TIMEOUT",
    "RelayStream",
    "check_response",
    "error_message",
    "open_stream",
    "read_events",
    "refusal",
    "relay",
    "shared_session",
]

#: The most bytes read from the upstream at a time.
CHUNK_SIZE = 65536
#: Default seconds to establish the upstream connection.
CONNECT_TIMEOUT = 5.0
#: Default seconds the upstream may stay silent (no byte at all) before the relay gives up.
SILENCE_TIMEOUT = 60.0
#: The most bytes of an upstream error body read to find its message.
_ERROR_BODY_BYTES = 4096
#: The longest upstream message shown to our client.
_MESSAGE_CHARS = 300
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# Exceptions of these packages (and OSError, http.client's) raised while reading a body are
# network failures; anything else from an iterable source is a bug, and is left alone.
_HTTP_PACKAGES = frozenset({"requests", "urllib3", "httpx", "httpcore", "httpx2", "httpcore2", "h11"})

T = TypeVar("T")


class RelayStream(Generic[T]):
    """An iterator over what the upstream sends; ``close()`` closes the upstream response.

    Returned by :func:`relay` and :func:`read_events`. A class rather than a generator: a
    generator that has not started ignores ``close()``, and the upstream connection of a
    client that left before the first event would stay open.
    """

    __slots__ = ("_items", "_source")

    def __init__(self, source: Any, items: Iterator[T]) -> None:
        self._source = source
        self._items = items

    def __iter__(self) -> RelayStream[T]:
        return self

    def __next__(self) -> T:
        return next(self._items)

    def close(self) -> None:
        """Stop reading and close the upstream response (idempotent)."""
        try:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()
        finally:
            _close_source(self._source)


def _close_source(source: Any) -> None:
    close = getattr(source, "close", None)
    if close is not None:
        close()


def read_events(
    source: Any, *, chunk_size: int = CHUNK_SIZE, max_event_bytes: int = MAX_EVENT_BYTES
) -> RelayStream[ParsedEvent]:
    """The events of an upstream stream, parsed by the WHATWG rules, as they arrive.

    For code that maps an upstream's events to its own (the LLM upstream service does). HTTP
    sources are checked first (:func:`check_response`). Raises
    :class:`~flask_sse_run.errors.UpstreamError` for a refusal, a broken or silent connection,
    or an event over ``max_event_bytes``. The upstream is closed when the stream ends, fails or
    is closed.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    parser = EventStreamParser(max_event_bytes)  # checks max_event_bytes now, not at the first read
    return RelayStream(source, _parse(source, parser, chunk_size))


def _parse(source: Any, parser: EventStreamParser, chunk_size: int) -> Iterator[ParsedEvent]:
    try:
        if _is_http_response(source):
            check_response(source)
        for chunk in _guarded(_chunks(source, chunk_size)):
            try:
                events = parser.feed(chunk)
            except ValueError as exc:
                raise UpstreamError(502, f"the upstream sent {exc}") from exc
            # One event at a time: the next read waits until the stream has taken them all.
            yield from events
        parser.end()  # a body read to its end: urllib3 has put the connection back in the pool
    finally:
        _close_source(source)


def relay(
    source: Any, *, chunk_size: int = CHUNK_SIZE, max_event_bytes: int = MAX_EVENT_BYTES
) -> RelayStream[str | Event]:
    """Relay an upstream event stream: each upstream event becomes one event of this stream.

    Yields the event's data as a ``str`` when it is a plain message, else an
    :class:`~flask_sse_run.Event` with its type, and its ID when it changed, and ``retry`` when
    the upstream set one. Comments (the upstream's keep-alives) are dropped: this stream sends
    its own. See the module docstring for closing, errors, timeouts and buffering; the errors
    are :func:`read_events`'.
    """
    return RelayStream(
        source, _relayed(read_events(source, chunk_size=chunk_size, max_event_bytes=max_event_bytes))
    )


def _relayed(events: RelayStream[ParsedEvent]) -> Iterator[str | Event]:
    last_id = ""
    try:
        for event in events:
            new_id = event.id if event.id != last_id else None
            last_id = event.id
            if event.event == "message" and new_id is None and event.retry is None:
                yield event.data  # the common case: no Event object to build
            else:
                event_type = None if event.event == "message" else event.event
                yield Event(data=event.data, event=event_type, id=new_id, retry=event.retry)
    finally:
        events.close()


# -- reading bytes ----------------------------------------------------------------------------


def _is_http_response(source: Any) -> bool:
    return hasattr(source, "status_code") and hasattr(source, "headers")


def _chunks(source: Any, chunk_size: int) -> Iterator[bytes]:
    raw = getattr(source, "raw", None)
    if raw is not None and hasattr(raw, "read1"):
        # requests (urllib3 2): read1 returns what has arrived, up to chunk_size. (read(n) and
        # requests' iter_content(n) wait for n bytes: an event would wait for the next ones.)
        while True:
            data = raw.read1(chunk_size, decode_content=True)
            if not data:
                return
            yield data
    elif raw is not None and hasattr(raw, "stream"):
        # urllib3 1.x: a chunked body (what streaming servers send) comes one HTTP chunk at a time.
        yield from raw.stream(chunk_size, decode_content=True)
    elif hasattr(source, "iter_bytes"):
        # httpx: without a chunk size, each piece as the transport read it (at most 64 KiB).
        yield from source.iter_bytes()
    else:
        yield from source


def _guarded(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """``chunks``, with network failures turned into :class:`UpstreamError`."""
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        except Exception as exc:
            if not _network_failure(exc):
                raise
            if _is_timeout(exc):
                raise UpstreamError(
                    504, "the upstream went silent: nothing arrived within its read timeout"
                ) from exc
            raise UpstreamError(502, f"the upstream connection broke mid-stream ({_root_name(exc)})") from exc
        yield chunk


def _network_failure(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, http.client.HTTPException)):
        return True
    return type(exc).__module__.partition(".")[0] in _HTTP_PACKAGES


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps (``__cause__``, ``__context__``, and exceptions in ``args``:
    requests wraps urllib3's), each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < 16:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        todo.extend(a for a in current.args if isinstance(a, BaseException))
        reason = getattr(current, "reason", None)  # urllib3's MaxRetryError keeps it there
        if isinstance(reason, BaseException):
            todo.append(reason)


def _is_timeout(exc: BaseException) -> bool:
    return any(
        isinstance(e, TimeoutError) or any("Timeout" in cls.__name__ for cls in type(e).__mro__)
        for e in _causes(exc)
    )


def _root_name(exc: BaseException) -> str:
    """The name of the innermost cause: ``ConnectionRefusedError`` rather than ``ConnectionError``."""
    *_, last = _causes(exc)
    return type(last).__name__


# -- opening and checking ---------------------------------------------------------------------


def check_response(response: Any) -> None:
    """Raise :class:`UpstreamError` unless ``response`` is a ``200 text/event-stream``.

    The upstream's 4xx keeps its status (but 401, 403 and 407, which are about *our*
    credentials, become 502); 503 stays 503 with its ``Retry-After``; other statuses become
    502. The message names the upstream's status and quotes its error text (from a JSON
    ``{"error": ...}``, ``{"message": ...}`` or ``{"detail": ...}`` body, or plain text; at most
    300 characters, one line); an HTML body is never quoted, the status's reason stands for it.
    A refused response is closed.
    """
    status = int(response.status_code)
    content_type = str(response.headers.get("content-type", ""))
    if status == 200 and content_type.split(";")[0].strip().lower() == "text/event-stream":
        return
    try:
        if status == 200:
            raise UpstreamError(
                502,
                f"the upstream answered {content_type or 'no content type'}, not an event stream",
                upstream_status=200,
            )
        head = _head(response)
        # An HTML page (a proxy's or a framework's error page) is markup, not a message: its
        # status's reason says as much without quoting it.
        message = _reason(status) if _is_html(content_type, head) else error_message(head)
        raise refusal(status, message, response.headers.get("retry-after"))
    finally:
        _close_source(response)


def refusal(status: int, message: str, retry_after: str | None = None) -> UpstreamError:
    """The :class:`UpstreamError` for an upstream's error status and message (see :func:`check_response`)."""
    detail = f" (HTTP {status})" + (f": {message}" if message else "")
    headers = {"Retry-After": retry_after} if retry_after and retry_after.strip().isdigit() else None
    if status in (401, 403, 407):
        return UpstreamError(502, "the upstream refused our credentials" + detail, upstream_status=status)
    if 400 <= status < 500:
        keep = headers if status == 429 else None
        return UpstreamError(
            status, "the upstream refused the request" + detail, upstream_status=status, headers=keep
        )
    if status == 503:
        return UpstreamError(
            503, "the upstream is unavailable" + detail, upstream_status=status, headers=headers
        )
    if status >= 500:
        return UpstreamError(502, "the upstream failed" + detail, upstream_status=status)
    return UpstreamError(502, f"the upstream answered HTTP {status}", upstream_status=status)


def _head(response: Any) -> bytes:
    """At most the first ``_ERROR_BODY_BYTES`` of a (refused) response's body."""
    try:
        raw = getattr(response, "raw", None)
        if raw is not None and hasattr(raw, "read"):
            return bytes(raw.read(_ERROR_BODY_BYTES, decode_content=True))
        if hasattr(response, "iter_bytes"):
            head = b""
            for piece in response.iter_bytes():
                head += piece
                if len(head) >= _ERROR_BODY_BYTES:
                    break
            return head[:_ERROR_BODY_BYTES]
    except Exception:  # the error body is a courtesy: its status says enough
        return b""
    return b""


def _is_html(content_type: str, head: bytes) -> bool:
    mime = content_type.split(";")[0].strip().lower()
    return mime in ("text/html", "application/xhtml+xml") or head.lstrip()[:1] == b"<"


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def error_message(body: bytes) -> str:
    """The message of an upstream error body, on one line and shortened for our client."""
    text = body.decode("utf-8", "replace")
    try:
        value: Any = jsonlib.loads(text)
    except ValueError:
        value = text
    for _ in range(3):  # {"error": {"message": ...}} and the like
        if isinstance(value, dict):
            value = next((value[k] for k in ("message", "error", "detail") if value.get(k)), value)
        elif isinstance(value, list) and value:  # FastAPI's detail: [{"msg": ...}, ...]
            first = value[0]
            value = first.get("msg", first) if isinstance(first, dict) else first
        else:
            break
    message = _CONTROL.sub(" ", value if isinstance(value, str) else jsonlib.dumps(value)).strip()
    return message if len(message) <= _MESSAGE_CHARS else message[: _MESSAGE_CHARS - 1] + "…"


_sessions: tuple[int, requests.Session] | None = None
_sessions_lock = threading.Lock()


def shared_session() -> requests.Session:
    """This process's shared session: keep-alive connections to upstreams, reused across streams.

    Made lazily and again after a fork (a pooled socket must not be shared by two processes).
    The pool keeps up to 1000 idle connections per upstream host: thousands of streams end and
    start again, and a smaller pool would close (and log) most connections it is handed back.
    It ignores the environment's proxy settings and ``~/.netrc`` (``trust_env`` off): an engine
    is on your own network, a proxy may buffer the stream, and reading them cost about 1 ms a
    request (measured). Pass your own session to :func:`open_stream` to have them.
    """
    global _sessions
    import requests
    from requests.adapters import HTTPAdapter

    with _sessions_lock:
        if _sessions is None or _sessions[0] != os.getpid():
            session = requests.Session()
            session.trust_env = False
            adapter = HTTPAdapter(pool_connections=16, pool_maxsize=1000)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            _sessions = (os.getpid(), session)
        return _sessions[1]


def open_stream(
    url: str,
    *,
    json: Any = None,
    data: bytes | str | None = None,
    headers: Mapping[str, str] | None = None,
    method: str = "POST",
    connect_timeout: float = CONNECT_TIMEOUT,
    silence_timeout: float = SILENCE_TIMEOUT,
    session: requests.Session | None = None,
) -> requests.Response:
    """Ask ``url`` for an event stream with ``requests``; return the response, ready to relay.

    Sends ``json`` (or ``data``) with ``Accept: text/event-stream`` and ``Accept-Encoding:
    identity`` (a relayed stream gains nothing from compression, and loses latency) plus
    ``headers``. Gives up connecting after ``connect_timeout`` s and waiting for any byte after
    ``silence_timeout`` s, and under gevent on an upstream whose response headers (and a
    refusal's message) are not all there ``connect_timeout + silence_timeout`` s after the call,
    however steadily they trickle in; its connection is then closed. ``session`` defaults to a
    shared one per process (keep-alive connections, no proxy from the environment: see
    :func:`shared_session`). Needs ``requests`` (``pip install 'flask-sse-run[relay]'``).

    Raises :class:`~flask_sse_run.errors.UpstreamError`: 503 when the upstream cannot be reached,
    504 when it does not answer (or finish its headers) in time, and :func:`check_response`'s
    errors. Call it in the function body, before returning the stream, and these are JSON
    errors, not error events.
    """
    import requests

    sent = {"Accept": "text/event-stream", "Accept-Encoding": "identity", "Cache-Control": "no-cache"}
    sent.update(headers or {})
    deadline = connect_timeout + silence_timeout
    try:
        with _answer_deadline(deadline):
            response = (session or shared_session()).request(
                method,
                url,
                json=json,
                data=data,
                headers=sent,
                stream=True,
                timeout=(connect_timeout, silence_timeout),
            )
            check_response(response)  # a refusal's body is read within the deadline too
    except _AnswerLate:
        raise UpstreamError(
            504, f"the upstream did not send its response headers within {deadline:g} s"
        ) from None
    except requests.ConnectTimeout as exc:
        raise UpstreamError(
            503, f"the upstream did not accept a connection within {connect_timeout:g} s"
        ) from exc
    except requests.ReadTimeout as exc:
        raise UpstreamError(504, f"the upstream did not answer within {silence_timeout:g} s") from exc
    except requests.ConnectionError as exc:
        raise UpstreamError(503, f"the upstream is unreachable ({_root_name(exc)})") from exc
    except requests.RequestException as exc:
        raise UpstreamError(502, f"the upstream request failed ({_root_name(exc)})") from exc
    return response


class _AnswerLate(Exception):
    """The upstream's answer (its headers, a refusal's body) took longer than the deadline."""


@contextlib.contextmanager
def _answer_deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`_AnswerLate` in this greenlet ``seconds`` from now, under gevent.

    requests' read timeout bounds each wait for a byte, not the whole: an upstream that sent a
    header line every 0.5 s held a request for 50 s (http.client's limit of 100 header lines)
    despite a 5 s timeout, and one 4 KiB refusal body a byte at a time would take 34 minutes.
    Under gevent the interrupted read leaves urllib3 with an exception, and it closes the
    connection. Elsewhere (a thread per request) nothing can interrupt the read: the read
    timeout alone bounds each wait.
    """
    from .concurrency import gevent_patched

    if not gevent_patched():
        yield
        return
    import gevent

    with gevent.Timeout(seconds, _AnswerLate):
        yield
