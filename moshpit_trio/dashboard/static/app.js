// The dashboard page: polls /api/... and draws. Every value from the swarm goes into the DOM
// as text (textContent, attribute values), never as HTML.
"use strict";

const POLL_MS = 2000;
const PAGE = 50;
const state = { offset: 0, sort: "samples", order: "desc", q: "", filter: "", total: 0 };

const $ = (id) => document.getElementById(id);

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

const isNum = (x) => typeof x === "number" && Number.isFinite(x);
const int = (x) => (isNum(x) ? Math.round(x).toLocaleString("en-US") : "–");
const plural = (n, word) => int(n) + " " + word + (n === 1 ? "" : "s");

function si(x, digits = 3) {
  if (!isNum(x)) return "–";
  const a = Math.abs(x);
  for (const [f, s] of [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
    if (a >= f) return (x / f).toPrecision(digits) + s;
  }
  return a >= 100 || a === 0 ? x.toFixed(0) : x.toPrecision(digits);
}

function bytes(x) {
  if (!isNum(x)) return "–";
  return si(x) + "B";
}

function duration(s) {
  if (!isNum(s)) return "–";
  if (s < 60) return s.toFixed(0) + " s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + "m " + String(Math.floor(s % 60)).padStart(2, "0") + "s";
  const h = Math.floor(m / 60);
  return h + "h " + String(m % 60).padStart(2, "0") + "m";
}

function short(id) {
  return typeof id === "string" ? id.slice(0, 10) : "?";
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

// -- the cards ---------------------------------------------------------------------------

function renderSummary(s) {
  $("run").textContent = s.run;
  const p = s.peers;
  $("live-peers").textContent = int(p.live);
  const parts = [int(p.trainers) + " publishing progress", plural(p.daemons, "daemon")];
  if (p.client_mode) parts.push(int(p.client_mode) + " client mode" + (p.relayed ? " (" + int(p.relayed) + " relayed)" : ""));
  if (p.suspect) parts.push(int(p.suspect) + " suspect");
  if (p.malformed) parts.push(int(p.malformed) + " malformed");
  $("peer-breakdown").textContent = parts.join(" · ");
  $("samples").textContent = int(s.samples);
  $("samples-rate").textContent = si(s.samples_per_s) + " samples/s";
  $("epoch").textContent = isNum(s.epoch) ? String(s.epoch) : "–";
  $("loss").textContent = isNum(s.loss) ? s.loss.toPrecision(4) : "–";
  const last = s.last_round;
  $("last-round").textContent = last ? "#" + last.round : "–";
  $("last-round-sub").textContent = last
    ? plural(last.groups, "group") + ", " + plural(last.peers, "peer") + (last.solo ? ", " + int(last.solo) + " solo" : "")
    : "no round yet";
  const age = isNum(s.updated) ? Math.max(0, s.now - s.updated) : null;
  const fresh = $("freshness");
  fresh.textContent = (age === null ? "no read of the swarm yet" : "read from the DHT " + age.toFixed(0) + " s ago")
    + (s.read_error ? " · last read failed: " + s.read_error : "");
  fresh.className = s.read_error ? "warn" : "muted";
}

// -- the charts --------------------------------------------------------------------------

function drawChart(node, points, key, options) {
  const W = 420, H = 160, L = 48, R = 8, T = 10, B = 22;
  while (node.firstChild) node.removeChild(node.firstChild);
  const data = points.filter((p) => isNum(p[key]) && isNum(p.t));
  node.setAttribute("data-points", String(data.length));
  if (data.length === 0) {
    node.appendChild(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" })).textContent = "no data yet";
    return;
  }
  const t0 = data[0].t, t1 = data[data.length - 1].t;
  let lo = Math.min(...data.map((p) => p[key])), hi = Math.max(...data.map((p) => p[key]));
  if (options.zero) lo = Math.min(0, lo);
  if (hi === lo) { hi += 1; lo -= options.zero && lo <= 0 ? 0 : 1; }
  const x = (t) => L + (t1 === t0 ? (W - L - R) / 2 : ((t - t0) / (t1 - t0)) * (W - L - R));
  const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  node.appendChild(svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  node.appendChild(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  const fmt = options.format || si;
  node.appendChild(svg("text", { x: L - 4, y: T + 8, "text-anchor": "end", class: "tick" })).textContent = fmt(hi);
  node.appendChild(svg("text", { x: L - 4, y: H - B, "text-anchor": "end", class: "tick" })).textContent = fmt(lo);
  node.appendChild(svg("text", { x: W - R, y: H - 6, "text-anchor": "end", class: "tick" })).textContent =
    "last " + duration(t1 - t0);
  const line = data.map((p) => x(p.t).toFixed(1) + "," + y(p[key]).toFixed(1)).join(" ");
  node.appendChild(svg("polyline", { points: line, class: "line " + (options.cls || "") }));
  if (options.dots) {
    for (const p of data) {
      const dot = svg("circle", { cx: x(p.t).toFixed(1), cy: y(p[key]).toFixed(1), r: 2.5, class: "point " + (options.cls || "") });
      dot.appendChild(svg("title")).textContent = fmt(p[key]) + " at " + new Date(p.t * 1000).toLocaleTimeString();
      node.appendChild(dot);
    }
  }
}

function renderHistory(h) {
  // The loss curve: one point per distinct value the swarm published (consecutive repeats of
  // the same reading are one point), so its dots are the swarm's own updates.
  const lossPoints = [];
  for (const p of h.points) {
    const last = lossPoints[lossPoints.length - 1];
    if (isNum(p.loss) && !(last && last.loss === p.loss)) lossPoints.push(p);
  }
  drawChart($("loss-chart"), lossPoints, "loss", { dots: true, cls: "loss", format: (v) => v.toPrecision(3) });
  drawChart($("peers-chart"), h.points, "live", { zero: true, cls: "peers", format: (v) => v.toFixed(0) });
  drawChart($("samples-chart"), h.points, "samples", { zero: true, cls: "samples" });
}

// -- the peers table ---------------------------------------------------------------------

// A table cell; its first class names the column (tests and stylesheets find cells by it).
function cell(text, cls, title) {
  const td = el("td", text, cls ? { class: cls } : {});
  if (title) td.title = title;
  return td;
}

// How others reach a peer: directly ("public"), through relays (a client-mode peer holding
// reservations), or not at all (client mode without a relay: it only dials out); a relay's own
// load goes on a second line.
function reachableCell(p) {
  if (p.client_mode === null) return cell("–", "mode");
  const td = el("td", p.client_mode ? "client mode" : "public", { class: "mode" });
  let more = null;
  if (p.client_mode && isNum(p.relays)) more = p.relays ? "relayed (" + plural(p.relays, "relay") + ")" : "no relay";
  const r = p.relaying;
  if (r) more = "relay for " + int(r.reservations) + ", " + plural(r.circuits, "circuit");
  if (more) td.appendChild(el("div", more, { class: "detail" }));
  return td;
}

function peerRow(p) {
  const tr = el("tr", null, { "data-peer": p.peer_id, class: "peer-row state-" + p.state });
  tr.appendChild(cell(short(p.peer_id), "peer mono", p.peer_id + (p.address ? "\n" + p.address : "")));
  const st = el("td", null, { class: "state" });
  st.appendChild(el("span", p.state, { class: "badge " + p.state }));
  if (p.kind === "daemon") st.appendChild(el("span", " daemon", { class: "muted" }));
  for (const problem of p.problems) st.appendChild(el("div", problem, { class: "problem" }));
  tr.appendChild(st);
  const samples = cell(int(p.samples), "samples num");
  if (isNum(p.samples)) samples.setAttribute("data-value", String(p.samples));
  tr.appendChild(samples);
  tr.appendChild(cell(si(p.samples_per_s), "rate num"));
  tr.appendChild(cell(isNum(p.epoch) ? String(p.epoch) : "–", "epoch num"));
  tr.appendChild(cell(isNum(p.loss) ? p.loss.toPrecision(4) : "–", "loss num"));
  const r = p.rounds;
  const rounds = cell(r ? r.done + " / " + r.partial + " / " + r.solo : "–", "rounds num");
  if (r) rounds.setAttribute("data-value", String(r.done + r.partial + r.solo));
  tr.appendChild(rounds);
  tr.appendChild(cell(bytes(p.bytes_sent) + " / " + bytes(p.bytes_received), "bytes num"));
  tr.appendChild(cell(duration(p.uptime_s), "uptime num"));
  tr.appendChild(reachableCell(p));
  const last = p.last_round;
  tr.appendChild(cell(last ? "#" + last.round + (last.group ? " · " + last.group.slice(0, 6) : " · solo") + " · " + last.size : "–", "last-round mono"));
  const s = p.status;
  const status = el("td", s ? s.outcome : "–", { class: "status" });
  if (s && s.report) status.appendChild(el("span", " · v" + s.report.version + " · " + s.report.connections + " connections", { class: "muted" }));
  if (s && s.detail) status.appendChild(el("div", s.detail, { class: "detail" }));
  tr.appendChild(status);
  return tr;
}

function renderPeers(page) {
  state.total = page.total;
  const body = $("peers").tBodies[0];
  const rows = page.peers.map(peerRow);
  body.replaceChildren(...rows);
  if (rows.length === 0) {
    const td = el("td", state.q || state.filter ? "no peer matches" : "no live peer yet", { colspan: 12, class: "muted" });
    body.appendChild(el("tr")).appendChild(td);
  }
  const first = page.total ? page.offset + 1 : 0;
  $("page-info").textContent = first + "–" + (page.offset + page.peers.length) + " of " + int(page.total);
  $("prev").disabled = page.offset === 0;
  $("next").disabled = page.offset + page.limit >= page.total;
  for (const th of $("peers").tHead.rows[0].cells) {
    th.classList.toggle("sorted", th.dataset.sort === state.sort);
    th.classList.toggle("asc", th.dataset.sort === state.sort && state.order === "asc");
  }
}

// -- groups and leaderboard --------------------------------------------------------------

function renderGroups(g) {
  const list = $("groups");
  if (g.round === null) {
    $("groups-summary").textContent = "no round reported yet";
    list.replaceChildren();
    return;
  }
  const sizes = Object.entries(g.sizes).map(([size, n]) => n + "× " + size).join(", ");
  $("groups-summary").textContent = "round #" + g.round + ": " + plural(g.total_groups, "group") + " (" + (sizes || "none") + ")"
    + (g.solo ? ", " + int(g.solo) + " solo" : "") + (g.behind ? ", " + plural(g.behind, "peer") + " on an earlier round" : "");
  list.replaceChildren(...g.groups.map((group) => {
    const li = el("li", null, { class: "group" });
    li.appendChild(el("span", group.group.slice(0, 8), { class: "mono tag" }));
    li.appendChild(el("span", " " + group.size + " members: "));
    li.appendChild(el("span", group.members.map(short).join(", "), { class: "mono" }));
    return li;
  }));
  if (g.total_groups > g.groups.length) list.appendChild(el("li", "… and " + (g.total_groups - g.groups.length) + " more", { class: "muted" }));
}

function renderLeaderboard(b) {
  const body = $("leaderboard").tBodies[0];
  body.replaceChildren(...b.entries.map((e) => {
    const tr = el("tr", null, { "data-peer": e.peer_id });
    tr.appendChild(cell(String(e.rank), "rank num"));
    tr.appendChild(cell(short(e.peer_id), "peer mono", e.peer_id));
    tr.appendChild(cell(int(e.samples), "samples num"));
    tr.appendChild(cell(int(e.rounds_averaged), "rounds num"));
    tr.appendChild(cell(e.live ? "live" : "gone", e.live ? "live" : "live muted"));
    return tr;
  }));
}

// -- polling -----------------------------------------------------------------------------

let timer = null;

async function poll() {
  clearTimeout(timer);
  const q = new URLSearchParams({ offset: state.offset, limit: PAGE, sort: state.sort, order: state.order, q: state.q, state: state.filter });
  try {
    const [summary, history, peers, groups, board] = await Promise.all([
      getJSON("/api/swarm"),
      getJSON("/api/history?points=300"),
      getJSON("/api/peers?" + q.toString()),
      getJSON("/api/groups?limit=20"),
      getJSON("/api/leaderboard?limit=20"),
    ]);
    renderSummary(summary);
    renderHistory(history);
    renderPeers(peers);
    renderGroups(groups);
    renderLeaderboard(board);
    document.body.dataset.updated = String(summary.now);
  } catch (error) {
    const fresh = $("freshness");
    fresh.textContent = "cannot reach the dashboard server: " + error.message + " (retrying)";
    fresh.className = "warn";
  }
  timer = setTimeout(poll, POLL_MS);
}

function start() {
  for (const th of $("peers").tHead.rows[0].cells) {
    if (!th.dataset.sort) continue;
    th.addEventListener("click", () => {
      if (state.sort === th.dataset.sort) state.order = state.order === "desc" ? "asc" : "desc";
      else { state.sort = th.dataset.sort; state.order = th.dataset.sort === "peer_id" ? "asc" : "desc"; }
      state.offset = 0;
      poll();
    });
  }
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); poll(); });
  $("next").addEventListener("click", () => { if (state.offset + PAGE < state.total) { state.offset += PAGE; poll(); } });
  $("filter").addEventListener("input", (e) => { state.q = e.target.value.trim(); state.offset = 0; poll(); });
  $("state-filter").addEventListener("change", (e) => { state.filter = e.target.value; state.offset = 0; poll(); });
  poll();
}

document.addEventListener("DOMContentLoaded", start);
