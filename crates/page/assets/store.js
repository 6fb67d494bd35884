// What several screens show (catalogue, stock, mesh, status), loaded once and refreshed on events.

import { api, ApiError } from "/api.js";

export const state = {
  products: [],
  bySku: new Map(),
  stock: null, // StockList
  mesh: null, // MeshView; { peers: [] } when the node runs without a mesh
  status: null, // Status
  live: null, // last `status` event: { peers_connected, unshared_sales, cloud_offset }
  drops: [], // DropView[]: every drop this node knows
  session: null,
};

const listeners = new Map();

export function subscribe(topic, fn) {
  if (!listeners.has(topic)) listeners.set(topic, []);
  listeners.get(topic).push(fn);
}

export function publish(topic) {
  for (const fn of listeners.get(topic) || []) {
    try {
      fn(state);
    } catch (err) {
      console.error(`listener of ${topic}`, err);
    }
  }
}

export async function loadProducts() {
  const data = await api("/api/v1/products");
  state.products = data.products || [];
  state.bySku = new Map(state.products.map((p) => [p.sku, p]));
  publish("products");
}

export async function loadStock() {
  state.stock = await api("/api/v1/stock");
  publish("stock");
}

export async function loadDrops() {
  state.drops = (await api("/api/v1/drops")).drops || [];
  publish("drops");
}

export async function loadMesh() {
  try {
    state.mesh = await api("/api/v1/mesh");
  } catch (err) {
    if (!(err instanceof ApiError && err.code === "mesh_disabled")) throw err;
    state.mesh = { peers: [], refused: {}, disabled: true };
  }
  publish("mesh");
}

export async function loadStatus() {
  state.status = await api("/api/v1/status");
  publish("status");
}

export const thisDevice = () => state.stock?.device || state.status?.node?.device || "";

/** The market's currency, as its catalogue says (for amounts that carry none). */
export const currency = () => state.products[0]?.currency || "EUR";

/** Devices with a live mesh session now. */
export const connectedDevices = () => new Set((state.mesh?.peers || []).map((p) => p.device));

/** Units of a stock row held by reachable peers and by devices out of reach. */
export function spread(row) {
  if (typeof row.reachable_peers === "number" && typeof row.unreachable === "number") {
    return { reachable: row.reachable_peers, unreachable: row.unreachable };
  }
  const me = thisDevice();
  const connected = connectedDevices();
  let reachable = 0;
  let unreachable = 0;
  for (const [device, units] of Object.entries(row.per_device || {})) {
    if (device === me) continue;
    if (connected.has(device)) reachable += units;
    else unreachable += units;
  }
  return { reachable, unreachable };
}

/** What tests and the benchmark read: button taps since load and sale round-trips. */
export const metrics = (window.stallmesh = { taps: 0, saleTimingsMs: [], lastSaleMs: null });

/** Display name of a device: its stall when the mesh knows it, and its short id. */
export function deviceLabel(hex) {
  if (hex === thisDevice()) return `this tablet (${hex.slice(0, 8)})`;
  const peer = (state.mesh?.peers || []).find((p) => p.device === hex);
  return peer ? `${peer.stall} (${hex.slice(0, 8)})` : hex.slice(0, 8);
}
