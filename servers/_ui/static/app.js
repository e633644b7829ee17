// The trio-jobs dashboard: plain JavaScript, no framework, no build step.
//
// Rules this file keeps:
// - every value from the server is rendered as text (textContent, Text nodes), never as
//   HTML: a narration of "<script>" shows as those characters;
// - the bearer token lives in this tab's sessionStorage and travels only in an
//   Authorization header (never in a URL, a cookie or a log line); requests go to this
//   origin only, with JSON bodies, so they pass the server's cross-site rules;
// - a job's stream is read with fetch (EventSource cannot send the header) and parsed as
//   the WHATWG event-stream format; after a drop it resumes with Last-Event-ID, and
//   events are de-duplicated by id anyway;
// - polling is polite: one request in flight per view, slower while the tab is hidden.
"use strict";

(() => {
  const TOKEN_KEY = "trio-jobs-token";
  const FILTERS = ["state", "tag", "operation", "since", "until", "limit", "order"];
  const MAX_LOG_LINES = 5000;
  const TERMINAL = new Set(["completed", "failed", "cancelled"]);
  const STATE_COLOURS = { completed: "#2e7d32", failed: "#c62828", cancelled: "#8d6e63" };

  const $ = (id) => document.getElementById(id);

  /** An element with properties and children (strings become Text nodes). */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else node[key] = value;
    }
    for (const child of children) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  const ui = {
    stops: [],
    follower: null,
    pageStack: [],
    lastStates: new Map(),
    view: null,
    errors: [], // every error the page showed, newest last
  };
  window.trioJobsUi = ui; // for debugging from the console (and the browser tests)

  // ---- HTTP ----------------------------------------------------------------------------

  class HttpError extends Error {
    constructor(status, body) {
      const detail = body && typeof body === "object" ? body.detail || body.error : body;
      super(`HTTP ${status}` + (detail ? `: ${typeof detail === "string" ? detail : JSON.stringify(detail)}` : ""));
      this.status = status;
      this.body = body;
    }
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function authHeaders(extra) {
    const headers = Object.assign({}, extra);
    const value = token();
    if (value) headers.Authorization = "Bearer " + value;
    return headers;
  }

  async function api(path, options = {}) {
    const init = {
      method: options.method || "GET",
      headers: authHeaders({ Accept: "application/json" }),
      cache: "no-store",
      credentials: "omit",
    };
    if (options.body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.body);
    }
    const response = await fetch(path, init);
    const text = await response.text();
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (_) {
        data = text;
      }
    }
    if (response.status === 401) {
      needSignIn(refusal(data));
      throw new HttpError(401, data);
    }
    if (!response.ok) throw new HttpError(response.status, data);
    return data;
  }

  function showError(error) {
    const box = $("error");
    if (!error) {
      box.hidden = true;
      return;
    }
    box.textContent = error instanceof Error ? error.message : String(error);
    box.hidden = false;
    ui.errors.push(box.textContent);
  }

  /** Run ``fn`` now and then every ``ms`` (5x slower while hidden) until the view changes. */
  function every(ms, fn) {
    let stopped = false;
    let timer = null;
    let failing = false;
    const tick = async () => {
      if (stopped) return;
      try {
        await fn();
        if (failing && !stopped) showError(null); // the server answers again
        failing = false;
      } catch (error) {
        if (!(error instanceof HttpError && error.status === 401) && !stopped) {
          showError(error);
          failing = true;
        }
      }
      if (!stopped) timer = setTimeout(tick, document.hidden ? ms * 5 : ms);
    };
    const stop = () => {
      stopped = true;
      clearTimeout(timer);
    };
    ui.stops.push(stop);
    tick();
    return stop;
  }

  function stopView() {
    for (const stop of ui.stops.splice(0)) stop();
    if (ui.follower) ui.follower.stop();
    ui.follower = null;
  }

  // ---- formatting -----------------------------------------------------------------------

  function fmtTime(iso) {
    if (!iso) return "";
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return String(iso);
    const sameDay = date.toDateString() === new Date().toDateString();
    const time = date.toLocaleTimeString([], { hour12: false });
    return sameDay ? time : `${date.toLocaleDateString()} ${time}`;
  }

  function timeCell(iso) {
    return el("td", { title: iso || "" }, el("time", { dateTime: iso || "" }, fmtTime(iso)));
  }

  function stateBadge(state) {
    return el("span", { class: `state state-${state}` }, state);
  }

  function operationOf(record) {
    const payload = record.payload;
    return payload && typeof payload === "object" && !Array.isArray(payload) ? payload.operation || "" : "";
  }

  function tagsText(tags) {
    return Object.entries(tags || {}).map(([k, v]) => `${k}:${v}`).join(" ");
  }

  // ---- sign-in --------------------------------------------------------------------------

  function show(viewId) {
    for (const section of document.querySelectorAll("main > section")) {
      section.hidden = section.id !== viewId;
    }
    for (const link of document.querySelectorAll("header nav a")) {
      link.classList.toggle("active", `view-${link.id.slice(4)}` === viewId);
    }
    $("sign-out").hidden = !token();
  }

  /** What the sign-in form says after a 401: the server's own reason, when it gave one. */
  function refusal(body) {
    const detail = body && typeof body === "object" && typeof body.detail === "string" ? body.detail : "";
    if (!token()) return detail === "a bearer token is required" ? "" : detail;
    return `The server refused the token${detail ? ": " + detail : "."}`;
  }

  function needSignIn(message) {
    stopView();
    sessionStorage.removeItem(TOKEN_KEY);
    showError(null);
    show("view-signin");
    $("signin-error").textContent = message || "";
    $("token").focus();
  }

  async function signIn(event) {
    event.preventDefault();
    const input = $("token");
    const value = input.value.trim();
    input.value = "";
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    try {
      await api("/v1/jobs?limit=1");
    } catch (error) {
      if (!(error instanceof HttpError && error.status === 401)) showError(error);
      return;
    }
    $("signin-error").textContent = "";
    route();
  }

  function signOut() {
    sessionStorage.removeItem(TOKEN_KEY);
    needSignIn("Signed out.");
  }

  // ---- header counters (queue depth, running) --------------------------------------------

  async function pollHealth() {
    const response = await fetch("/health", { cache: "no-store", credentials: "omit" });
    const body = await response.json();
    $("queued").textContent = String(body.queued ?? "–");
    $("running").textContent = String(body.running ?? "–");
    $("server-name").textContent = `trio-jobs ${body.name || ""}`.trim();
    const health = $("health");
    health.textContent = body.status === "ok" ? "" : String(body.status);
    health.className = body.status === "ok" ? "health" : "health bad";
  }

  function startHealth() {
    let timer = null;
    const tick = async () => {
      try {
        await pollHealth();
      } catch (_) {
        $("health").textContent = "unreachable";
        $("health").className = "health bad";
      }
      timer = setTimeout(tick, document.hidden ? 5000 : 1000);
    };
    tick();
    return () => clearTimeout(timer);
  }

  // ---- routing ------------------------------------------------------------------------------

  function parseHash() {
    const hash = location.hash.replace(/^#/, "") || "/jobs";
    const [path, query] = hash.split("?");
    return { parts: path.split("/").filter(Boolean), params: new URLSearchParams(query || "") };
  }

  function route() {
    stopView();
    showError(null);
    const { parts, params } = parseHash();
    if (parts[0] === "job" && parts[1]) showJob(decodeURIComponent(parts[1]));
    else if (parts[0] === "cluster") showCluster();
    else if (parts[0] === "throughput") showThroughput();
    else showJobs(params);
  }

  // ---- jobs -------------------------------------------------------------------------------

  function localIso(value) {
    if (!value) return "";
    const date = new Date(value); // datetime-local: the browser's time zone
    return Number.isNaN(date.getTime()) ? "" : date.toISOString();
  }

  function jobsHash(params) {
    const query = new URLSearchParams();
    for (const [key, value] of params) if (value) query.set(key, value);
    const text = query.toString();
    return "#/jobs" + (text ? "?" + text : "");
  }

  function filtersFromForm() {
    const form = $("filters");
    const params = new URLSearchParams();
    for (const name of FILTERS) {
      const value = form.elements[name].value.trim();
      if (value && !(name === "limit" && value === "50") && !(name === "order" && value === "desc")) {
        params.set(name, value);
      }
    }
    return params;
  }

  /** The tag filter's ``key:value`` words (several: a job must have them all). */
  function tagsOf(params) {
    return (params.get("tag") || "").split(/[\s,]+/).filter(Boolean);
  }

  /** Filters the server does not apply itself (a server without pagination ignores them). */
  function filterLocally(jobs, params) {
    const operation = params.get("operation");
    const tags = tagsOf(params).map((tag) => {
      const at = tag.indexOf(":");
      return [tag.slice(0, at), tag.slice(at + 1)];
    });
    const since = params.get("since") ? new Date(params.get("since")).getTime() : null;
    const until = params.get("until") ? new Date(params.get("until")).getTime() : null;
    const order = params.get("order") === "asc" ? 1 : -1;
    return jobs
      .filter((job) => !operation || operationOf(job) === operation)
      .filter((job) => tags.every(([key, value]) => (job.tags || {})[key] === value))
      .filter((job) => since === null || new Date(job.created_at).getTime() >= since)
      .filter((job) => until === null || new Date(job.created_at).getTime() < until)
      .sort((a, b) => order * (new Date(a.created_at) - new Date(b.created_at)));
  }

  function showJobs(params) {
    show("view-jobs");
    const form = $("filters");
    for (const name of FILTERS) {
      form.elements[name].value = params.get(name) || (name === "limit" ? "50" : name === "order" ? "desc" : "");
    }
    if (!params.get("cursor")) ui.pageStack = [];
    every(1000, () => loadJobs(params));
  }

  async function loadJobs(params) {
    const query = new URLSearchParams();
    for (const name of ["state", "operation", "cursor"]) {
      if (params.get(name)) query.set(name, params.get(name));
    }
    for (const tag of tagsOf(params)) query.append("tag", tag);
    query.set("order", params.get("order") === "asc" ? "asc" : "desc");
    for (const name of ["since", "until"]) {
      if (params.get(name)) query.set(name, localIso(params.get(name)));
    }
    const limit = Number(params.get("limit") || 50);
    query.set("limit", String(limit));
    const data = await api("/v1/jobs?" + query.toString());
    const paged = data && Object.prototype.hasOwnProperty.call(data, "next_cursor");
    let jobs = data.jobs || [];
    let more = paged ? data.next_cursor : null;
    let info = "";
    if (!paged) {
      // An older server: every matching job at once. Filter, order and cut here.
      jobs = filterLocally(jobs, params);
      info = jobs.length > limit ? `showing ${limit} of ${jobs.length}` : "";
      jobs = jobs.slice(0, limit);
    }
    renderJobs(jobs);
    $("page-next").disabled = !more;
    $("page-next").dataset.cursor = more || "";
    $("page-prev").disabled = !params.get("cursor");
    $("page-first").disabled = !params.get("cursor");
    $("page-info").textContent = info || `${jobs.length} job(s) on this page`;
  }

  function renderJobs(jobs) {
    const body = $("jobs").tBodies[0];
    const rows = new Map();
    for (const row of body.rows) rows.set(row.dataset.jobId, row);
    const seen = new Set();
    let before = body.firstChild;
    for (const job of jobs) {
      seen.add(job.job_id);
      const previous = ui.lastStates.get(job.job_id);
      let row = rows.get(job.job_id);
      const key = JSON.stringify([job.state, job.finished_at, job.attempts, job.error, job.tags]);
      if (!row || row.dataset.key !== key) {
        const fresh = jobRow(job);
        if (row) {
          if (before === row) before = fresh;
          row.replaceWith(fresh);
        }
        row = fresh;
        if (previous && previous !== job.state) {
          row.classList.add("changed");
          setTimeout(() => row.classList.remove("changed"), 1500);
        }
      }
      ui.lastStates.set(job.job_id, job.state);
      if (row !== before) body.insertBefore(row, before);
      before = row.nextSibling;
    }
    for (const [id, row] of rows) if (!seen.has(id)) row.remove();
    $("jobs-empty").hidden = jobs.length > 0;
  }

  function jobRow(job) {
    const link = el("a", { href: "#/job/" + encodeURIComponent(job.job_id) }, job.job_id);
    const row = el(
      "tr",
      {},
      el("td", { class: "id" }, link),
      el("td", {}, stateBadge(job.state)),
      el("td", {}, operationOf(job)),
      el("td", { class: "tags" }, tagsText(job.tags)),
      timeCell(job.created_at),
      timeCell(job.finished_at),
      el("td", { class: "num" }, job.attempts),
      el("td", { class: "err", title: job.error || "" }, job.error || ""),
    );
    row.dataset.jobId = job.job_id;
    row.dataset.state = job.state;
    row.dataset.key = JSON.stringify([job.state, job.finished_at, job.attempts, job.error, job.tags]);
    return row;
  }

  // ---- one job: the stream reader ------------------------------------------------------------

  /**
   * Reads /v1/jobs/{id}/stream with fetch, as an EventSource would (WHATWG parsing,
   * the server's retry delay, Last-Event-ID on reconnect, stop on 204 or the signal).
   */
  class Follower {
    constructor(jobId, handlers) {
      this.url = `/v1/jobs/${encodeURIComponent(jobId)}/stream`;
      this.handlers = handlers;
      this.lastId = null; // the last id field received: the resume point
      this.maxEventId = 0; // the highest event id shown: events at or below are duplicates
      this.retryMs = 2000;
      this.ended = false;
      this.stopped = false;
      this.controller = null;
      this.connects = 0;
    }

    stop() {
      this.stopped = true;
      if (this.controller) this.controller.abort();
    }

    /** Drop the connection as a network failure would (it reconnects). */
    interrupt() {
      if (this.controller) this.controller.abort();
    }

    async run() {
      while (!this.ended && !this.stopped) {
        this.controller = new AbortController();
        const headers = authHeaders({ Accept: "text/event-stream" });
        if (this.lastId !== null) headers["Last-Event-ID"] = this.lastId;
        try {
          this.handlers.status(this.connects ? "reconnecting…" : "connecting…");
          const response = await fetch(this.url, {
            headers,
            cache: "no-store",
            credentials: "omit",
            signal: this.controller.signal,
          });
          this.connects += 1;
          if (response.status === 204) {
            this.ended = true; // we had the signal already
            break;
          }
          if (response.status === 401) {
            needSignIn(refusal(await response.json().catch(() => null)));
            return;
          }
          if (!response.ok || !response.body) {
            const text = await response.text();
            throw new HttpError(response.status, text);
          }
          this.handlers.status("live");
          await this.read(response.body);
        } catch (error) {
          if (this.stopped) return;
          if (error instanceof HttpError && error.status < 500 && error.status !== 429) {
            this.handlers.status(error.message);
            return;
          }
        }
        if (!this.ended && !this.stopped) {
          this.handlers.status("connection lost, reconnecting…");
          await new Promise((resolve) => setTimeout(resolve, this.retryMs));
        }
      }
      if (!this.stopped) this.handlers.status("ended");
    }

    async read(body) {
      const reader = body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let data = [];
      let id = null;
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) return;
          buffer += value;
          for (;;) {
            const match = /\r\n|\r|\n/.exec(buffer);
            if (!match) break;
            // A lone \r at the end may be the first half of \r\n: wait for more.
            if (match[0] === "\r" && match.index === buffer.length - 1) break;
            const line = buffer.slice(0, match.index);
            buffer = buffer.slice(match.index + match[0].length);
            if (line === "") {
              if (data.length) this.dispatch(data.join("\n"), id);
              data = [];
              id = null;
              continue; // after the signal the server ends the body: read to its end
            }
            if (line.startsWith(":")) continue;
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            let value_ = colon < 0 ? "" : line.slice(colon + 1);
            if (value_.startsWith(" ")) value_ = value_.slice(1);
            if (field === "data") data.push(value_);
            else if (field === "id" && !value_.includes("\0")) {
              id = value_;
              this.lastId = value_;
            } else if (field === "retry" && /^\d+$/.test(value_)) this.retryMs = Number(value_);
          }
        }
      } finally {
        reader.cancel().catch(() => {});
      }
    }

    dispatch(data, id) {
      const signal = /^\[(DONE|ERROR|CANCELLED)\](?: ([\s\S]*))?$/.exec(data);
      if (signal) {
        this.ended = true;
        this.handlers.signal(signal[1], signal[2] ?? null, id);
        return;
      }
      let event;
      try {
        event = JSON.parse(data);
      } catch (_) {
        return;
      }
      if (!event || typeof event !== "object") return;
      const eventId = Number(event.id ?? id);
      if (Number.isFinite(eventId)) {
        if (eventId <= this.maxEventId) return; // a duplicate after a resume
        this.maxEventId = eventId;
      }
      this.handlers.event(event);
    }
  }

  // ---- one job: the page ------------------------------------------------------------------

  function showJob(jobId) {
    show("view-job");
    const view = { jobId, record: null, history: [], signal: null, outText: null, dropped: 0 };
    $("job-log-note").hidden = true;
    ui.view = view;
    $("job-id").textContent = jobId;
    $("job-state").textContent = "";
    $("job-state").className = "state";
    $("job-action").textContent = "";
    $("stream-status").textContent = "";
    for (const id of ["job-progress", "job-log", "job-record", "job-payload", "job-history"]) clear($(id));
    const output = clear($("job-output"));
    output.hidden = true;
    view.outText = document.createTextNode("");
    output.append(view.outText);
    const end = $("job-end");
    end.hidden = true;
    end.className = "end";
    $("job-cancel").disabled = true;
    $("job-retry").disabled = true;

    const refresh = async () => {
      const path = `/v1/jobs/${encodeURIComponent(jobId)}`;
      const [record, history] = await Promise.all([api(path), api(path + "/history")]);
      if (ui.view !== view) return;
      view.record = record;
      view.history = history.history || [];
      renderRecord(view);
      renderHistory(view);
      renderEnd(view);
      if (TERMINAL.has(record.state) && view.signal) stopRefresh();
    };
    const stopRefresh = every(1000, refresh);

    const follower = new Follower(jobId, {
      status: (text) => {
        $("stream-status").textContent = text ? `(${text})` : "";
      },
      event: (event) => renderEvent(view, event),
      signal: (kind, message, id) => {
        view.signal = { kind, message, id };
        renderEnd(view);
        refresh().catch(() => {});
      },
    });
    ui.follower = follower;
    follower.run();
  }

  function renderEvent(view, event) {
    if (event.action === "token" && (typeof event.token === "string" || typeof event.human === "string")) {
      $("job-output").hidden = false;
      view.outText.appendData(typeof event.token === "string" ? event.token : event.human);
      return;
    }
    const progress = event.progress;
    if (progress && typeof progress === "object" && !Array.isArray(progress)) {
      renderProgress(event, progress);
      return;
    }
    const log = $("job-log");
    if (log.children.length >= MAX_LOG_LINES) {
      log.firstChild.remove();
      view.dropped += 1;
      $("job-log-note").textContent = `${view.dropped} earlier line(s) not shown`;
      $("job-log-note").hidden = false;
    }
    log.append(
      el(
        "li",
        { title: JSON.stringify(event) },
        el("time", { dateTime: event.ts || "" }, fmtTime(event.ts)),
        " ",
        el("span", { class: "actor" }, event.actor ?? ""),
        " ",
        el("span", { class: "action" }, event.action ?? ""),
        " ",
        el("span", { class: "human" }, event.human ?? ""),
      ),
    );
    log.lastChild.dataset.eventId = String(event.id);
  }

  function renderProgress(event, progress) {
    const key = String(event.action ?? "progress");
    const box = $("job-progress");
    let row = [...box.children].find((child) => child.dataset.key === key);
    if (!row) {
      row = el("div", { class: "bar" }, el("span", { class: "label" }), el("progress"), el("span", { class: "figures" }));
      row.dataset.key = key;
      box.append(row);
    }
    const [label, bar, figures] = row.children;
    const done = Number(progress.done) || 0;
    const total = Number(progress.total);
    const unit = progress.unit ? ` ${progress.unit}` : "";
    label.textContent = event.human || key;
    if (Number.isFinite(total) && total > 0) {
      bar.max = total;
      bar.value = Math.min(done, total);
      figures.textContent = `${done}/${total}${unit} (${Math.floor((100 * Math.min(done, total)) / total)}%)`;
    } else {
      bar.removeAttribute("value"); // indeterminate
      figures.textContent = `${done}${unit}`;
    }
    row.dataset.done = String(done);
  }

  function renderEnd(view) {
    const record = view.record;
    const end = $("job-end");
    const signal = view.signal;
    const state = record ? record.state : null;
    if (!signal && !(state && TERMINAL.has(state))) return;
    const kind = signal ? signal.kind : { completed: "DONE", failed: "ERROR", cancelled: "CANCELLED" }[state];
    clear(end);
    end.className = `end end-${kind.toLowerCase()}`;
    end.append(el("strong", {}, `[${kind}]`));
    if (kind === "ERROR") {
      const message = (signal && signal.message) || (record && record.error) || "";
      end.append(" ", el("span", { class: "message" }, message));
    } else if (kind === "CANCELLED") {
      const last = [...view.history].reverse().find((entry) => entry.state === "cancelled");
      const who = record && (record.cancelled_by || record.canceller);
      const why = (record && record.cancel_reason) || (last && last.reason);
      if (who) end.append(" by ", el("span", { class: "who" }, who));
      if (why) end.append(" — ", el("span", { class: "message" }, why));
    } else {
      end.append(" completed");
    }
    end.dataset.kind = kind;
    end.hidden = false;
  }

  function renderRecord(view) {
    const record = view.record;
    const state = $("job-state");
    state.textContent = record.state;
    state.className = `state state-${record.state}`;
    const dl = clear($("job-record"));
    const rows = [
      ["state", record.state],
      ["operation", operationOf(record)],
      ["priority", record.priority],
      ["attempts", record.attempts],
      ["timeout", record.timeout_s == null ? "" : `${record.timeout_s} s`],
      ["created", fmtTime(record.created_at)],
      ["started", fmtTime(record.started_at)],
      ["finished", fmtTime(record.finished_at)],
      ["next attempt", fmtTime(record.next_attempt_at)],
      ["tags", tagsText(record.tags)],
      ["error", record.error || ""],
    ];
    for (const key of ["node", "owner", "cancelled_by", "cancel_reason"]) {
      if (record[key] != null) rows.push([key.replace("_", " "), typeof record[key] === "string" ? record[key] : JSON.stringify(record[key])]);
    }
    for (const [name, value] of rows) {
      if (value === "" || value === null || value === undefined) continue;
      dl.append(el("dt", {}, name), el("dd", {}, value));
    }
    if (record.metadata != null) dl.append(el("dt", {}, "metadata"), el("dd", {}, JSON.stringify(record.metadata)));
    $("job-payload").textContent = JSON.stringify(record.payload, null, 2);
    $("job-cancel").disabled = TERMINAL.has(record.state);
    const payload = record.payload;
    $("job-retry").disabled = !(payload && typeof payload === "object" && !Array.isArray(payload));
  }

  function renderHistory(view) {
    const list = clear($("job-history"));
    for (const entry of view.history) {
      list.append(
        el(
          "li",
          { class: `entry entry-${entry.state}` },
          el("time", { dateTime: entry.at || "", title: entry.at || "" }, fmtTime(entry.at)),
          " ",
          stateBadge(entry.state),
          entry.reason ? el("span", { class: "reason" }, " " + entry.reason) : null,
        ),
      );
    }
  }

  async function cancelJob() {
    const view = ui.view;
    if (!view || !view.jobId) return;
    $("job-cancel").disabled = true;
    $("job-action").textContent = "cancelling…";
    try {
      const record = await api(`/v1/jobs/${encodeURIComponent(view.jobId)}`, { method: "DELETE" });
      $("job-action").textContent = `cancel requested: ${record.state}`;
    } catch (error) {
      $("job-action").textContent = error.message;
    }
  }

  /** The same payload and options again, as a new job. */
  function retryBody(record) {
    const body = Object.assign({}, record.payload);
    if (record.timeout_s != null) body.timeout_s = record.timeout_s;
    if (record.priority) body.priority = record.priority;
    if (record.tags && Object.keys(record.tags).length) body.tags = record.tags;
    if (record.metadata != null) body.metadata = record.metadata;
    if (record.retry) body.retry = record.retry;
    return body;
  }

  async function retryJob() {
    const view = ui.view;
    if (!view || !view.record) return;
    $("job-retry").disabled = true;
    $("job-action").textContent = "submitting…";
    try {
      const created = await api("/v1/jobs", { method: "POST", body: retryBody(view.record) });
      location.hash = "#/job/" + encodeURIComponent(created.job_id);
    } catch (error) {
      $("job-action").textContent = error.message;
      $("job-retry").disabled = false;
    }
  }

  // ---- cluster --------------------------------------------------------------------------------

  function showCluster() {
    show("view-cluster");
    every(1000, loadCluster);
  }

  async function optional(path) {
    try {
      return await api(path);
    } catch (error) {
      if (error instanceof HttpError && (error.status === 404 || error.status === 405)) return null;
      throw error;
    }
  }

  async function loadCluster() {
    const [workers, probed] = await Promise.all([optional("/v1/workers"), optional("/ui/hives")]);
    const hives = probed || (await optional("/v1/hives"));
    const wbody = clear($("workers").tBodies[0]);
    $("workers-note").hidden = workers !== null;
    $("workers-note").textContent = "This daemon keeps no worker table (workers heartbeat to the queen).";
    for (const worker of (workers && workers.workers) || []) {
      const age = Number(worker.seen_s_ago);
      const row = el(
        "tr",
        {},
        el("td", { class: "id" }, worker.worker_id),
        el("td", {}, worker.model),
        el("td", {}, stateBadge(worker.state)),
        el("td", { class: "num" }, worker.running),
        el("td", { class: "num" }, Number.isFinite(age) ? `${age.toFixed(1)} s` : ""),
        el("td", {}, worker.hive_id ?? ""),
        el("td", { class: "url" }, worker.url),
      );
      row.dataset.workerId = worker.worker_id;
      wbody.append(row);
    }
    const hbody = clear($("hives").tBodies[0]);
    $("hives-note").hidden = hives !== null;
    $("hives-note").textContent = "This daemon keeps no hive table.";
    for (const hive of (hives && hives.hives) || []) {
      const probedHive = "reachable" in hive;
      const health = hive.health || {};
      const status = !probedHive ? "unknown" : hive.reachable ? health.status || "up" : "down";
      const row = el(
        "tr",
        {},
        el("td", { class: "id" }, hive.alias),
        el("td", { class: "url" }, hive.url),
        el("td", {}, el("span", { class: `health-${status === "ok" || status === "up" ? "ok" : status === "unknown" ? "unknown" : "bad"}` }, status)),
        el("td", { class: "num" }, health.jobs ?? ""),
        el("td", { class: "num" }, health.running ?? ""),
        el("td", { class: "err" }, hive.error || ""),
      );
      row.dataset.alias = hive.alias;
      hbody.append(row);
    }
  }

  // ---- throughput -----------------------------------------------------------------------------

  function showThroughput() {
    show("view-throughput");
    every(5000, loadThroughput);
  }

  async function loadThroughput() {
    const data = await api("/ui/throughput");
    drawThroughput(data);
  }

  function drawThroughput(data) {
    const samples = data.samples || [];
    const states = ["completed", "failed", "cancelled"];
    for (const sample of samples) {
      for (const state of Object.keys(sample.counts || {})) if (!states.includes(state)) states.push(state);
    }
    const bins = [];
    for (let i = 1; i < samples.length; i++) {
      const a = samples[i - 1];
      const b = samples[i];
      const counts = {};
      for (const state of states) {
        counts[state] = Math.max(0, (b.counts[state] || 0) - (a.counts[state] || 0));
      }
      bins.push({ from: a.at, to: b.at, counts });
    }
    const canvas = $("throughput");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 900;
    const height = canvas.clientHeight || 260;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const left = 40;
    const bottom = height - 24;
    const top = 10;
    const right = width - 10;
    const peak = Math.max(1, ...bins.map((bin) => states.reduce((sum, s) => sum + bin.counts[s], 0)));
    const start = samples.length ? samples[0].at : 0;
    const stop = samples.length ? samples[samples.length - 1].at : 1;
    const span = Math.max(1, stop - start);
    const x = (t) => left + ((t - start) / span) * (right - left);
    const y = (n) => bottom - (n / peak) * (bottom - top);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#666";
    ctx.strokeStyle = "#ddd";
    ctx.lineWidth = 1;
    for (const n of [0, peak / 2, peak]) {
      ctx.beginPath();
      ctx.moveTo(left, y(n) + 0.5);
      ctx.lineTo(right, y(n) + 0.5);
      ctx.stroke();
      ctx.fillText(String(Math.round(n * 10) / 10), 4, y(n) + 4);
    }
    for (let t = Math.ceil(start / 60) * 60; t <= stop; t += 60) {
      const label = new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false });
      ctx.fillText(label, x(t) - 14, height - 8);
    }
    for (const bin of bins) {
      let base = 0;
      const x0 = x(bin.from) + 1;
      const w = Math.max(1, x(bin.to) - x(bin.from) - 2);
      for (const state of states) {
        const n = bin.counts[state];
        if (!n) continue;
        ctx.fillStyle = STATE_COLOURS[state] || "#1565c0";
        ctx.fillRect(x0, y(base + n), w, y(base) - y(base + n));
        base += n;
      }
    }
    const minutes = Math.round(span / 60);
    $("throughput-span").textContent = samples.length > 1
      ? `(last ${minutes >= 1 ? minutes + " min" : Math.round(span) + " s"}, per ${data.interval_s} s)`
      : "(collecting…)";
    const legend = clear($("throughput-legend"));
    for (const state of states) {
      const swatch = el("span", { class: `swatch state-${state}` });
      legend.append(swatch, ` ${state} `);
    }
    const body = clear($("throughput-totals").tBodies[0]);
    const last = samples[samples.length - 1];
    for (const state of states) {
      const inWindow = bins.reduce((sum, bin) => sum + bin.counts[state], 0);
      const row = el("tr", {}, el("td", {}, stateBadge(state)), el("td", { class: "num" }, inWindow), el("td", { class: "num" }, last ? last.counts[state] || 0 : 0));
      row.dataset.state = state;
      body.append(row);
    }
    canvas.dataset.bins = String(bins.length);
  }

  // ---- start ----------------------------------------------------------------------------------

  function start() {
    $("signin-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", signOut);
    $("filters").addEventListener("submit", (event) => {
      event.preventDefault();
      location.hash = jobsHash(filtersFromForm());
    });
    $("filters").addEventListener("change", () => {
      location.hash = jobsHash(filtersFromForm());
    });
    $("filters-clear").addEventListener("click", () => {
      location.hash = "#/jobs";
    });
    $("page-next").addEventListener("click", () => {
      const { params } = parseHash();
      ui.pageStack.push(params.get("cursor") || "");
      params.set("cursor", $("page-next").dataset.cursor);
      location.hash = jobsHash(params);
    });
    $("page-prev").addEventListener("click", () => {
      const { params } = parseHash();
      params.set("cursor", ui.pageStack.pop() || "");
      location.hash = jobsHash(params);
    });
    $("page-first").addEventListener("click", () => {
      const { params } = parseHash();
      params.delete("cursor");
      ui.pageStack = [];
      location.hash = jobsHash(params);
    });
    $("job-cancel").addEventListener("click", cancelJob);
    $("job-retry").addEventListener("click", retryJob);
    window.addEventListener("hashchange", route);
    startHealth();
    route();
  }

  start();
})();
