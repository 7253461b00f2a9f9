// The sink's web UI: plain JavaScript over the JSON API (/api/openapi.json).
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { offset: 0, limit: 50, total: 0, query: "", selected: null, tab: "html",
                remote: false, info: null, known: new Set(), loaded: false };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

// Absolute URLs from location.origin, which has no user:password@ even when the page's
// address does (a URL with credentials cannot be fetched).
const url = (path) => location.origin + path;

async function api(path, options) {
  const response = await fetch(url(path), options);
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) throw new Error((body && body.error) || response.statusText);
  return body;
}

function when(iso) {
  const d = new Date(iso);
  const today = new Date();
  return d.toDateString() === today.toDateString()
    ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" })
    : d.toLocaleString();
}

function size(n) {
  if (n < 1024) return n + " B";
  if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1048576).toFixed(1) + " MiB";
}

// "invoice to:bob from:alice since:2026-12-01" -> query parameters
function searchParams(text) {
  const params = new URLSearchParams();
  const words = [];
  for (const token of text.match(/(?:[^\s"]+|"[^"]*")+/g) || []) {
    const m = token.match(/^(to|from|since|before):(.+)$/i);
    if (m) params.set(m[1].toLowerCase(), m[2].replace(/^"|"$/g, ""));
    else words.push(token);
  }
  if (words.length) params.set("q", words.join(" "));
  return params;
}

async function loadList() {
  const params = searchParams(state.query);
  params.set("limit", state.limit);
  params.set("offset", state.offset);
  let page;
  try {
    page = await api("/api/v1/messages?" + params.toString());
  } catch (e) {
    $("#count").textContent = e.message;
    return;
  }
  state.total = page.total;
  const list = $("#list");
  list.replaceChildren();
  for (const m of page.messages) {
    const who = m.from || m.sender || "(no sender)";
    const subject = m.subject || "(no subject)";
    const li = el("li", { "data-id": m.id, tabindex: "0" },
      el("div", { class: "row1" }, el("span", { class: "from", text: who }),
         el("span", { class: "when", text: when(m.received) })),
      el("div", { class: "subject" + (m.has_attachments ? " clip" : ""), text: subject }),
      el("div", { class: "snippet", text: "To " + m.recipients.join(", ") + " — " + m.snippet }));
    if (state.loaded && !state.known.has(m.id)) li.classList.add("new");
    if (m.id === state.selected) li.classList.add("selected");
    li.addEventListener("click", () => openMessage(m.id));
    li.addEventListener("keydown", (e) => { if (e.key === "Enter") openMessage(m.id); });
    list.append(li);
    state.known.add(m.id);
  }
  state.loaded = true;
  $("#count").textContent = page.total === 1 ? "1 message" : page.total + " messages";
  const last = Math.min(state.offset + page.messages.length, page.total);
  $("#page-info").textContent = page.total ? `${state.offset + 1}–${last} of ${page.total}` : "";
  $("#prev").disabled = state.offset === 0;
  $("#next").disabled = state.offset + page.limit >= page.total;
}

function showTab(name) {
  state.tab = name;
  for (const b of document.querySelectorAll("#tabs button"))
    b.classList.toggle("active", b.dataset.tab === name);
  for (const p of document.querySelectorAll(".tab"))
    p.classList.toggle("active", p.id === "pane-" + name);
  if (name === "raw" && state.selected !== null && !$("#raw-body").dataset.loaded) loadRaw();
}

async function loadRaw() {
  const id = state.selected;
  const text = await api(`/api/v1/messages/${id}/raw`);
  if (state.selected !== id) return;
  $("#raw-body").textContent = text;
  $("#raw-body").dataset.loaded = "1";
}

function frameSource() {
  return url(`/api/v1/messages/${state.selected}/html`) + (state.remote ? "?remote=1" : "");
}

function renderAuth(fields) {
  const box = $("#auth-results");
  box.replaceChildren();
  if (!fields.length) {
    box.append(el("p", { class: "muted", text: "This message has no Authentication-Results." }));
    return;
  }
  for (const f of fields) {
    if (f.error) {
      box.append(el("p", { class: "authserv", text: "Unreadable field: " + f.error }),
                 el("pre", { text: f.raw }));
      continue;
    }
    box.append(el("p", { class: "authserv", text: "Checked by " + f.authserv_id }));
    const table = el("table", { class: "authres" },
      el("tr", {}, el("th", { text: "Check" }), el("th", { text: "Result" }),
         el("th", { text: "Details" })));
    if (!f.results.length) table.append(el("tr", {}, el("td", { text: "none" }),
                                            el("td", {}), el("td", {})));
    for (const r of f.results) {
      const props = Object.entries(r.properties).map(([k, v]) => `${k}=${v}`).join("  ");
      const details = el("td", {});
      if (r.reason) details.append(el("div", { text: r.reason }));
      if (props) details.append(el("div", { class: "props", text: props }));
      if (r.comment) details.append(el("div", { class: "muted", text: r.comment }));
      table.append(el("tr", {}, el("td", { text: r.method.toUpperCase() }),
        el("td", {}, el("span", { class: "badge " + r.result, text: r.result })), details));
    }
    box.append(table);
  }
}

async function openMessage(id) {
  state.selected = id;
  for (const li of document.querySelectorAll("#list li"))
    li.classList.toggle("selected", Number(li.dataset.id) === id);
  let m;
  try {
    m = await api(`/api/v1/messages/${id}`);
  } catch (e) {
    closeMessage();
    return;
  }
  if (state.selected !== id) return;
  $("#empty-pane").hidden = true;
  $("#message-pane").hidden = false;
  $("#message-subject").textContent = m.subject || "(no subject)";
  const meta = $("#message-meta");
  meta.replaceChildren();
  const rows = [["From", m.from || m.sender], ["To", m.to], ["Envelope", `${m.sender || "<>"} → ${m.recipients.join(", ")}`],
                ["Received", new Date(m.received).toLocaleString()], ["Size", size(m.size)]];
  for (const [k, v] of rows) if (v) meta.append(el("dt", { text: k }), el("dd", { text: v }));
  $("#download-raw").href = `/api/v1/messages/${id}/raw?download=1`;
  $("#release-form").hidden = true;
  $("#release-result").textContent = "";
  $("#text-body").textContent = m.text === null ? "(no text part)" : m.text;
  const headers = $("#headers-table");
  headers.replaceChildren();
  for (const [name, value] of m.headers)
    headers.append(el("tr", {}, el("td", { text: name }), el("td", { text: value })));
  renderAuth(m.authentication_results);
  const attachments = $("#attachments");
  attachments.replaceChildren();
  for (const a of m.attachments) {
    const link = el("a", { href: `/api/v1/messages/${id}/parts/${a.index}`, download: a.filename || "" ,
                           text: a.filename || `part ${a.index}` });
    attachments.append(el("li", {}, link, ` ${a.content_type}, ${size(a.size)}` +
                          (a.disposition === "inline" ? " (inline)" : "")));
  }
  if (!m.attachments.length) attachments.append(el("li", { class: "muted", text: "No attachments." }));
  $("#tab-attachments").textContent = `Attachments (${m.attachments.length})`;
  $("#raw-body").textContent = "";
  delete $("#raw-body").dataset.loaded;
  const frame = $("#html-frame");
  $("#no-html").hidden = m.html;
  frame.hidden = !m.html;
  $("#remote-label").hidden = !m.html;
  $("#remote-note").hidden = !m.html || state.remote;
  frame.src = m.html ? frameSource() : "about:blank";
  showTab(m.html || state.tab !== "html" ? state.tab : "text");
}

function closeMessage() {
  state.selected = null;
  $("#message-pane").hidden = true;
  $("#empty-pane").hidden = false;
  $("#html-frame").src = "about:blank";
}

let reloadTimer = null;
function scheduleReload() {
  clearTimeout(reloadTimer);
  reloadTimer = setTimeout(loadList, 150);
}

function listen() {
  const source = new EventSource(url("/api/v1/events"));
  source.onopen = () => $("#live").classList.add("on");
  source.onerror = () => $("#live").classList.remove("on");
  for (const type of ["stored", "overflow"]) source.addEventListener(type, scheduleReload);
  source.addEventListener("deleted", (e) => {
    const event = JSON.parse(e.data);
    if (event.id === state.selected) closeMessage();
    scheduleReload();
  });
  source.addEventListener("cleared", () => { closeMessage(); scheduleReload(); });
}

async function start() {
  try {
    state.info = await api("/api/v1/info");
    state.limit = state.info.page_size;
    document.body.classList.toggle("read-only", state.info.read_only);
  } catch (e) {
    $("#count").textContent = e.message;
  }
  $("#search-form").addEventListener("submit", (e) => { e.preventDefault(); });
  let searchTimer = null;
  $("#search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => { state.query = $("#search").value.trim(); state.offset = 0; loadList(); }, 250);
  });
  $("#prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); loadList(); });
  $("#next").addEventListener("click", () => { state.offset += state.limit; loadList(); });
  for (const b of document.querySelectorAll("#tabs button"))
    b.addEventListener("click", () => showTab(b.dataset.tab));
  $("#remote-toggle").addEventListener("change", (e) => {
    state.remote = e.target.checked;
    $("#remote-note").hidden = state.remote;
    if (state.selected !== null) $("#html-frame").src = frameSource();
  });
  $("#delete-btn").addEventListener("click", async () => {
    const id = state.selected;
    if (id === null) return;
    await api(`/api/v1/messages/${id}`, { method: "DELETE" });
    closeMessage();
    loadList();
  });
  $("#clear-btn").addEventListener("click", async () => {
    if (!confirm("Delete every message?")) return;
    await api("/api/v1/clear", { method: "POST" });
    closeMessage();
    loadList();
  });
  $("#release-btn").addEventListener("click", () => {
    $("#release-form").hidden = !$("#release-form").hidden;
    $("#release-to").focus();
  });
  $("#release-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const to = $("#release-to").value.split(",").map((s) => s.trim()).filter(Boolean);
    try {
      const r = await api(`/api/v1/messages/${state.selected}/release`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ to }) });
      $("#release-result").textContent = "Queued as " + r.queue_id;
    } catch (err) {
      $("#release-result").textContent = err.message;
    }
  });
  showTab("html");
  listen();
  await loadList();
}

document.addEventListener("DOMContentLoaded", start);
