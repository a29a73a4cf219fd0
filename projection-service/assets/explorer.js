// bank-es explorer: a read-only view of the projection's read model. Plain JavaScript, no
// dependencies, no build step; it only calls this service's JSON routes. Views are chosen by
// the URL fragment:
//   #/                                  accounts (q, status, owner, after in the query part)
//   #/account/<id>[?version=N|as_of=T]  one account, its timeline and its state as of a moment
//   #/dead-letters                      the newest dead letters
"use strict";

(function () {
  const PAGE_SIZE = 25;
  const STATUS_EVERY_MS = 2000;
  const LONG_POLL_MS = 25000;

  // ---------------------------------------------------------------- small helpers

  /** Creates an element: h("td", {class: "num", dataset: {col: "x"}}, "text", child...). */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "dataset") Object.assign(el.dataset, value);
      else if (key === "class") el.className = value;
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else if (key === "text") el.textContent = value;
      else el.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  const SVG_NS = "http://www.w3.org/2000/svg";
  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") el.textContent = value;
      else el.setAttribute(key, value);
    }
    for (const child of children.flat()) if (child) el.append(child);
    return el;
  }

  /** An API error with the service's code and message. */
  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  /** GET a JSON route; throws ApiError with the service's message (or a network message). */
  // With HTTP_API_KEYS_FILE the data routes need a key: asked for on the first 401 and kept
  // for this tab only (sessionStorage), never in the page's address or in localStorage.
  const KEY_ITEM = "bank-es.api-key";
  let keyDeclined = false; // asked once and cancelled: the 401s are shown, not asked again

  async function api(path, signal, asked) {
    return (await request(path, signal, asked)).body;
  }

  /** GET a JSON route: its body and headers (for the pages' `next-after-version`). */
  async function request(path, signal, asked) {
    let response;
    const headers = { accept: "application/json" };
    const key = sessionStorage.getItem(KEY_ITEM);
    if (key) headers.authorization = "Bearer " + key;
    try {
      response = await fetch(path, { headers, signal });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, "Unreachable", "The projection-service cannot be reached (" + e.message + ").");
    }
    if ((response.status === 401 || response.status === 403) && !asked && !keyDeclined) {
      const entered = window.prompt(response.status === 401
        ? "This projection-service needs an API key (scope accounts:read):"
        : "This key lacks the scope this page needs; another key:");
      if (entered && entered.trim()) {
        sessionStorage.setItem(KEY_ITEM, entered.trim());
        return request(path, signal, true);
      }
      keyDeclined = true;
    }
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (!response.ok) {
      const err = body && body.error;
      throw new ApiError(response.status, err ? err.code : "HTTP" + response.status,
        err ? err.message : "The service answered " + response.status + " " + response.statusText + ".");
    }
    return { body, headers: response.headers };
  }

  /** The history page size the explorer asks for (the service's cap). */
  const HISTORY_PAGE = 1000;

  /** An account's events after `after` (a version), page by page, oldest first. */
  async function eventsAfter(id, after, schema, signal) {
    let all = [];
    let cursor = after;
    for (;;) {
      const page = await request("/accounts/" + encodeURIComponent(id) + "/events?after_version=" + cursor +
        "&limit=" + HISTORY_PAGE + (schema === 1 ? "&schema_version=1" : ""), signal);
      all = all.concat(page.body);
      const next = page.headers.get("next-after-version");
      if (!next || next === String(cursor)) return all;
      cursor = Number(next);
    }
  }

  const pad = (n, w = 2) => String(n).padStart(w, "0");

  /** The viewer's offset from UTC at `date`, as "UTC+05:30". */
  function offsetText(date) {
    const minutes = -date.getTimezoneOffset();
    const sign = minutes >= 0 ? "+" : "−";
    const abs = Math.abs(minutes);
    return "UTC" + sign + pad(Math.floor(abs / 60)) + ":" + pad(abs % 60);
  }

  /** An RFC 3339 time as "2026-03-01 14:05:09" in the viewer's time zone. */
  function localTime(iso) {
    const d = new Date(iso);
    if (isNaN(d)) return iso || "—";
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }

  /** An RFC 3339 time as a datetime-local input value in the viewer's time zone. */
  function localInputValue(iso) {
    const d = new Date(iso);
    return isNaN(d) ? "" : localTime(iso).replace(" ", "T");
  }

  /** A <time> element: local text, the exact UTC value in datetime and title. */
  function timeEl(iso) {
    const d = new Date(iso);
    return h("time", { datetime: iso, title: isNaN(d) ? iso : iso + " (" + offsetText(d) + " here)" }, localTime(iso));
  }

  /** Minor units as a decimal string with `digits` decimals ("-1234", 2 → "-12.34"). */
  function formatMinor(minor, digits) {
    const negative = minor < 0;
    let text = String(Math.abs(minor));
    if (digits > 0) {
      text = text.padStart(digits + 1, "0");
      text = text.slice(0, -digits) + "." + text.slice(-digits);
    }
    return (negative ? "-" : "") + text;
  }

  /** Inserts thousands separators into a plain decimal string for display. */
  function grouped(decimal) {
    const [whole, fraction] = String(decimal).split(".");
    const sign = whole.startsWith("-") ? "-" : "";
    const digits = whole.replace("-", "").replace(/\B(?=(\d{3})+$)/g, ",");
    return sign + digits + (fraction !== undefined ? "." + fraction : "");
  }

  /** Decimal places of an account's currency, read from the API's `balance` text. */
  function digitsOf(account) {
    const dot = String(account.balance).indexOf(".");
    return dot < 0 ? 0 : String(account.balance).length - dot - 1;
  }

  function money(decimal, currency) {
    return grouped(decimal) + " " + currency;
  }

  function statusBadge(status) {
    return h("span", { class: "badge badge-" + status }, status);
  }

  /** The fragment as {path, params}. */
  function route() {
    const hash = location.hash.replace(/^#/, "") || "/";
    const q = hash.indexOf("?");
    const path = q < 0 ? hash : hash.slice(0, q);
    const params = new URLSearchParams(q < 0 ? "" : hash.slice(q + 1));
    return { path, params };
  }

  function fragment(path, params) {
    const query = params && params.toString();
    return "#" + path + (query ? "?" + query : "");
  }

  function transferHref(id) {
    return "#/transfer/" + encodeURIComponent(id);
  }

  function accountHref(id) {
    return "#/account/" + encodeURIComponent(id);
  }

  function message(kind, title, text, ...extra) {
    return h("div", { class: "message " + kind, role: kind === "error" ? "alert" : "status", id: kind === "error" ? "error" : null },
      h("strong", {}, title), text ? h("p", {}, text) : null, ...extra);
  }

  const view = () => document.getElementById("view");

  /** Replaces the view's content. */
  function show(...nodes) {
    const root = view();
    root.replaceChildren(...nodes);
    root.setAttribute("aria-busy", "false");
  }

  // ---------------------------------------------------------------- live status (header)

  const live = { commits: null, listeners: new Set(), status: null };

  async function pollStatus() {
    const text = document.getElementById("projection-text");
    const box = document.getElementById("projection");
    try {
      const st = await api("/status");
      live.status = st;
      box.dataset.ready = String(st.ready);
      box.dataset.lag = String(st.lag);
      box.classList.toggle("ok", st.ready && st.lag === 0);
      box.classList.toggle("behind", !st.ready || st.lag > 0);
      box.classList.remove("down");
      text.textContent = (st.ready ? "Live" : "Catching up") + " · lag " + st.lag +
        " · " + st.accounts + " accounts · " + st.events + " events" + (st.parked ? " · " + st.parked + " parked" : "");
      const lags = document.getElementById("lags");
      lags.replaceChildren(h("span", { class: "lags-title" }, "Lag per partition of " + st.topic + ":"),
        ...st.partitions.map((p) => h("span", {
          class: "lag" + (p.lag > 0 ? " lag-behind" : ""),
          dataset: { partition: String(p.partition), lag: String(p.lag) },
          title: "next offset " + p.position + " of " + p.end,
        }, "p" + p.partition + " ", h("strong", {}, String(p.lag)))));
      if (!st.partitions.length) lags.append(h("span", { class: "lag" }, "no partitions assigned yet"));
      const count = document.getElementById("dlq-count");
      count.textContent = st.dead_letters === null ? "…" : String(st.dead_letters);
      count.dataset.count = st.dead_letters === null ? "" : String(st.dead_letters);
      count.classList.toggle("count-alert", (st.dead_letters || 0) > 0);
      count.setAttribute("aria-label", (st.dead_letters === null ? "not counted yet" : st.dead_letters) + " dead letters");
      if (live.commits !== st.commits) {
        const first = live.commits === null;
        live.commits = st.commits;
        if (!first) for (const f of live.listeners) f();
      }
    } catch (e) {
      box.dataset.ready = "false";
      box.classList.remove("ok", "behind");
      box.classList.add("down");
      text.textContent = e.message || "Status unavailable";
    } finally {
      setTimeout(pollStatus, STATUS_EVERY_MS);
    }
  }

  // ---------------------------------------------------------------- accounts list

  let current = null; // {dispose()} of the active view

  function accountsView(params) {
    const state = {
      q: params.get("q") || "",
      status: params.get("status") || "",
      owner: params.get("owner") || "",
      after: params.get("after") || "",
    };
    const prevs = (params.get("prev") || "").split(",").filter(Boolean).map(decodeURIComponent);
    let disposed = false;

    const q = h("input", { id: "q", type: "search", name: "q", value: state.q, placeholder: "id or owner contains…", autocomplete: "off" });
    const status = h("select", { id: "status", name: "status" },
      h("option", { value: "" }, "Any"), h("option", { value: "active" }, "Active"), h("option", { value: "closed" }, "Closed"));
    status.value = state.status;
    const owner = h("input", { id: "owner", type: "text", name: "owner", value: state.owner, placeholder: "exact owner", autocomplete: "off" });

    function go(extra) {
      const p = new URLSearchParams();
      if (q.value.trim()) p.set("q", q.value.trim());
      if (status.value) p.set("status", status.value);
      if (owner.value.trim()) p.set("owner", owner.value.trim());
      for (const [k, v] of Object.entries(extra || {})) if (v) p.set(k, v);
      const target = fragment("/", p);
      if (location.hash !== target) location.hash = target;
    }
    let typing = null;
    const later = () => { clearTimeout(typing); typing = setTimeout(() => go(), 350); };
    q.addEventListener("input", later);
    owner.addEventListener("input", later);
    status.addEventListener("change", () => go());

    const form = h("form", { class: "filters", role: "search", "aria-label": "Filter accounts", onsubmit: (e) => { e.preventDefault(); clearTimeout(typing); go(); } },
      h("div", { class: "field grow" }, h("label", { for: "q" }, "Search"), q),
      h("div", { class: "field" }, h("label", { for: "status" }, "Status"), status),
      h("div", { class: "field" }, h("label", { for: "owner" }, "Owner"), owner),
      h("div", { class: "field actions" }, h("button", { type: "submit" }, "Apply"),
        h("a", { class: "button secondary", href: "#/" }, "Clear")));

    const summary = h("p", { class: "summary", id: "summary", "aria-live": "polite" }, "Loading…");
    const table = h("table", { id: "accounts", class: "data" },
      h("caption", { class: "sr-only" }, "Accounts, ordered by id"),
      h("thead", {}, h("tr", {},
        h("th", { scope: "col" }, "Account"), h("th", { scope: "col" }, "Owner"), h("th", { scope: "col" }, "Currency"),
        h("th", { scope: "col", class: "num" }, "Balance"), h("th", { scope: "col" }, "Status"),
        h("th", { scope: "col", class: "num" }, "Version"), h("th", { scope: "col" }, "Updated"))),
      h("tbody", {}));
    const pager = h("nav", { class: "pager", "aria-label": "Pages" });
    const body = h("div", { id: "list-body" }, h("div", { class: "table-wrap" }, table), pager);

    show(h("section", { "aria-labelledby": "h-accounts" },
      h("div", { class: "page-head" }, h("h1", { id: "h-accounts" }, "Accounts"),
        h("p", { class: "lede" }, "Every account in the read model. Updates live as events are projected.")),
      form, summary, body));

    async function load() {
      const p = new URLSearchParams();
      p.set("limit", String(PAGE_SIZE));
      if (state.q) p.set("q", state.q);
      if (state.status) p.set("status", state.status);
      if (state.owner) p.set("owner", state.owner);
      if (state.after) p.set("after", state.after);
      let page;
      try {
        page = await api("/accounts?" + p.toString());
      } catch (e) {
        if (disposed) return;
        body.replaceChildren(message("error", "The accounts cannot be listed.", e.message));
        summary.textContent = "";
        return;
      }
      if (disposed) return;
      const rows = page.accounts.map((a) => h("tr", { dataset: { id: a.id, version: String(a.version) } },
        h("td", { dataset: { col: "id" } }, h("a", { href: accountHref(a.id) }, a.id)),
        h("td", { dataset: { col: "owner" } }, a.owner),
        h("td", { dataset: { col: "currency" } }, a.currency),
        h("td", { class: "num", dataset: { col: "balance" } }, grouped(a.balance)),
        h("td", { dataset: { col: "status" } }, statusBadge(a.status)),
        h("td", { class: "num", dataset: { col: "version" } }, String(a.version)),
        h("td", { dataset: { col: "updated" } }, timeEl(a.updated_at))));
      table.tBodies[0].replaceChildren(...rows);
      if (!rows.length) {
        table.tBodies[0].append(h("tr", { class: "empty" }, h("td", { colspan: "7" },
          state.q || state.status || state.owner ? "No account matches these filters." : "No accounts yet: open one with `bank open`.")));
      }
      const filtered = [state.q && "matching “" + state.q + "”", state.status, state.owner && "owned by " + state.owner].filter(Boolean).join(", ");
      const pageNo = prevs.length + 1;
      summary.textContent = rows.length + (rows.length === 1 ? " account" : " accounts") + " on page " + pageNo +
        (filtered ? " (" + filtered + ")" : "") + (live.status ? " · " + live.status.accounts + " in total" : "");
      const prevAfter = prevs.length ? prevs[prevs.length - 1] : null;
      pager.replaceChildren(
        h("button", { type: "button", class: "secondary", id: "prev", disabled: prevs.length === 0, onclick: () => {
          go({ after: prevAfter === "-" ? "" : prevAfter, prev: prevs.slice(0, -1).map(encodeURIComponent).join(",") });
        } }, "← Previous"),
        h("span", { class: "page-no" }, "Page " + pageNo),
        h("button", { type: "button", class: "secondary", id: "next", disabled: !page.next, onclick: () => {
          go({ after: page.next, prev: prevs.concat([state.after || "-"]).map(encodeURIComponent).join(",") });
        } }, "Next →"));
      table.dataset.loaded = String(live.commits);
    }
    load();
    live.listeners.add(load);
    return { dispose() { disposed = true; clearTimeout(typing); live.listeners.delete(load); } };
  }

  // ---------------------------------------------------------------- one account

  /** Rows of the timeline from the current-schema events: amount and balance after each. */
  function timelineRows(events, digits) {
    let balance = 0;
    return events.map((e) => {
      const d = e.data || {};
      let amount = null;
      switch (e.event_type) {
        case "AccountOpened": amount = d.initial_balance_minor || 0; balance = amount; break;
        case "MoneyDeposited": amount = d.amount_minor; balance += amount; break;
        case "MoneyWithdrawn": amount = -d.amount_minor; balance -= d.amount_minor; break;
        case "TransferDebited": amount = -d.amount_minor; balance -= d.amount_minor; break;
        case "TransferCredited": amount = d.amount_minor; balance += amount; break;
        case "TransferRefunded": amount = d.amount_minor; balance += amount; break;
        default: break;
      }
      const meta = e.metadata || {};
      return {
        version: e.version,
        timestamp: e.timestamp,
        type: e.event_type,
        amount,
        amountText: amount === null ? "" : (amount > 0 ? "+" : amount < 0 ? "−" : "") + grouped(formatMinor(Math.abs(amount), digits)),
        balance,
        balanceText: grouped(formatMinor(balance, digits)),
        commandId: meta.causation_id || meta.command_id || "",
        correlationId: meta.correlation_id || "",
        transferId: d.transfer_id || "",
      };
    });
  }

  /** An id shortened to its first 8 characters; the whole id is its title and `data-full`. */
  function shortId(id) {
    if (!id) return "—";
    const text = id.length > 12 ? id.slice(0, 8) + "…" : id;
    return h("span", { class: "id", title: id, dataset: { full: id } }, text);
  }

  /** An object as one line of JSON with spaces, so that it wraps between fields. */
  function compactJson(value) {
    if (value === null || typeof value !== "object" || Array.isArray(value)) return JSON.stringify(value === undefined ? null : value);
    return "{" + Object.entries(value).map(([k, v]) => JSON.stringify(k) + ": " + JSON.stringify(v)).join(", ") + "}";
  }

  /** The balance-over-time chart: a step line through every event, the chosen version marked. */
  function chart(rows, currency, digits, selected, onPick, width) {
    const W = Math.max(300, Math.round(width || 820)), H = W < 560 ? 200 : 250, L = 78, R = 18, T = 22, B = 36;
    const svg = s("svg", { viewBox: "0 0 " + W + " " + H, class: "chart", role: "img", id: "chart",
      "aria-label": "Balance over time, " + rows.length + " events" });
    if (!rows.length) return svg;
    const times = rows.map((r) => new Date(r.timestamp).getTime());
    const t0 = Math.min(...times), t1 = Math.max(...times);
    const max = Math.max(1, ...rows.map((r) => r.balance));
    const min = Math.min(0, ...rows.map((r) => r.balance));
    const x = (t) => t1 === t0 ? L + (W - L - R) / 2 : L + (t - t0) / (t1 - t0) * (W - L - R);
    const y = (b) => T + (1 - (b - min) / (max - min)) * (H - T - B);
    const grid = s("g", { class: "grid" });
    for (let i = 0; i <= 4; i++) {
      const value = min + (max - min) * i / 4;
      const yy = y(value);
      grid.append(s("line", { x1: L, x2: W - R, y1: yy, y2: yy }));
      grid.append(s("text", { x: L - 8, y: yy + 4, "text-anchor": "end", class: "axis", text: grouped(formatMinor(Math.round(value), digits)) }));
    }
    svg.append(grid);
    const labels = t1 === t0 ? [t0] : W < 560 ? [t0, t1] : [t0, (t0 + t1) / 2, t1];
    labels.forEach((t, i) => {
      const anchor = labels.length === 1 ? "middle" : i === 0 ? "start" : i === labels.length - 1 ? "end" : "middle";
      svg.append(s("text", { x: x(t), y: H - 10, "text-anchor": anchor, class: "axis", text: localTime(new Date(t).toISOString()) }));
    });
    let d = "";
    rows.forEach((r, i) => {
      const xx = x(times[i]), yy = y(r.balance);
      d += i === 0 ? "M" + xx + " " + yy : " H" + xx + " V" + yy;
    });
    const lastX = x(times[times.length - 1]);
    const area = d + " H" + lastX + " V" + y(min) + " H" + x(times[0]) + " Z";
    svg.append(s("path", { d: area, class: "area" }));
    svg.append(s("path", { d, class: "line" }));
    rows.forEach((r, i) => {
      const dot = s("circle", { cx: x(times[i]), cy: y(r.balance), r: r.version === selected ? 6.5 : 4,
        class: "point" + (r.version === selected ? " selected" : ""), "data-version": String(r.version) },
      s("title", { text: "v" + r.version + " · " + r.type + " · " + r.balanceText + " " + currency + " · " + localTime(r.timestamp) }));
      dot.addEventListener("click", () => onPick(r.version));
      svg.append(dot);
    });
    svg.append(s("text", { x: L - 8, y: 12, "text-anchor": "end", class: "axis unit", text: currency }));
    return svg;
  }

  function stateList(account, idPrefix) {
    const item = (label, col, value) => h("div", { class: "stat" },
      h("dt", {}, label), h("dd", { dataset: { col }, id: idPrefix + "-" + col }, value));
    return h("dl", { class: "stats" },
      item("Balance", "balance", money(account.balance, account.currency)),
      item("Status", "status", statusBadge(account.status)),
      item("Version", "version", String(account.version)),
      item("Transactions", "transaction_count", String(account.transaction_count)),
      item("Owner", "owner", account.owner),
      item("Opened", "opened_at", timeEl(account.opened_at)),
      item("Updated", "updated_at", timeEl(account.updated_at)));
  }

  function accountView(id, params) {
    let disposed = false;
    const controller = new AbortController();
    let account = null, events = [], rows = [], digits = 2;
    let schema = params.get("schema") === "1" ? 1 : 2;
    let stored = null; // events in the chosen schema
    let pick = params.has("as_of") ? { as_of: params.get("as_of") } : params.has("version") ? { version: params.get("version") } : null;

    const title = h("h1", { id: "h-account" }, "Account ", h("span", { class: "mono" }, id));
    show(h("p", { class: "back" }, h("a", { href: "#/" }, "← All accounts")), title,
      h("p", { class: "summary", id: "loading" }, "Loading…"));

    const nowBox = h("section", { class: "card", id: "account", "aria-labelledby": "h-now" });
    const chartBox = h("section", { class: "card", "aria-labelledby": "h-chart" });
    const travelBox = h("section", { class: "card", id: "travel", "aria-labelledby": "h-travel" });
    const timelineBox = h("section", { class: "card wide", "aria-labelledby": "h-timeline" });

    function renderNow() {
      nowBox.dataset.id = account.id;
      nowBox.dataset.version = String(account.version);
      nowBox.replaceChildren(h("h2", { id: "h-now" }, "Now"), stateList(account, "now"));
    }

    function selectedVersion() {
      const el = document.getElementById("asof");
      return el && el.dataset.version ? Number(el.dataset.version) : account.version;
    }

    function renderChart() {
      const width = chartBox.clientWidth ? chartBox.clientWidth - 38 : 820;
      chartBox.replaceChildren(h("h2", { id: "h-chart" }, "Balance over time"),
        chart(rows, account.currency, digits, selectedVersion(), (v) => choose({ version: String(v) }), width));
    }
    let resizing = null;
    const onResize = () => {
      clearTimeout(resizing);
      resizing = setTimeout(() => { if (account && !disposed) renderChart(); }, 150);
    };
    window.addEventListener("resize", onResize);

    // Time travel: a version slider and a time picker, both answered by the API.
    const slider = h("input", { type: "range", id: "version-slider", min: "1", step: "1" });
    const sliderOut = h("output", { for: "version-slider", id: "version-out" });
    const when = h("input", { type: "datetime-local", id: "as-of-time", step: "1" });
    const asof = h("div", { id: "asof", "aria-live": "polite" });
    let debounce = null;
    slider.addEventListener("input", () => {
      sliderOut.textContent = "v" + slider.value;
      clearTimeout(debounce);
      debounce = setTimeout(() => choose({ version: slider.value }), 120);
    });
    const timeForm = h("form", { class: "inline", onsubmit: (e) => {
      e.preventDefault();
      const d = new Date(when.value);
      if (!when.value || isNaN(d)) {
        asof.replaceChildren(message("error", "Not a time.", "Pick a date and time to see the account as of then."));
        return;
      }
      choose({ as_of: d.toISOString() });
    } },
    h("label", { for: "as-of-time" }, "As of time"), when, h("button", { type: "submit" }, "Show"));
    travelBox.append(h("h2", { id: "h-travel" }, "State as of a moment"),
      h("div", { class: "slider-row" }, h("label", { for: "version-slider" }, "Version"), slider, sliderOut,
        h("button", { type: "button", class: "secondary", id: "latest", onclick: () => choose(null) }, "Latest")),
      timeForm, asof);

    let asofSeq = 0;
    async function choose(p) {
      pick = p;
      const params = new URLSearchParams();
      if (p && p.version) params.set("version", p.version);
      if (p && p.as_of) params.set("as_of", p.as_of);
      if (schema === 1) params.set("schema", "1");
      history.replaceState(null, "", fragment("/account/" + encodeURIComponent(id), params));
      const seq = ++asofSeq;
      const query = p ? "?" + new URLSearchParams(p).toString() : "";
      let state;
      try {
        state = await api("/accounts/" + encodeURIComponent(id) + query, controller.signal);
      } catch (e) {
        if (e.name === "AbortError" || seq !== asofSeq) return;
        asof.dataset.version = "";
        asof.dataset.error = e.code;
        asof.replaceChildren(message("error", e.code === "InvalidQuery" ? "That moment cannot be shown." :
          e.code === "AccountNotFound" ? "The account did not exist then." : "The state cannot be shown.", e.message));
        markRow(null);
        return;
      }
      if (seq !== asofSeq || disposed) return;
      asof.dataset.version = String(state.version);
      delete asof.dataset.error;
      const label = !p ? "Latest state" : p.version ? "As of version " + p.version : "As of " + localTime(p.as_of);
      asof.replaceChildren(h("h3", {}, label, h("span", { class: "muted" }, " — version " + state.version + " of " + account.version)),
        stateList(state, "asof"));
      slider.value = String(state.version);
      sliderOut.textContent = "v" + state.version;
      if (document.activeElement !== when) when.value = localInputValue(p && p.as_of ? p.as_of : state.updated_at);
      markRow(state.version);
      renderChart();
    }

    function markRow(version) {
      for (const tr of timelineBox.querySelectorAll("tbody tr")) {
        const on = Number(tr.dataset.version) === version;
        tr.classList.toggle("selected", on);
        if (on) tr.setAttribute("aria-current", "true"); else tr.removeAttribute("aria-current");
      }
    }

    // The timeline, with the schema toggle.
    const radios = [2, 1].map((v) => h("label", { class: "toggle" },
      h("input", { type: "radio", name: "schema", value: String(v), checked: schema === v, onchange: () => setSchema(v) }),
      v === 2 ? " v2 — current (upcast)" : " v1 — seed era (downcast)"));
    const schemaBox = h("fieldset", { class: "schema" }, h("legend", {}, "Event schema"), ...radios);
    const table = h("table", { id: "timeline", class: "data" });

    async function setSchema(v) {
      schema = v;
      try {
        await loadStored();
      } catch (e) {
        if (disposed || e.name === "AbortError") return;
        timelineBox.append(message("error", "The events cannot be shown in schema v" + v + ".", e.message));
        return;
      }
      if (disposed) return;
      renderTimeline();
      choose(pick);
    }

    /** The events in the chosen schema: v2 is `events`; v1 is fetched once, then only what is new. */
    let storedV1 = [];
    async function loadStored() {
      if (schema === 2) {
        stored = events;
        return;
      }
      const last = storedV1.length ? storedV1[storedV1.length - 1].version : 0;
      storedV1 = storedV1.concat(await eventsAfter(id, last, 1, controller.signal));
      stored = storedV1;
    }

    function renderTimeline() {
      table.dataset.schema = String(schema);
      const byVersion = new Map((stored || []).map((e) => [e.version, e]));
      table.replaceChildren(
        h("caption", { class: "sr-only" }, "Events of " + id + ", oldest first"),
        h("thead", {}, h("tr", {},
          h("th", { scope: "col", class: "num" }, "Version"), h("th", { scope: "col" }, "Time"), h("th", { scope: "col" }, "Event"),
          h("th", { scope: "col", class: "num" }, "Amount"), h("th", { scope: "col", class: "num" }, "Balance after"),
          h("th", { scope: "col" }, "Command id"), h("th", { scope: "col" }, "Correlation id"),
          h("th", { scope: "col" }, schema === 1 ? "Data (v1)" : "Data (v2)"))),
        h("tbody", {}, rows.map((r) => {
          const e = byVersion.get(r.version) || {};
          return h("tr", { dataset: { version: String(r.version), type: r.type } },
            h("td", { class: "num", dataset: { col: "version" } },
              h("button", { type: "button", class: "link", title: "Show the state as of version " + r.version,
                onclick: () => choose({ version: String(r.version) }) }, String(r.version))),
            h("td", { dataset: { col: "time" } }, timeEl(r.timestamp)),
            h("td", { dataset: { col: "type" } }, h("span", { class: "event event-" + r.type }, r.type),
              r.transferId ? [" ", h("a", { href: transferHref(r.transferId), class: "transfer-link",
                title: "Transfer " + r.transferId + " and its steps" }, "transfer")] : null),
            h("td", { class: "num" + (r.amount < 0 ? " neg" : ""), dataset: { col: "amount" } }, r.amountText),
            h("td", { class: "num", dataset: { col: "balance" } }, r.balanceText),
            h("td", { class: "mono small", dataset: { col: "command_id" } }, shortId(r.commandId)),
            h("td", { class: "mono small", dataset: { col: "correlation_id" } }, shortId(r.correlationId)),
            h("td", { class: "mono small data-json", dataset: { col: "data" } }, compactJson(e.data)));
        })));
    }

    // The history is read in pages once; afterwards only the events after the last one shown.
    async function loadAll() {
      const last = events.length ? events[events.length - 1].version : 0;
      const [a, newer] = await Promise.all([
        api("/accounts/" + encodeURIComponent(id), controller.signal),
        eventsAfter(id, last, 2, controller.signal),
      ]);
      account = a;
      events = events.concat(newer);
      digits = digitsOf(a);
      rows = timelineRows(events, digits);
      await loadStored();
    }

    async function start() {
      try {
        await loadAll();
      } catch (e) {
        if (e.name === "AbortError" || disposed) return;
        show(h("p", { class: "back" }, h("a", { href: "#/" }, "← All accounts")), title,
          message("error", e.code === "AccountNotFound" ? "No such account." : "The account cannot be shown.", e.message,
            h("p", {}, h("a", { href: "#/" }, "Back to all accounts"))));
        return;
      }
      if (disposed) return;
      title.replaceChildren("Account ", h("span", { class: "mono" }, id), " ", statusBadge(account.status));
      slider.max = String(account.version);
      timelineBox.replaceChildren(h("div", { class: "card-head" }, h("h2", { id: "h-timeline" }, "Event timeline"), schemaBox),
        h("div", { class: "table-wrap" }, table));
      renderNow();
      renderTimeline();
      show(h("p", { class: "back" }, h("a", { href: "#/" }, "← All accounts")), title,
        h("p", { class: "lede" }, "Owned by ", h("strong", {}, account.owner), " · " + account.currency +
          " · opened ", timeEl(account.opened_at)),
        h("div", { class: "grid2" }, nowBox, travelBox), chartBox, timelineBox);
      await choose(pick);
      follow();
    }

    // Live: the service's read-your-writes wait, woken by each commit (no polling).
    async function follow() {
      while (!disposed) {
        try {
          await api("/accounts/" + encodeURIComponent(id) + "?min_version=" + (account.version + 1) + "&timeout_ms=" + LONG_POLL_MS, controller.signal);
        } catch (e) {
          if (disposed || e.name === "AbortError") return;
          if (e.code !== "NotCaughtUp") await new Promise((r) => setTimeout(r, 2000));
          continue;
        }
        try {
          await loadAll();
        } catch (e) {
          if (disposed || e.name === "AbortError") return;
          continue;
        }
        if (disposed) return;
        title.replaceChildren("Account ", h("span", { class: "mono" }, id), " ", statusBadge(account.status));
        slider.max = String(account.version);
        renderNow();
        renderTimeline();
        await choose(pick);
      }
    }

    start();
    return {
      dispose() {
        disposed = true;
        controller.abort();
        clearTimeout(debounce);
        clearTimeout(resizing);
        window.removeEventListener("resize", onResize);
      },
    };
  }

  // ---------------------------------------------------------------- dead letters

  function deadLettersView() {
    let disposed = false;
    const body = h("div", {}, h("p", { class: "summary" }, "Reading the dead-letter topic…"));
    show(h("section", { "aria-labelledby": "h-dlq" },
      h("div", { class: "page-head" }, h("h1", { id: "h-dlq" }, "Dead letters"),
        h("p", { class: "lede" }, "Messages the projection could not apply, newest first, with the reason. " +
          "Fix the cause, then produce the message back to the events topic.")), body));
    async function load() {
      let page;
      try {
        page = await api("/dead-letters?limit=100");
      } catch (e) {
        if (!disposed) body.replaceChildren(message("error", "The dead letters cannot be read.", e.message));
        return;
      }
      if (disposed) return;
      const table = h("table", { class: "data", id: "dead-letters" },
        h("caption", { class: "sr-only" }, "Dead letters"),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Failed at"), h("th", { scope: "col" }, "Code"),
          h("th", { scope: "col" }, "Reason"), h("th", { scope: "col" }, "Key"), h("th", { scope: "col" }, "From"),
          h("th", { scope: "col" }, "Message"))),
        h("tbody", {}, page.dead_letters.map((d) => h("tr", { dataset: { partition: String(d.partition), offset: String(d.offset) } },
          h("td", {}, d.failed_at ? timeEl(d.failed_at) : "—"),
          h("td", { dataset: { col: "code" } }, h("span", { class: "badge badge-code" }, d.code || "?")),
          h("td", { class: "reason" }, d.message || ""),
          h("td", { class: "mono small" }, d.key === null ? "—" : d.key),
          h("td", { class: "mono small" }, (d.original_topic || "?") + " [" + (d.original_partition ?? "?") + "] @" + (d.original_offset ?? "?")),
          h("td", {}, h("details", {}, h("summary", {}, d.payload_bytes + " bytes"), h("pre", { class: "payload" }, d.payload || "")))))));
      body.replaceChildren(h("p", { class: "summary", id: "dlq-summary" }, page.total + " in " + page.topic +
        (page.total > page.dead_letters.length ? " · showing the newest " + page.dead_letters.length : "")),
      page.dead_letters.length ? h("div", { class: "table-wrap" }, table) : message("ok", "No dead letters.", "Every event so far could be applied."));
    }
    load();
    live.listeners.add(load);
    return { dispose() { disposed = true; live.listeners.delete(load); } };
  }

  // ---------------------------------------------------------------- one transfer

  /** A transfer: who, how much, its status and reason, and its steps on each aggregate. */
  function transferView(id) {
    let disposed = false;
    const body = h("div", {}, h("p", { class: "summary" }, "Reading the transfer…"));
    show(h("section", { "aria-labelledby": "h-transfer" },
      h("div", { class: "page-head" }, h("h1", { id: "h-transfer" }, "Transfer ", h("span", { class: "mono" }, id)),
        h("p", { class: "lede" }, "Money moved from one account to another in steps, each one transaction on one " +
          "aggregate's partition: started, the source debited, the target credited, then completed (or the source " +
          "refunded and the transfer failed).")), body));
    async function load() {
      let t;
      try {
        t = await api("/transfers/" + encodeURIComponent(id));
      } catch (e) {
        if (!disposed) body.replaceChildren(message("error", "The transfer cannot be shown.", e.message));
        return;
      }
      if (disposed) return;
      // `amount` is the decimal text in the currency's digits, once the currency is known.
      const amount = t.amount && t.currency ? money(t.amount, t.currency) : t.amount_minor + " minor units";
      const facts = h("dl", { class: "state", id: "transfer-facts" },
        h("dt", {}, "Status"), h("dd", { dataset: { field: "status" } }, statusBadge(t.status)),
        t.reason ? [h("dt", {}, "Reason"), h("dd", { dataset: { field: "reason" } }, h("span", { class: "badge badge-code" }, t.reason))] : null,
        h("dt", {}, "From"), h("dd", {}, h("a", { href: accountHref(t.from), dataset: { field: "from" } }, t.from)),
        h("dt", {}, "To"), h("dd", {}, h("a", { href: accountHref(t.to), dataset: { field: "to" } }, t.to)),
        h("dt", {}, "Amount"), h("dd", { dataset: { field: "amount" } }, amount),
        h("dt", {}, "Started"), h("dd", {}, timeEl(t.started_at)),
        t.finished_at ? [h("dt", {}, "Finished"), h("dd", {}, timeEl(t.finished_at))] : null);
      const steps = h("table", { class: "data", id: "transfer-steps" },
        h("caption", { class: "sr-only" }, "Steps of transfer " + id + ", in time order"),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Time"), h("th", { scope: "col" }, "Step"),
          h("th", { scope: "col" }, "On"), h("th", { scope: "col", class: "num" }, "Version"), h("th", { scope: "col" }, "Data"))),
        h("tbody", {}, (t.steps || []).map((st) => h("tr", { dataset: { type: st.event_type } },
          h("td", {}, timeEl(st.timestamp)),
          h("td", {}, h("span", { class: "event event-" + st.event_type }, st.event_type)),
          h("td", { class: "mono small" }, st.aggregate_id === t.transfer_id ? "this transfer"
            : h("a", { href: accountHref(st.aggregate_id) }, st.aggregate_id)),
          h("td", { class: "num" }, String(st.version)),
          h("td", { class: "mono small data-json" }, compactJson(st.data))))));
      body.replaceChildren(facts, h("h2", {}, "Steps"), h("div", { class: "table-wrap" }, steps));
      if (t.status !== "pending") live.listeners.delete(load);
    }
    load();
    live.listeners.add(load);
    return { dispose() { disposed = true; live.listeners.delete(load); } };
  }

  // ---------------------------------------------------------------- router

  function render() {
    if (current) current.dispose();
    current = null;
    view().setAttribute("aria-busy", "true");
    const { path, params } = route();
    document.getElementById("nav-accounts").toggleAttribute("aria-current", path === "/" || path === "");
    document.getElementById("nav-dlq").toggleAttribute("aria-current", path === "/dead-letters");
    if (path === "/" || path === "") {
      document.title = "Accounts · bank-es explorer";
      current = accountsView(params);
    } else if (path.startsWith("/account/") && path.length > "/account/".length) {
      let id;
      try {
        id = decodeURIComponent(path.slice("/account/".length));
      } catch (_) {
        id = path.slice("/account/".length);
      }
      document.title = id + " · bank-es explorer";
      current = accountView(id, params);
    } else if (path.startsWith("/transfer/") && path.length > "/transfer/".length) {
      let id;
      try {
        id = decodeURIComponent(path.slice("/transfer/".length));
      } catch (_) {
        id = path.slice("/transfer/".length);
      }
      document.title = "Transfer " + id + " · bank-es explorer";
      current = transferView(id);
    } else if (path === "/dead-letters") {
      document.title = "Dead letters · bank-es explorer";
      current = deadLettersView();
    } else {
      document.title = "Not found · bank-es explorer";
      show(message("error", "There is no such page.", "“" + location.hash + "” is not a page of the explorer.",
        h("p", {}, h("a", { href: "#/" }, "Go to the accounts"))));
    }
  }

  function start() {
    const now = new Date();
    let zone = "";
    try { zone = Intl.DateTimeFormat().resolvedOptions().timeZone || ""; } catch (_) { zone = ""; }
    document.getElementById("tz").textContent = (zone ? zone + ", " : "") + offsetText(now);
    document.getElementById("tz").dataset.offset = String(-now.getTimezoneOffset());
    window.addEventListener("hashchange", () => {
      render();
      document.getElementById("main").focus({ preventScroll: true });
    });
    pollStatus();
    render();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
