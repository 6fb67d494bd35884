// Start-up, sign-in, screens (hash routing), the live event stream and the offline banner.

import { api, byTestId, describeError, el, onSignInRequired, say } from "/api.js";
import { loadDrops, loadMesh, loadProducts, loadStatus, loadStock, metrics, state, subscribe } from "/store.js";
import { initDrops } from "/drops.js";
import { initTill, loadRecent, showTill } from "/till.js";
import { refreshCard } from "/card.js";
import { initStock, showStock } from "/stock.js";
import { initMesh, refreshMesh, showMesh } from "/mesh.js";
import { showKpis } from "/kpis.js";
import { initLoyalty, showLoyalty } from "/loyalty.js";

/** Retry the start-up when the node did not answer (it may be starting). */
const BOOT_RETRY_MS = 2000;
/** Reopen the event stream when the browser gave up on it (the node refused or restarted). */
const STREAM_RETRY_MS = 3000;

const $ = (id) => byTestId(id);
const SCREENS = { till: showTill, stock: showStock, mesh: showMesh, kpis: showKpis, loyalty: showLoyalty };
let started = false;

// Every click on a button counts as a tap (capture: counted even if a handler stops it).
document.addEventListener(
  "click",
  (e) => {
    if (e.target instanceof Element && e.target.closest("button")) metrics.taps += 1;
  },
  true,
);

// ---- sign-in

async function boot() {
  onSignInRequired(() => showSignIn());
  let session;
  try {
    session = await api("/api/v1/session");
  } catch (err) {
    if (err.status !== 404) {
      say($("signin-error"), `${describeError(err)} Retrying…`, "error");
      setTimeout(boot, BOOT_RETRY_MS);
      return;
    }
    session = { required: false, signed_in: false, staff: null, staff_names: [] };
  }
  if (session.required && !session.signed_in) showSignIn(session);
  else startApp(session);
}

async function showSignIn(session) {
  closeEvents();
  document.getElementById("topbar").hidden = true;
  $("offline-banner").hidden = true;
  for (const name of Object.keys(SCREENS)) $(`screen-${name}`).hidden = true;
  $("screen-signin").hidden = false;
  if (!session) {
    try {
      session = await api("/api/v1/session");
    } catch {
      session = { staff_names: [] };
    }
  }
  const select = $("signin-staff");
  const chosen = select.value;
  select.replaceChildren(...(session.staff_names || []).map((n) => el("option", { value: n, text: n })));
  if ((session.staff_names || []).includes(chosen)) select.value = chosen;
  $("signin-pin").focus();
}

async function signIn(e) {
  e.preventDefault();
  const button = $("signin-submit");
  const pin = $("signin-pin");
  button.disabled = true;
  say($("signin-error"), "");
  try {
    const answer = await api("/api/v1/session", { method: "POST", json: { staff: $("signin-staff").value, pin: pin.value } });
    pin.value = "";
    startApp({ required: true, signed_in: true, staff: answer.staff });
  } catch (err) {
    pin.value = "";
    say($("signin-error"), describeError(err), "error");
    pin.focus();
  } finally {
    button.disabled = false;
  }
}

async function signOut() {
  try {
    await api("/api/v1/session", { method: "DELETE" });
  } catch {
    // Reloading shows whatever the node now says.
  }
  location.reload();
}

// ---- the app

function startApp(session) {
  state.session = session;
  $("screen-signin").hidden = true;
  document.getElementById("topbar").hidden = false;
  $("staff-name").textContent = session.staff || "";
  $("staff-name").hidden = !session.staff;
  $("signout").hidden = !session.signed_in;
  if (!started) {
    started = true;
    initTill({ refreshSoon });
    initStock();
    initDrops();
    initMesh();
    initLoyalty();
    subscribe("mesh", updateLiveness);
    subscribe("status", () => {
      $("market-name").textContent = state.status?.node?.market_name || "";
    });
  }
  connectEvents();
  refreshSoon(["all"]);
  route();
}

function currentScreen() {
  const name = location.hash.slice(1);
  return Object.hasOwn(SCREENS, name) ? name : "till";
}

function route() {
  if (!started || !$("screen-signin").hidden) return;
  const current = currentScreen();
  for (const name of Object.keys(SCREENS)) {
    $(`screen-${name}`).hidden = name !== current;
    $(`nav-${name}`).setAttribute("aria-current", name === current ? "page" : "false");
  }
  SCREENS[current]();
}

// ---- refreshes, coalesced to at most one per REFRESH_MS

const REFRESH_MS = 100;
const pending = new Set();
let refreshTimer = 0;
let lastRefresh = -Infinity;

/** Reloads what `kinds` of commit (sale, stock, product, photo, loyalty, mesh, other; or all) touched. */
export function refreshSoon(kinds) {
  for (const k of kinds) pending.add(k);
  if (refreshTimer) return;
  const wait = Math.max(0, lastRefresh + REFRESH_MS - performance.now());
  refreshTimer = setTimeout(runRefresh, wait);
}

async function runRefresh() {
  refreshTimer = 0;
  lastRefresh = performance.now();
  const kinds = new Set(pending);
  pending.clear();
  const any = (...ks) => kinds.has("all") || ks.some((k) => kinds.has(k));
  const screen = currentScreen();
  const jobs = [];
  if (any("product", "photo")) jobs.push(loadProducts());
  if (any("sale", "stock", "product", "mesh", "other")) jobs.push(loadStock());
  if (any("sale")) jobs.push(loadRecent());
  // A drop's units move with sales and transfers (stock), and a new one arrives as a `drop` commit.
  if (any("drop", "sale", "stock")) jobs.push(loadDrops());
  if (any("mesh", "other") || screen === "mesh") jobs.push(loadMesh(), loadStatus());
  if (any("loyalty", "sale")) refreshCard();
  if (screen === "kpis" && any("sale", "product", "drop", "stock")) jobs.push(showKpis());
  if (screen === "loyalty" && any("loyalty", "sale")) jobs.push(showLoyalty());
  const results = await Promise.allSettled(jobs);
  const failed = results.find((r) => r.status === "rejected");
  if (failed && failed.reason?.code !== "sign_in_required") console.warn("refresh failed", failed.reason);
}

// ---- the event stream and liveness

let events = null;
let streamDown = false;
let reconnectTimer = 0;

function connectEvents() {
  if (events && events.readyState !== EventSource.CLOSED) return;
  clearTimeout(reconnectTimer);
  events = new EventSource("/api/v1/events", { withCredentials: true });
  events.addEventListener("open", () => {
    const wasDown = streamDown;
    streamDown = false;
    updateLiveness();
    if (wasDown) refreshSoon(["all"]); // commits may have been missed meanwhile
  });
  events.addEventListener("error", () => {
    streamDown = true;
    updateLiveness();
    // EventSource retries by itself unless the answer was not a stream (e.g. 401): then we do.
    if (events.readyState === EventSource.CLOSED) reconnectTimer = setTimeout(reconnectOrSignIn, STREAM_RETRY_MS);
  });
  events.addEventListener("commit", (e) => {
    const commit = parse(e.data);
    refreshSoon(commit?.kinds?.length ? commit.kinds : ["all"]);
  });
  events.addEventListener("status", (e) => {
    const live = parse(e.data);
    if (!live) return;
    const before = state.live;
    state.live = live;
    // A peer came or went: who is reachable changed (stock columns, mesh picture).
    if (before && before.peers_connected !== live.peers_connected) refreshSoon(["mesh"]);
    else if (currentScreen() === "mesh") refreshMesh();
    updateLiveness();
  });
  events.addEventListener("lagged", () => refreshSoon(["all"]));
}

function closeEvents() {
  clearTimeout(reconnectTimer);
  if (events) events.close();
  events = null;
}

async function reconnectOrSignIn() {
  try {
    const session = await api("/api/v1/session");
    if (session.required && !session.signed_in) return showSignIn(session);
  } catch {
    // The node may be down or have no sessions: try the stream again either way.
  }
  if (events && events.readyState === EventSource.CLOSED) {
    events = null;
    connectEvents();
  }
}

function parse(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

function peersConnected() {
  if (state.live) return state.live.peers_connected;
  return state.mesh ? state.mesh.peers.length : null;
}

function updateLiveness() {
  const peers = peersConnected();
  const pill = $("status-pill");
  pill.textContent = streamDown ? "No node" : peers === null ? "…" : `${peers} peer${peers === 1 ? "" : "s"}`;
  pill.className = `pill ${streamDown || peers === 0 ? "bad" : "good"}`;
  pill.dataset.peers = peers === null ? "" : String(peers);

  let text = "";
  if (streamDown) text = "Lost contact with this tablet's node.";
  else if (peers === 0) text = "Offline: no other tablet reachable.";
  const banner = $("offline-banner");
  banner.hidden = !text || !started || !$("screen-signin").hidden;
  banner.querySelector(".offline-text").textContent = text;
  $("unshared-count").textContent = String(state.live?.unshared_sales ?? 0);
}

// ---- wiring

for (const name of Object.keys(SCREENS)) {
  $(`nav-${name}`).addEventListener("click", () => {
    if (location.hash === `#${name}`) route();
    else location.hash = `#${name}`;
  });
}
window.addEventListener("hashchange", route);
$("signin-form").addEventListener("submit", signIn);
$("signout").addEventListener("click", signOut);
boot();
