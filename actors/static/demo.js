// intentrec live shop: a shopper's session against the public API, re-ranked after every event.
// Plain browser JavaScript, no build step. API calls are relative to where the page is served.
"use strict";

const BASE = location.pathname.replace(/\/demo\/?$/, "");
const $ = (id) => document.getElementById(id);
const state = {
  session: newSessionId(), shelfRequest: null, recsRequest: null, previous: new Map(),
  category: null, query: null, cart: 0, generation: 0,
};

function newSessionId() {
  const rnd = crypto.getRandomValues(new Uint32Array(2));
  return "demo-" + rnd[0].toString(36) + rnd[1].toString(36);
}

function intentLabel(category) {
  return category.split(">").slice(0, 2).map((p) => p.trim()).join(" > ");
}

function setStatus(text, error = false) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("error", error);
}

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) headers["X-API-Key"] = key;
  const r = await fetch(BASE + path, { method, headers, body: body ? JSON.stringify(body) : undefined });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const err = new Error(data.message || `${r.status} ${r.statusText}`);
    err.status = r.status;
    throw err;
  }
  return data;
}

// ---------------------------------------------------------------- context (time picker, device)
function pad(n) { return String(n).padStart(2, "0"); }
function localInput(d) {
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}
function nextWeekday(day, hour) {
  const d = new Date();
  d.setDate(d.getDate() + ((day - d.getDay() + 7) % 7 || 7));
  d.setHours(hour, 0, 0, 0);
  return d;
}
const PRESETS = {
  now: () => new Date(),
  saturday: () => nextWeekday(6, 10),
  weeknight: () => nextWeekday(3, 20),
  christmas: () => new Date(new Date().getFullYear(), 11, 25, 11, 0),
  july4: () => new Date(new Date().getFullYear(), 6, 4, 13, 0),
};

function context() {
  const ctx = { device: $("device").value, country: "US" };
  const tz = Intl.DateTimeFormat().resolvedOptions().timeZone;
  if (tz) ctx.timezone = tz;
  const when = $("when").value;
  if (when) ctx.ts = new Date(when).toISOString();
  return ctx;
}

function who() {
  const user = $("shopper").value;
  return user ? { user_id: user, session_id: state.session } : { session_id: state.session };
}

// ---------------------------------------------------------------- departments and search
async function loadCatalogue() {
  const cat = await api("GET", "/v1/catalogue");
  const list = $("dept-list");
  list.replaceChildren();
  for (const dept of cat.departments) {
    const d = document.createElement("details");
    const s = document.createElement("summary");
    s.textContent = `${dept.department} (${dept.items})`;
    d.append(s);
    for (const c of dept.categories) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "cat";
      b.dataset.category = c.category;
      b.append(c.category.split(">").slice(1).join(">").trim() || c.category, " ");
      const small = document.createElement("small");
      small.textContent = `(${c.items})`;
      b.append(small);
      b.addEventListener("click", () => browse(c.category, null));
      d.append(b);
    }
    list.append(d);
  }
  return cat;
}

async function loadShoppers() {
  try {
    const out = await api("GET", "/v1/catalogue/shoppers");
    const sel = $("shopper");
    const keep = sel.value;
    sel.replaceChildren(new Option("anonymous", ""));
    for (const u of out.users) sel.append(new Option(`shopper ${u}`, u));
    sel.value = out.users.includes(keep) ? keep : "";
  } catch (e) {
    // Without the client key the page still works for an anonymous session.
    setStatus(`known shoppers need the client key (${e.message}); browsing anonymously`);
  }
}

async function browse(category, query) {
  state.category = category;
  state.query = query;
  for (const b of document.querySelectorAll(".cat")) b.classList.toggle("active", b.dataset.category === category);
  $("shelf-title").textContent = category ? category : query ? `Search: ${query}` : "Popular now";
  if (query) await postEvent({ event: "search", query });
  await refreshShelf();
}

async function refreshShelf() {
  const body = { ...who(), k: 24, context: context() };
  if (state.category) body.category = state.category;
  if (state.query) body.query = state.query;
  const out = await api("POST", "/v1/recommendations", body);
  state.shelfRequest = out.request_id;
  const shelf = $("shelf");
  shelf.replaceChildren();
  shelf.dataset.category = state.category || "";
  for (const it of out.items) shelf.append(card(it, out.request_id));
}

function card(it, requestId) {
  const c = document.createElement("div");
  c.className = "card";
  c.dataset.itemId = it.item_id;
  c.dataset.category = intentLabel(it.category);
  const t = document.createElement("div");
  t.className = "title";
  t.textContent = it.title;
  t.addEventListener("click", () => act("click", it, requestId));
  const p = document.createElement("div");
  p.className = "cat-path";
  p.textContent = it.category;
  const row = document.createElement("div");
  row.className = "row";
  const price = document.createElement("span");
  price.className = "price";
  price.textContent = it.price == null ? "" : `$${it.price.toFixed(2)}`;
  const add = document.createElement("button");
  add.type = "button";
  add.className = "add";
  add.textContent = "add to cart";
  add.addEventListener("click", () => act("add_to_cart", it, requestId));
  row.append(price, add);
  c.append(t, p, row);
  return c;
}

// ---------------------------------------------------------------- events
async function postEvent(ev, label) {
  const out = await api("POST", "/v1/events", { ...who(), ...ev });
  const a = out.events[0].attributed;
  const li = document.createElement("li");
  const what = ev.item_id ? `${ev.event} ${label || ev.item_id}` : `${ev.event} "${ev.query}"`;
  li.textContent = `${new Date().toLocaleTimeString()}  ${what}` +
    (a ? `  ← ${a.model_version}, position ${a.position ?? "–"}` : "");
  $("log").prepend(li);
  return out;
}

async function act(event, it, requestId) {
  try {
    await postEvent({ event, item_id: it.item_id, from_request: requestId }, it.title);
    if (event === "add_to_cart") $("cart-count").textContent = String(++state.cart);
    await refreshRecs();
  } catch (e) {
    setStatus(e.message, true);
  }
}

// ---------------------------------------------------------------- recommendations
async function refreshRecs() {
  const out = await api("POST", "/v1/recommendations", { ...who(), k: 20, context: context() });
  state.recsRequest = out.request_id;
  renderRecs(out);
  const ctx = out.context;
  $("context").textContent = `${ctx.weekday} ${ctx.local_time.slice(11, 16)} · ${ctx.season}` +
    (ctx.holiday ? ` · ${ctx.holiday}` : "") + ` · ${ctx.device} · ${ctx.country}`;
  $("meta").textContent = `model ${out.model_version} · ${out.user_known ? "known shopper" : "new/anonymous shopper"}` +
    ` · ${out.session_events} session events · request ${out.request_id.slice(0, 8)}`;
  const intent = $("intent");
  intent.replaceChildren();
  const top = out.intent.length ? out.intent[0].weight : 1;
  for (const c of out.intent) {
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.dataset.category = c.category;
    const fill = document.createElement("i");
    fill.style.width = `${Math.round((100 * c.weight) / top)}%`;
    const label = document.createElement("span");
    label.textContent = `${c.category} ${(100 * c.weight).toFixed(0)}%`;
    bar.append(fill, label);
    intent.append(bar);
  }
  if (!out.intent.length) intent.textContent = "no session intent yet: click or add items";
  setStatus(`ready · ${BASE || "/"} · session ${state.session}`);
}

function renderRecs(out) {
  const list = $("recs");
  const positions = new Map();
  list.replaceChildren();
  out.items.forEach((it, n) => {
    positions.set(it.item_id, n + 1);
    const before = state.previous.get(it.item_id);
    const li = document.createElement("li");
    li.className = "rec";
    li.dataset.itemId = it.item_id;
    li.dataset.category = intentLabel(it.category);
    const move = document.createElement("span");
    move.className = "move";
    if (state.generation > 0 && before === undefined) { li.classList.add("new"); move.textContent = "new"; }
    else if (before > n + 1) { li.classList.add("up"); move.textContent = `▲${before - n - 1}`; }
    else if (before < n + 1) { li.classList.add("down"); move.textContent = `▼${n + 1 - before}`; }
    const pos = document.createElement("span");
    pos.className = "pos";
    pos.textContent = String(n + 1);
    const body = document.createElement("div");
    const t = document.createElement("div");
    t.className = "title";
    t.textContent = it.title;
    t.addEventListener("click", () => act("click", it, out.request_id));
    const p = document.createElement("div");
    p.className = "cat-path";
    p.textContent = `${it.category}${it.price == null ? "" : ` · $${it.price.toFixed(2)}`}`;
    body.append(t, p);
    const reasons = document.createElement("ul");
    reasons.className = "reasons";
    for (const r of it.reasons) {
      const rli = document.createElement("li");
      rli.textContent = r;
      reasons.append(rli);
    }
    li.append(pos, body, move, reasons);
    list.append(li);
  });
  state.previous = positions;
  state.generation += 1;
  list.dataset.generation = String(state.generation);
}

// ---------------------------------------------------------------- wiring
async function reload() {
  try {
    await refreshShelf();
    await refreshRecs();
  } catch (e) {
    setStatus(e.message, true);
  }
}

function startSession() {
  state.session = newSessionId();
  state.previous = new Map();
  state.generation = 0;
  state.cart = 0;
  $("cart-count").textContent = "0";
  $("log").replaceChildren();
  $("session-id").textContent = state.session;
}

async function main() {
  $("key").value = sessionStorage.getItem("intentrec-key") || "";
  $("key").addEventListener("change", async () => {
    sessionStorage.setItem("intentrec-key", $("key").value.trim());
    await loadShoppers();
    await reload();
  });
  $("shopper").addEventListener("change", () => { startSession(); reload(); });
  $("device").addEventListener("change", reload);
  $("when").addEventListener("change", reload);
  for (const b of document.querySelectorAll("[data-preset]")) {
    b.addEventListener("click", () => {
      $("when").value = b.dataset.preset === "now" ? "" : localInput(PRESETS[b.dataset.preset]());
      reload();
    });
  }
  $("new-session").addEventListener("click", () => { startSession(); reload(); });
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("search").value.trim();
    browse(null, q || null).then(refreshRecs).catch((err) => setStatus(err.message, true));
  });
  $("session-id").textContent = state.session;
  try {
    await loadCatalogue();
    if ($("key").value) await loadShoppers();
  } catch (e) {
    setStatus(e.message, true);
    return;
  }
  await reload();
}

main();
