// Trackstar Mirror: the history explorer. Plain JavaScript, no build step, no outside network.
//
// - The API token lives in sessionStorage (this tab's session) and travels only in the
//   Authorization header; links and the address bar carry resource, id and times, never it.
// - Every value from the mirror is put on the page as text (textContent), never as HTML.
// - Routes live in the hash: #/ (find), #/search?q=&resource=, #/object?resource=&id=
//   &connection_id=&at=&known_at=, #/overview.
"use strict";

const TOKEN_KEY = "mirror.apiToken";
const REFRESH_MS = 5000;
const FIRST_SLICE = 60;     // timeline entries built before the page is shown
const RENDER_SLICE = 250;   // then this many per task until the page holds them all
const state = { resources: null, object: null, refresh: null, overviewCards: {} };

class AuthError extends Error {}
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// ---- small DOM helpers --------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}
const svg = (tag, attrs) => {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  return node;
};
const view = () => document.getElementById("view");

function fmtTime(iso) {
  if (!iso) return "—";
  return iso.replace("T", " ").replace("+00:00", "Z");
}
function fmtValue(value) {
  if (value === undefined) return "(absent)";
  const text = JSON.stringify(value);
  return text.length > 160 ? text.slice(0, 157) + "…" : text;
}
function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

// ---- routing ------------------------------------------------------------------------------
function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const cut = raw.indexOf("?");
  const path = cut < 0 ? raw : raw.slice(0, cut);
  const params = new URLSearchParams(cut < 0 ? "" : raw.slice(cut + 1));
  return { path, params };
}
function link(path, params) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params || {})) if (value) query.set(key, value);
  const text = query.toString();
  return `#${path}${text ? "?" + text : ""}`;
}
const objectLink = (resource, id, connection_id, at, known_at) =>
  link("/object", { resource, id, connection_id, at, known_at });

// ---- the read API -------------------------------------------------------------------------
async function api(path, params) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) { showLogin(); throw new AuthError("no token"); }
  const url = new URL(path, location.origin);
  for (const [key, value] of Object.entries(params || {})) if (value) url.searchParams.set(key, value);
  let answer;
  try {
    answer = await fetch(url, { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
  } catch (err) {
    throw new ApiError(0, "The mirror did not answer (is `mirror serve` running?).");
  }
  if (answer.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("The mirror refused that token (401 Unauthorized). " +
              "Enter the value of MIRROR_API_TOKEN the service runs with.");
    throw new AuthError("refused");
  }
  let body = null;
  try { body = await answer.json(); } catch (err) { body = null; }
  if (!answer.ok) {
    throw new ApiError(answer.status, (body && body.error) || `HTTP ${answer.status}`);
  }
  return body;
}

function showLogin(message) {
  stopRefresh();
  document.getElementById("login").hidden = false;
  document.getElementById("view").hidden = true;
  document.getElementById("forget").hidden = true;
  const box = document.getElementById("login-message");
  box.hidden = !message;
  box.textContent = message || "";
  const input = document.getElementById("token");
  input.value = "";
  input.focus();
}
function hideLogin() {
  document.getElementById("login").hidden = true;
  document.getElementById("view").hidden = false;
  document.getElementById("forget").hidden = false;
}

async function login(event) {
  event.preventDefault();
  const input = document.getElementById("token");
  const token = input.value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    state.resources = (await api("/explore/resources")).resources;
  } catch (err) {
    if (!(err instanceof AuthError)) showLogin(`Could not check the token: ${err.message}`);
    return;
  }
  hideLogin();
  route();
}

function errorBox(err) {
  if (err instanceof AuthError) return null;
  const text = err.status === 404 ? "Not found: " + err.message
    : err.status === 400 ? "The mirror refused the request: " + err.message
    : err.message;
  return el("p", { class: "message error", role: "alert", text });
}

function setNav(name) {
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

async function route() {
  if (!sessionStorage.getItem(TOKEN_KEY)) { showLogin(); return; }
  hideLogin();
  const { path, params } = parseHash();
  if (path !== "/overview") stopRefresh();
  try {
    if (!state.resources) state.resources = (await api("/explore/resources")).resources;
    if (path === "/overview") await showOverview();
    else if (path === "/object") await showObject(params);
    else await showFind(params);
  } catch (err) {
    const box = errorBox(err);
    if (box) view().replaceChildren(box);
  }
}

// ---- find ---------------------------------------------------------------------------------
async function showFind(params) {
  setNav("find");
  state.object = null;
  const q = params.get("q") || "";
  const resource = params.get("resource") || "";
  const select = el("select", { id: "search-resource", name: "resource" },
    el("option", { value: "", text: "every resource" }),
    state.resources.map((r) => el("option", { value: r, selected: r === resource, text: r })));
  const input = el("input", { id: "search-q", name: "q", type: "search", value: q,
    required: true, spellcheck: "false", placeholder: "ord_123, #1234, SKU-1",
    "aria-describedby": "search-help" });
  const form = el("form", { class: "search", role: "search", onsubmit: (event) => {
      event.preventDefault();
      location.hash = link("/search", { q: input.value.trim(), resource: select.value });
    } },
    el("div", { class: "field" }, el("label", { for: "search-resource", text: "Resource" }), select),
    el("div", { class: "field grow" }, el("label", { for: "search-q", text: "Id, order number or SKU" }), input),
    el("button", { type: "submit", text: "Search" }));
  const results = el("div", { id: "results" });
  view().replaceChildren(
    el("h1", { text: "Find an object" }),
    el("p", { id: "search-help", class: "hint",
      text: "An id or the start of one, an order number or a SKU. Press / to come back here." }),
    form, results);
  if (!q) { input.focus(); return; }
  results.replaceChildren(el("p", { class: "hint", text: "Searching…" }));
  const answer = await api("/explore/search", { q, resource });
  const rows = answer.results.map((r) => el("tr", {},
    el("td", {}, el("a", { href: objectLink(r.resource, r.id, r.connection_id) },
      el("span", { class: "resource", text: r.resource }), " ", el("code", { text: r.id }))),
    el("td", { text: r.label || "" }),
    el("td", { text: r.status || (r.current ? "" : "deleted") }),
    el("td", {}, el("code", { text: r.connection_id })),
    el("td", { text: fmtTime(r.updated_date) })));
  const direct = resource
    ? el("p", {}, el("a", { href: objectLink(resource, q) }, `Open ${resource} `, el("code", { text: q }), " by its exact id"))
    : null;
  results.replaceChildren(
    el("h2", { text: answer.results.length ? plural(answer.results.length, "match") : "No match" }),
    answer.results.length ? el("div", { class: "scroll" }, el("table", { class: "results" },
      el("thead", {}, el("tr", {}, ["Object", "Number / SKU", "Status", "Connection", "Updated"].map((h) => el("th", { scope: "col", text: h })))),
      el("tbody", {}, rows))) : "",
    direct || "");
  const first = results.querySelector("a");
  if (first) first.focus();
}

// ---- an object ----------------------------------------------------------------------------
async function showObject(params) {
  setNav("");
  const resource = params.get("resource") || "";
  const id = params.get("id") || "";
  const connection = params.get("connection_id") || "";
  const at = params.get("at") || "";
  const knownAt = params.get("known_at") || "";
  const key = JSON.stringify([resource, id, connection]);
  if (!state.object || state.object.key !== key) {
    view().replaceChildren(el("p", { class: "hint", text: "Loading…" }));
    // The timeline and the state are asked for together: one round trip of waiting.
    const stateAnswer = fetchState(resource, id, connection, at, knownAt);
    stateAnswer.catch(() => {});
    const page = await api("/explore/timeline", { resource, id, connection_id: connection });
    state.object = { key, resource, id, connection: page.connection_id, page,
      versions: page.versions.slice(), anomalies: page.anomalies, more: page.more,
      nextBefore: page.next_before };
    renderObject();
    await showState(at, knownAt, stateAnswer);
    return;
  }
  await showState(at, knownAt);
}

function fetchState(resource, id, connection, at, knownAt) {
  return api("/explore/state", { resource, id, connection_id: connection, at, known_at: knownAt });
}

function renderObject() {
  const o = state.object;
  const atInput = el("input", { id: "as-of", name: "at", type: "text", spellcheck: "false",
    placeholder: "2025-05-01T10:06:00Z", "aria-describedby": "time-help" });
  const knownInput = el("input", { id: "known-at", name: "known_at", type: "text",
    spellcheck: "false", placeholder: "(everything received)", "aria-describedby": "time-help" });
  const form = el("form", { class: "times", onsubmit: (event) => {
      event.preventDefault();
      go(atInput.value.trim(), knownInput.value.trim());
    } },
    el("div", { class: "field" }, el("label", { for: "as-of", text: "As of" }), atInput),
    el("div", { class: "field" }, el("label", { for: "known-at", text: "Known at" }), knownInput),
    el("div", { class: "buttons" },
      el("button", { type: "submit", text: "Show state" }),
      el("button", { type: "button", title: "Previous version ([)", onclick: () => step(-1), text: "◀ Earlier" }),
      el("button", { type: "button", title: "Next version (])", onclick: () => step(1), text: "Later ▶" }),
      el("button", { type: "button", onclick: () => go("", ""), text: "Latest" })));
  view().replaceChildren(
    el("h1", {}, el("span", { class: "resource", text: o.resource }), " ", el("code", { text: o.id })),
    el("p", { class: "hint" }, `connection `, el("code", { text: o.connection }), ` · ${plural(o.page.total, "version")}`,
      ` · ${plural(o.anomalies.length, "anomaly").replace("anomalys", "anomalies")}`),
    el("div", { class: "object" },
      el("section", { class: "state", "aria-labelledby": "state-title" },
        el("h2", { id: "state-title", text: "State" }),
        form,
        el("p", { id: "time-help", class: "hint",
          text: "Times are ISO 8601, UTC unless an offset is given. Known at: only what the mirror had received by then. Keys [ and ] step through versions." }),
        el("p", { id: "state-summary", class: "summary", "aria-live": "polite" }),
        el("pre", { id: "state-json", tabindex: "0", "aria-label": "State as JSON" })),
      el("section", { class: "timeline", "aria-labelledby": "timeline-title" },
        el("h2", { id: "timeline-title", text: "Timeline" }),
        el("p", { class: "hint", text: "Newest first. Received: a state a webhook carried. Derived: a state revealed by an update's previous_attributes." }),
        el("ol", { id: "versions", class: "versions" }),
        el("div", { id: "more" }))));
  appendTimeline(o.versions, o.anomalies, o.more);
}

// Versions and anomalies of one page, merged newest first; an anomaly goes above the version
// that starts at its instant.
function appendTimeline(versions, anomalies, more) {
  const o = state.object;
  const list = document.getElementById("versions");
  const oldest = versions.length ? versions[versions.length - 1].valid_from : null;
  const shown = o.shownAnomalies || (o.shownAnomalies = new Set());
  const pending = anomalies.filter((a, i) => !shown.has(i) && (!more || (oldest && Date.parse(a.at) >= Date.parse(oldest))))
    .map((a) => [a, anomalies.indexOf(a)]);
  const items = [];
  let k = 0;
  for (const v of versions) {
    while (k < pending.length && Date.parse(pending[k][0].at) >= Date.parse(v.valid_from)) {
      const a = pending[k][0];
      items.push(() => anomalyItem(a)); shown.add(pending[k][1]); k += 1;
    }
    items.push(() => versionItem(v));
  }
  for (; k < pending.length; k += 1) {
    const a = pending[k][0];
    items.push(() => anomalyItem(a)); shown.add(pending[k][1]);
  }
  // What fills the screen is built at once; the rest of a long history follows in slices
  // between frames, so the page answers at once whatever the number of versions.
  const render = (from, count) => list.append(...items.slice(from, from + count).map((make) => make()));
  // Older pages may only be asked for once this one is all on the page.
  const finish = () => {
    o.rendering = null;
    document.getElementById("more").replaceChildren(more ? el("button", { type: "button",
      id: "load-older", onclick: loadOlder,
      text: `Load older versions (${o.page.total - o.versions.length} more)` }) : "");
  };
  const slice = (from) => {
    if (o !== state.object) return;
    if (from >= items.length) { finish(); markCurrent(); return; }
    render(from, RENDER_SLICE);
    o.rendering = setTimeout(() => slice(from + RENDER_SLICE), 0);
  };
  render(0, FIRST_SLICE);
  if (items.length > FIRST_SLICE) o.rendering = setTimeout(() => slice(FIRST_SLICE), 0);
  else finish();
}

async function loadOlder() {
  const o = state.object;
  const page = await api("/explore/timeline", { resource: o.resource, id: o.id,
    connection_id: o.connection, before: o.nextBefore });
  o.versions.push(...page.versions);
  o.more = page.more;
  o.nextBefore = page.next_before;
  appendTimeline(page.versions, o.anomalies, page.more);
  markCurrent();
}

function versionItem(v) {
  const kind = v.deleted ? "deleted" : v.derived ? "derived" : "received";
  const changes = v.changes.length
    ? el("ul", { class: "diff", "aria-label": "Changed fields" }, v.changes.map((c) => el("li", {},
        el("code", { class: "path", text: c.path }), " ",
        el("span", { class: "old", title: JSON.stringify(c.old) ?? "", text: fmtValue(c.old) }),
        el("span", { class: "arrow", "aria-label": "became", text: " → " }),
        el("span", { class: "new", title: JSON.stringify(c.new) ?? "", text: fmtValue(c.new) }))))
    : el("p", { class: "hint", text: v.deleted ? "Deleted." : "No field changes recorded (the earliest known state, or a whole-object change)." });
  return el("li", { class: `version ${kind}`, "data-valid-from": v.valid_from, "data-kind": kind },
    el("div", { class: "head" },
      el("time", { datetime: v.valid_from, text: fmtTime(v.valid_from) }),
      el("span", { class: `badge ${kind}`, text: kind }),
      el("span", { class: "etype", text: v.event_type }),
      el("code", { class: "eid", title: "event id", text: v.event_id }),
      el("a", { class: "then", href: objectLink(state.object.resource, state.object.id, state.object.connection, v.valid_from),
        "aria-label": `State at ${fmtTime(v.valid_from)}`, text: "state then" })),
    el("p", { class: "meta", text: `${v.derived ? "revealed by an event received" : "received"} ${fmtTime(v.received_at)}` +
      (v.valid_to ? ` · valid until ${fmtTime(v.valid_to)}` : " · still valid") }),
    changes);
}

function anomalyItem(a) {
  return el("li", { class: `anomaly ${a.resolved_at ? "resolved" : "open"}`, "data-at": a.at, "data-kind": a.kind },
    el("div", { class: "head" },
      el("time", { datetime: a.at, text: fmtTime(a.at) }),
      el("span", { class: "badge anomaly", text: `anomaly: ${a.kind}` }),
      el("span", { text: a.resolved_at ? `resolved ${fmtTime(a.resolved_at)}` : "open" }),
      el("code", { class: "eid", title: "revealing event", text: a.event_id })),
    a.paths.length ? el("p", { class: "meta" }, "paths: ", a.paths.map((p, i) => [i ? ", " : "", el("code", { text: p })])) : null,
    a.detail ? el("p", { class: "meta", text: fmtValue(a.detail) }) : null);
}

function go(at, knownAt) {
  const o = state.object;
  location.hash = objectLink(o.resource, o.id, o.connection, at, knownAt);
}

function step(direction) {
  const o = state.object;
  const times = o.versions.map((v) => v.valid_from).sort((a, b) => Date.parse(a) - Date.parse(b));
  if (!times.length) return;
  const current = parseHash().params.get("at");
  const now = current ? Date.parse(current) : Infinity;
  let index = times.findLastIndex((t) => Date.parse(t) <= now);
  if (index < 0) index = direction > 0 ? -1 : 0;
  index = Math.min(times.length - 1, Math.max(0, index + direction));
  go(times[index], parseHash().params.get("known_at") || "");
}

async function showState(at, knownAt, pending) {
  const o = state.object;
  document.getElementById("as-of").value = at;
  document.getElementById("known-at").value = knownAt;
  const summary = document.getElementById("state-summary");
  const pre = document.getElementById("state-json");
  const when = `${at ? "at " + fmtTime(at) : "latest"}${knownAt ? ", as known at " + fmtTime(knownAt) : ""}`;
  markCurrent();
  try {
    const answer = await (pending || fetchState(o.resource, o.id, o.connection, at, knownAt));
    const data = answer.data;
    const status = data && typeof data === "object" && "status" in data
      ? [": status ", el("strong", { id: "state-status", text: String(data.status) })] : [];
    summary.replaceChildren(`State ${when}`, ...status);
    pre.textContent = JSON.stringify(data, null, 2);
  } catch (err) {
    if (err instanceof AuthError) return;
    summary.replaceChildren(err.status === 404 ? `No state ${when}: the object did not exist then (or was deleted, or was not known yet).` : err.message);
    pre.textContent = "";
  }
}

// The version in force at the chosen time (as received by now) is marked in the timeline.
function markCurrent() {
  const at = parseHash().params.get("at");
  const moment = at ? Date.parse(at) : Infinity;
  let marked = null;
  for (const item of document.querySelectorAll("#versions li.version")) {
    const from = Date.parse(item.dataset.validFrom);
    const hit = !marked && from <= moment;
    item.classList.toggle("current", hit);
    if (hit) { item.setAttribute("aria-current", "true"); marked = item; }
    else item.removeAttribute("aria-current");
  }
  for (const item of document.querySelectorAll("#versions li.anomaly")) {
    item.classList.toggle("current", !!at && Date.parse(item.dataset.at) === moment);
  }
  const target = document.querySelector("#versions li.anomaly.current") || marked;
  if (at && target) target.scrollIntoView({ block: "nearest" });
}

// ---- overview -----------------------------------------------------------------------------
function stopRefresh() {
  if (state.refresh) { clearInterval(state.refresh); state.refresh = null; }
}

async function showOverview() {
  setNav("overview");
  state.object = null;
  state.overviewCards = {};
  const cards = ["log", "ingest", "lag", "anomalies", "poisoned", "unprojectable", "backfills"];
  view().replaceChildren(
    el("div", { class: "title-row" }, el("h1", { text: "Overview" }),
      el("p", { id: "updated", class: "hint", "aria-live": "off" })),
    el("p", { id: "overview-error", class: "message error", role: "alert", hidden: true }),
    el("div", { class: "cards" }, cards.map((name) => el("section", { class: `card ${name}`, id: `card-${name}` }))));
  await refreshOverview();
  stopRefresh();
  state.refresh = setInterval(() => { if (!document.hidden) refreshOverview(); }, REFRESH_MS);
}

async function refreshOverview() {
  if (parseHash().path !== "/overview") { stopRefresh(); return; }
  const problem = document.getElementById("overview-error");
  let data;
  try {
    data = await api("/explore/overview");
  } catch (err) {
    if (problem && !(err instanceof AuthError)) { problem.hidden = false; problem.textContent = `Refresh failed: ${err.message}`; }
    return;
  }
  if (!document.getElementById("card-log")) return;
  problem.hidden = true;
  const updated = document.getElementById("updated");
  updated.textContent = `Updated ${fmtTime(data.now).slice(11, 19)} UTC · refreshes every ${REFRESH_MS / 1000} s`;
  const render = {
    log: () => [el("h2", { text: "Event log" }),
      el("p", { class: "figure", id: "log-events", text: data.log.events.toLocaleString("en") }),
      el("p", { class: "hint", text: `events · ${fmtBytes(data.log.bytes)} on disk · last received ${fmtTime(data.log.last_received)}` })],
    ingest: () => ingestCard(data.ingest_per_minute),
    lag: () => [el("h2", { text: "Projection lag" }),
      el("p", { class: "figure", text: `${data.projection_lag.events.toLocaleString("en")}` }),
      el("p", { class: "hint", text: `events not yet projected · oldest waiting ${data.projection_lag.seconds} s` })],
    anomalies: () => [el("h2", { text: `Open anomalies (${data.open_anomalies.total})` }),
      listOrNone(data.open_anomalies.items, "No open anomaly.", (a) => el("li", {},
        el("a", { href: objectLink(a.resource, a.id, a.connection_id, a.at) },
          el("span", { class: "badge anomaly", text: a.kind }), " ", el("span", { class: "resource", text: a.resource }), " ", el("code", { text: a.id })),
        el("span", { class: "hint", text: ` at ${fmtTime(a.at)}${a.paths.length ? " · " + a.paths.join(", ") : ""}` })))],
    poisoned: () => [el("h2", { text: `Poisoned objects (${data.poisoned.total})` }),
      listOrNone(data.poisoned.items, "None: every object folds.", (p) => el("li", {},
        el("a", { href: objectLink(p.resource, p.id, p.connection_id) },
          el("span", { class: "resource", text: p.resource }), " ", el("code", { text: p.id })),
        el("span", { class: "hint", text: ` ${p.reason}` })))],
    unprojectable: () => [el("h2", { text: `Unprojectable events (${data.log.unprojectable})` }),
      listOrNone(data.unprojectable, "None: every stored event could be projected.", (u) => el("li", {},
        el("code", { text: u.event_id }), " ", el("span", { text: u.event_type || "(no event_type)" }),
        el("span", { class: "hint", text: ` · ${u.reason} · ${fmtTime(u.received_at)}` })))],
    backfills: () => [el("h2", { text: "Backfills" }),
      data.backfills.length ? el("div", { class: "scroll" }, el("table", {},
        el("thead", {}, el("tr", {}, ["Connection", "Endpoint", "Objects", "Progress", "State"].map((h) => el("th", { scope: "col", text: h })))),
        el("tbody", {}, data.backfills.map((b) => el("tr", {},
          el("td", {}, el("code", { text: b.connection_id })),
          el("td", {}, el("code", { text: b.endpoint + (b.filters ? "?" + b.filters : "") })),
          el("td", { text: `${b.objects}${b.total_count !== null ? " / " + b.total_count : ""} (${b.appended} new, ${plural(b.pages, "page")})` }),
          el("td", {}, b.total_count ? el("progress", { max: b.total_count, value: Math.min(b.objects, b.total_count), "aria-label": `${b.endpoint} progress` }) : ""),
          el("td", { text: b.finished_at ? `done ${fmtTime(b.finished_at)}` : `in progress (${fmtTime(b.updated_at)})` }))))))
        : el("p", { class: "hint", text: "No backfill has run." })],
  };
  // A card is rebuilt only when its figures changed, so focus and scroll survive a refresh.
  const parts = { log: data.log, ingest: data.ingest_per_minute, lag: data.projection_lag,
    anomalies: data.open_anomalies, poisoned: data.poisoned,
    unprojectable: [data.log.unprojectable, data.unprojectable], backfills: data.backfills };
  for (const [name, make] of Object.entries(render)) {
    const signature = JSON.stringify(parts[name]);
    if (state.overviewCards[name] === signature) continue;
    state.overviewCards[name] = signature;
    document.getElementById(`card-${name}`).replaceChildren(...make());
  }
}

function listOrNone(items, none, make) {
  return items.length ? el("ul", { class: "plain" }, items.map(make)) : el("p", { class: "hint", text: none });
}

function ingestCard(minutes) {
  const total = minutes.reduce((sum, m) => sum + m.events, 0);
  const peak = Math.max(1, ...minutes.map((m) => m.events));
  const width = 300, height = 80, bar = width / Math.max(1, minutes.length);
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height + 14}`, class: "chart", role: "img",
    "aria-label": `Events received per minute over the last hour: ${total} in all, at most ${peak === 1 && total === 0 ? 0 : peak} in one minute` });
  minutes.forEach((m, i) => {
    const h = m.events ? Math.max(1, (m.events / peak) * height) : 0;
    const rect = svg("rect", { x: (i * bar + 0.5).toFixed(2), y: (height - h).toFixed(2),
      width: Math.max(0.5, bar - 1).toFixed(2), height: h.toFixed(2), class: "bar" });
    const title = svg("title", {});
    title.textContent = `${fmtTime(m.minute).slice(11, 16)}: ${m.events}`;
    rect.append(title);
    chart.append(rect);
  });
  chart.append(svg("line", { x1: 0, y1: height + 0.5, x2: width, y2: height + 0.5, class: "axis" }));
  const left = svg("text", { x: 0, y: height + 12, class: "tick" });
  left.textContent = minutes.length ? fmtTime(minutes[0].minute).slice(11, 16) : "";
  const right = svg("text", { x: width, y: height + 12, class: "tick end" });
  right.textContent = minutes.length ? fmtTime(minutes[minutes.length - 1].minute).slice(11, 16) : "";
  chart.append(left, right);
  return [el("h2", { text: "Ingest, last hour" }),
    el("p", { class: "figure", id: "ingest-total", text: total.toLocaleString("en") }),
    el("p", { class: "hint", text: `events received · peak ${total ? peak : 0}/min` }), chart];
}

// ---- start --------------------------------------------------------------------------------
document.addEventListener("keydown", (event) => {
  const typing = event.target.closest && event.target.closest("input, select, textarea");
  if (typing || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key === "/") {
    event.preventDefault();
    const search = document.getElementById("search-q");
    if (search) search.focus(); else location.hash = "#/";
  } else if (state.object && (event.key === "[" || event.key === "]")) {
    event.preventDefault();
    step(event.key === "]" ? 1 : -1);
  }
});
document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-form").addEventListener("submit", login);
  // The skip link moves focus; it must not change the hash, which holds the route.
  document.querySelector(".skip").addEventListener("click", (event) => {
    event.preventDefault();
    view().focus();
  });
  document.getElementById("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    state.resources = null;
    state.object = null;
    showLogin("Token forgotten.");
  });
  window.addEventListener("hashchange", route);
  route();
});
