"use strict";
// The example page: stream a function with EventSource and show each event as it arrives, and
// follow a channel that anyone may publish on. No framework and no build step. Every URL is relative to the page, so the app may be
// mounted under a path behind a proxy.

const $ = (id) => document.getElementById(id);

const STATE_TEXT = {
  idle: "idle",
  connecting: "connecting…",
  open: "open",
  reconnecting: "reconnecting…",
  finished: "finished",
  failed: "failed",
  stopped: "stopped",
};

// "<run_id>:<seq>" (the server's event ids), or null for any other id.
function parseId(id) {
  const match = /^([0-9a-f]{32}):([0-9]+)$/.exec(id);
  return match ? { run: match[1], seq: Number(match[2]) } : null;
}

// "1–4, 6" from [1, 2, 3, 4, 6].
function ranges(numbers) {
  const parts = [];
  for (let i = 0; i < numbers.length; ) {
    let j = i;
    while (j + 1 < numbers.length && numbers[j + 1] === numbers[j] + 1) j++;
    parts.push(i === j ? `${numbers[i]}` : `${numbers[i]}–${numbers[j]}`);
    i = j + 1;
  }
  return parts.join(", ");
}

// What the ids seen say: which run, which seqs, and whether each came once and in order.
function describeIds(ids) {
  if (ids.length === 0) return "none yet";
  const parsed = ids.map(parseId);
  if (parsed.some((p) => p === null)) return "the stream has no run ids (not resumable)";
  const runs = new Set(parsed.map((p) => p.run));
  const seqs = parsed.map((p) => p.seq);
  const inOrder = seqs.every((seq, i) => seq === i + 1);
  const run = runs.size === 1 ? `run ${parsed[0].run.slice(0, 8)}…` : `${runs.size} different runs!`;
  const verdict = inOrder ? "each once, in order" : "repeated or out of order!";
  return `${run} #${ranges(seqs)} (${verdict})`;
}

// One EventSource at a time, with its state, event count, reconnects and ids on the page.
class Stream {
  constructor(prefix, base, { onEvent, onReset }) {
    this.prefix = prefix; // of the elements' ids: "run" or "falcon"
    this.base = base; // of the URLs: "" or "falcon/"
    this.onEvent = onEvent;
    this.onReset = onReset;
    this.source = null;
    $(`${prefix}-stop`).addEventListener("click", () => this.stop());
  }

  start(url) {
    this.close();
    this.attempt = (this.attempt || 0) + 1;
    this.count = 0;
    this.reconnects = 0;
    this.ids = [];
    this.opened = false;
    this.started = performance.now();
    this.onReset();
    this.show();
    this.setState("connecting");
    $(`${this.prefix}-start`).disabled = true;
    $(`${this.prefix}-stop`).disabled = false;

    const source = new EventSource(url);
    this.source = source;
    source.onopen = () => {
      // Counted when the server takes the reconnect: the one after the last event gets 204,
      // never opens, and is the end, not a cut.
      if (this.opened) this.reconnects += 1;
      this.opened = true;
      this.show();
      this.setState("open");
    };
    source.onmessage = (event) => {
      this.count += 1;
      if (event.lastEventId) this.ids.push(event.lastEventId);
      this.show();
      this.onEvent(event, (performance.now() - this.started) / 1000);
    };
    // Fired for the connection's errors, and also for an `event: error` the server sends (a
    // MessageEvent) when the function raised.
    source.addEventListener("error", (event) => {
      if (source !== this.source) return;
      if (event instanceof MessageEvent) {
        this.finish("failed", `the function failed: ${errorMessage(event.data)}`);
      } else if (source.readyState === EventSource.CONNECTING) {
        // Dropped, or the stream ended: the browser reconnects with Last-Event-ID by itself.
        this.setState("reconnecting");
      } else if (this.opened) {
        // CLOSED after a stream: the server answered 204, nothing is left to send.
        this.finish("finished");
      } else {
        this.finish("failed", "the server refused the stream");
        const attempt = this.attempt;
        refusalReason(url).then((reason) => {
          if (attempt === this.attempt && !this.source) this.setState("failed", reason);
        });
      }
    });
  }

  // The stream is over: close the EventSource so that it never reconnects again.
  finish(state, detail = "") {
    this.close();
    this.setState(state, detail);
  }

  // The user's Stop: close, and cancel the run on the server (it would go on without a client).
  stop() {
    const last = parseId(this.ids.length ? this.ids[this.ids.length - 1] : "");
    this.finish("stopped");
    if (last) {
      fetch(`${this.base}runs/${last.run}`, { method: "DELETE" })
        .then((response) => {
          if (response.status === 204) this.setState("stopped", "run cancelled on the server");
        })
        .catch(() => {});
    }
  }

  close() {
    if (this.source) this.source.close();
    this.source = null;
    $(`${this.prefix}-start`).disabled = false;
    $(`${this.prefix}-stop`).disabled = true;
  }

  setState(state, detail = "") {
    const element = $(`${this.prefix}-state`);
    element.dataset.state = state;
    element.textContent = detail ? `${STATE_TEXT[state]}: ${detail}` : STATE_TEXT[state];
  }

  show() {
    $(`${this.prefix}-count`).textContent = String(this.count);
    $(`${this.prefix}-reconnects`).textContent = String(this.reconnects);
    const ids = $(`${this.prefix}-ids`);
    ids.textContent = describeIds(this.ids);
    ids.dataset.ids = this.ids.join(" ");
  }
}

// EventSource never shows a refused response's body, so ask again, the same way, to read it.
// A refusal of the parameters is answered the same; a momentary one (busy) may now start the
// stream, which this request leaves at once: the run is then cancelled, as any left run is.
async function refusalReason(url) {
  const controller = new AbortController();
  try {
    const response = await fetch(url, {
      headers: { Accept: "text/event-stream" },
      signal: controller.signal,
    });
    if (response.status === 204) return "the server has nothing to stream (204)";
    if (response.ok) {
      controller.abort();
      return "the server refused the stream, then took it: try again";
    }
    return `${response.status}: ${refusalMessage(await response.json())}`;
  } catch {
    return "the server refused the stream";
  }
}

// The JSON error's words: each parameter's problem (422), or its message.
function refusalMessage(body) {
  const problems = Array.isArray(body.detail)
    ? body.detail.map((problem) => `${(problem.loc || []).join(".")}: ${problem.msg}`)
    : [];
  return problems.length ? problems.join("; ") : body.error || JSON.stringify(body);
}

// `text` in `element`, each `pip install ...` in it a <code> that the page keeps on one line:
// a command broken across lines is copied broken.
function showWithCommands(element, text) {
  const parts = text.split(/(pip install (?:-e )?'[^']*')/);
  element.replaceChildren(
    ...parts.map((part, i) => {
      if (i % 2 === 0) return document.createTextNode(part);
      const code = document.createElement("code");
      code.className = "command";
      code.textContent = part;
      return code;
    }),
  );
}

function errorMessage(data) {
  try {
    const body = JSON.parse(data);
    return body.message || body.type || data;
  } catch {
    return data;
  }
}

// `run`: one list item per event, with its seq and when it arrived.
function setUpRun() {
  const list = $("run-events");
  const stream = new Stream("run", "", {
    onReset: () => list.replaceChildren(),
    onEvent: (event, seconds) => {
      const item = document.createElement("li");
      item.dataset.id = event.lastEventId;
      const parsed = parseId(event.lastEventId);
      const seq = document.createElement("span");
      seq.className = "seq";
      seq.textContent = parsed ? `#${parsed.seq}` : "";
      const data = document.createElement("span");
      data.className = "data";
      data.textContent = event.data;
      const time = document.createElement("span");
      time.className = "time";
      time.textContent = `+${seconds.toFixed(2)} s`;
      item.append(seq, data, time);
      list.append(item);
    },
  });
  $("run-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const query = new URLSearchParams({ upper_range: $("run-upper-range").value });
    stream.start(`run?${query}`);
  });
}

// Falcon: the text pieces joined, then the finishing numbers. Offered only once
// /falcon/health says the model is ready.
function setUpFalcon() {
  const text = $("falcon-text");
  const summary = $("falcon-summary");
  const stream = new Stream("falcon", "falcon/", {
    onReset: () => {
      text.textContent = "";
      text.hidden = false;
      summary.hidden = true;
      $("falcon-status").hidden = false;
    },
    onEvent: (event) => {
      let body;
      try {
        body = JSON.parse(event.data);
      } catch {
        return;
      }
      if (typeof body.text === "string") text.textContent += body.text;
      if (body.finish_reason) {
        summary.hidden = false;
        summary.textContent =
          `finish_reason ${body.finish_reason}, ${body.generated_tokens} tokens, ` +
          `first token after ${body.time_to_first_token_ms} ms, ${body.tokens_per_s} tokens/s`;
        // The last event: closing now also keeps a stream that is not resumable from running
        // again when the browser would reconnect.
        stream.finish("finished");
      }
    },
  });
  $("falcon-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const query = new URLSearchParams({
      prompt: $("falcon-prompt").value,
      max_new_tokens: $("falcon-max-new-tokens").value,
    });
    stream.start(`falcon/run?${query}`);
  });
  checkFalcon();
}

function checkFalcon() {
  const note = $("falcon-health");
  const say = (status, message, again) => {
    note.dataset.status = status;
    showWithCommands(note, message);
    if (again) setTimeout(checkFalcon, 5000);
  };
  fetch("falcon/health", { headers: { Accept: "application/json" } })
    .then(async (response) => {
      if (response.status === 404) return say("absent", "This app has no Falcon endpoints.", false);
      const body = await response.json();
      if (body.status === "ready") {
        say("ready", `Ready: ${body.model} on ${body.device} (${body.dtype}).`, false);
        $("falcon-form").hidden = false;
      } else if (body.status === "loading") {
        say("loading", `Loading ${body.model} (${body.loading_seconds} s so far)…`, true);
      } else if (body.status === "failed") {
        say("failed", `The model failed to load: ${body.error}`, false);
      } else {
        say("disabled", `Off: ${body.message || body.status}`, false);
      }
    })
    .catch(() => say("unknown", "/falcon/health did not answer; trying again.", true));
}

// The notifications panel: one EventSource on the channel `notifications` for as long as the
// page is open. Each plain message is a list item with its seq (ids are "notifications:<seq>");
// a `missed` event (a reconnect after more events than the channel keeps) says how many went by.
// After a cut the browser reconnects by itself with the last id and gets what it missed.
function setUpNotifications() {
  const list = $("notifications-events");
  const state = $("notifications-state");
  let count = 0;
  const setState = (name, detail = "") => {
    state.dataset.state = name;
    state.textContent = detail ? `${STATE_TEXT[name]}: ${detail}` : STATE_TEXT[name];
  };
  const add = (event, text, className) => {
    count += 1;
    const item = document.createElement("li");
    item.dataset.id = event.lastEventId;
    if (className) item.className = className;
    const seq = document.createElement("span");
    seq.className = "seq";
    seq.textContent = `#${event.lastEventId.slice(event.lastEventId.lastIndexOf(":") + 1)}`;
    const data = document.createElement("span");
    data.className = "data";
    data.textContent = text;
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = new Date().toLocaleTimeString();
    item.append(seq, data, time);
    list.append(item);
    $("notifications-count").textContent = String(count);
    $("notifications-last-id").textContent = event.lastEventId;
  };

  const source = new EventSource("channels/notifications");
  source.onopen = () => setState("open");
  source.onmessage = (event) => add(event, event.data);
  source.addEventListener("missed", (event) => {
    const body = JSON.parse(event.data);
    add(event, `${body.missed} events missed: older than what the channel keeps`, "missed");
  });
  // The connection's errors, and the server's `event: error` (a MessageEvent: its store was
  // away too long), after which the stream ends and the browser reconnects.
  source.addEventListener("error", (event) => {
    if (event instanceof MessageEvent) {
      setState("reconnecting", errorMessage(event.data));
    } else if (source.readyState === EventSource.CONNECTING) {
      setState("reconnecting");
    } else {
      setState("failed", "the server refused the stream (reload the page to try again)");
    }
  });

  $("notify-form").addEventListener("submit", (event) => {
    event.preventDefault();
    publishNotification($("notify-message").value);
  });
}

// The button: POST /notify, the example app's function that publishes on the channel. Its id
// comes back in the answer; the event itself arrives through the EventSource, as on every page.
async function publishNotification(message) {
  const shown = $("notifications-published");
  shown.textContent = "publishing…";
  try {
    const response = await fetch("notify", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ message }),
    });
    const body = await response.json();
    shown.textContent = response.ok
      ? `as ${body.result}`
      : `refused: ${response.status}: ${refusalMessage(body)}`;
  } catch {
    shown.textContent = "the server did not answer";
  }
}

setUpRun();
setUpFalcon();
setUpNotifications();
