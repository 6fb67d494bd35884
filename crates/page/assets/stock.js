// Stock: units per SKU here, on reachable peers and out of reach; restocks and transfers.

import { api, byTestId, describeError, el, say, shortId } from "/api.js";
import { connectedDevices, loadStock, spread, state, subscribe, thisDevice } from "/store.js";

const $ = (id) => byTestId(id);

export function initStock() {
  for (const topic of ["stock", "mesh", "products", "status"]) subscribe(topic, render);
  $("restock-form").addEventListener("submit", (e) => {
    e.preventDefault();
    restock();
  });
  $("transfer-form").addEventListener("submit", (e) => {
    e.preventDefault();
    transfer();
  });
}

export function showStock() {
  loadStock().catch((err) => say($("stock-message"), describeError(err), "error"));
}

function render() {
  const rows = state.stock?.stock || [];
  $("stock-rows").replaceChildren(...rows.map(stockRow));
  $("stock-empty").hidden = rows.length > 0;
  fillSelect($("restock-sku"), productOptions());
  fillSelect($("transfer-sku"), productOptions());
  fillSelect($("transfer-to"), deviceOptions());
}

function stockRow(row) {
  const { reachable, unreachable } = spread(row);
  return el(
    "tr",
    { testid: "stock-row", "data-sku": row.sku },
    el("td", { class: "sku", text: row.sku }),
    el("td", { text: row.name || state.bySku.get(row.sku)?.name || "" }),
    el("td", { class: "here num", text: String(row.this_device) }),
    el("td", { class: "reachable num", text: String(reachable) }),
    el("td", { class: `unreachable num${unreachable ? " warn" : ""}`, text: String(unreachable) }),
    el("td", { class: "total num", text: String(row.total) }),
  );
}

function productOptions() {
  return state.products.map((p) => [p.sku, `${p.name} (${p.sku})`]);
}

/** Connected peers first, then devices known from the stock that are out of reach. */
function deviceOptions() {
  const me = thisDevice();
  const peers = (state.mesh?.peers || []).map((p) => [p.device, `${p.stall} · ${shortId(p.device)}`]);
  const connected = connectedDevices();
  const known = new Set();
  for (const row of state.stock?.stock || []) for (const d of Object.keys(row.per_device || {})) known.add(d);
  const away = [...known]
    .filter((d) => d !== me && !connected.has(d))
    .map((d) => [d, `${shortId(d)} (not connected)`]);
  return [...peers, ...away];
}

/** Replaces a select's options, keeping the chosen value when it is still offered. */
function fillSelect(select, options) {
  const chosen = select.value;
  select.replaceChildren(...options.map(([value, label]) => el("option", { value, text: label })));
  if (options.some(([value]) => value === chosen)) select.value = chosen;
}

function quantity(input) {
  const n = Number.parseInt(input.value, 10);
  return Number.isFinite(n) && n > 0 ? n : null;
}

async function restock() {
  const sku = $("restock-sku").value;
  const qty = quantity($("restock-qty"));
  if (!sku || !qty) return say($("stock-message"), "Choose a product and a quantity of at least 1.", "error");
  await submit($("restock-submit"), async () => {
    const m = await api("/api/v1/restocks", { method: "POST", json: { sku, qty } });
    return `Received ${m.qty} × ${nameOf(sku)}: this tablet now holds ${m.rights_here}.`;
  });
}

async function transfer() {
  const sku = $("transfer-sku").value;
  const qty = quantity($("transfer-qty"));
  const to = $("transfer-to").value;
  if (!sku || !qty || !to) return say($("stock-message"), "Choose a product, a quantity and a tablet to hand it to.", "error");
  await submit($("transfer-submit"), async () => {
    const m = await api("/api/v1/transfers", { method: "POST", json: { sku, qty, to_device: to } });
    return `Handed ${m.qty} × ${nameOf(sku)} to ${shortId(to)}: this tablet now holds ${m.rights_here}.`;
  });
}

async function submit(button, work) {
  button.disabled = true;
  try {
    say($("stock-message"), await work());
    await loadStock();
  } catch (err) {
    say($("stock-message"), describeError(err), "error");
  } finally {
    button.disabled = false;
  }
}

const nameOf = (sku) => state.bySku.get(sku)?.name || sku;
