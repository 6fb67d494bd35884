// The mesh: this tablet in the centre, connected peers around it, known tablets out of reach in a
// group of their own (a partition shows as two groups), and what the cloud holds.

import { byTestId, describeError, el, say, shortId, svgEl, time } from "/api.js";
import { loadMesh, loadStatus, state, subscribe, thisDevice } from "/store.js";

const $ = (id) => byTestId(id);
const W = 800;
const H = 480;
const CENTRE = { x: 300, y: 240 };
const RING = 170;
const R = 38;

export function initMesh() {
  for (const topic of ["mesh", "status", "stock"]) subscribe(topic, render);
}

export function showMesh() {
  render();
  refreshMesh();
}

export function refreshMesh() {
  return Promise.all([loadMesh(), loadStatus()]).catch((err) => say($("mesh-message"), describeError(err), "error"));
}

function render() {
  if ($("screen-mesh").hidden) return; // drawn when shown
  const me = thisDevice();
  const peers = state.mesh?.peers || [];
  const connected = new Set(peers.map((p) => p.device));
  const cloud = state.status?.cloud?.watermark?.cloud_device;
  const known = new Set(Object.keys(state.status?.heads || {}));
  for (const row of state.stock?.stock || []) for (const d of Object.keys(row.per_device || {})) known.add(d);
  const away = [...known].filter((d) => d && d !== me && d !== cloud && !connected.has(d)).sort();

  const edges = svgEl("g", { class: "edges" });
  const nodes = svgEl("g", { class: "peers" });
  peers.forEach((p, i) => {
    const angle = -Math.PI / 2 + (i * 2 * Math.PI) / peers.length;
    const at = { x: CENTRE.x + RING * Math.cos(angle), y: CENTRE.y + RING * Math.sin(angle) };
    edges.append(svgEl("line", { x1: CENTRE.x, y1: CENTRE.y, x2: at.x, y2: at.y, class: `edge ${p.state}` }));
    nodes.append(node(at, p.device, p.state, [p.stall, shortId(p.device), `behind ${p.behind} / ahead ${p.ahead}`]));
  });
  const self = node(CENTRE, me, "self", [state.status?.node?.stall || "this tablet", shortId(me), "this tablet"]);
  self.setAttribute("data-testid", "mesh-self");

  const step = away.length ? Math.min(100, (H - 80) / away.length) : 0;
  const awayGroup = svgEl(
    "g",
    { class: "unreachable-group", testid: "mesh-unreachable" },
    away.length ? svgEl("text", { x: 690, y: 30, class: "group-label", "text-anchor": "middle" }, "Out of reach") : null,
    away.length ? svgEl("line", { x1: 575, y1: 20, x2: 575, y2: H - 20, class: "partition" }) : null,
    ...away.map((d, i) => node({ x: 690, y: 60 + step * (i + 0.5) }, d, "unreachable", [stallOf(d), shortId(d), "not connected"], step < 90)),
  );
  const svg = svgEl(
    "svg",
    { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${peers.length} tablets connected, ${away.length} out of reach`, testid: "mesh-graph" },
    edges,
    nodes,
    self,
    awayGroup,
  );
  $("mesh-graph").replaceWith(svg);
  $("mesh-summary").textContent = state.mesh?.disabled
    ? "This node runs without a mesh."
    : `${peers.length} tablet${peers.length === 1 ? "" : "s"} connected · ${away.length} known out of reach`;
  renderPeerTable(peers);
  renderCloud();
}

function stallOf(device) {
  return (state.mesh?.peers || []).find((p) => p.device === device)?.stall || "tablet";
}

function node(at, device, nodeState, lines, small = false) {
  const r = small ? R * 0.7 : R;
  return svgEl(
    "g",
    { testid: "mesh-node", "data-device": device, "data-state": nodeState, class: `node ${nodeState}`, transform: `translate(${at.x} ${at.y})` },
    svgEl("title", {}, `${lines.join(" · ")} (${device})`),
    svgEl("circle", { r }),
    // Stall and short id inside the circle, the sync state under it.
    svgEl("text", { y: -3, "text-anchor": "middle", class: "stall" }, lines[0]),
    svgEl("text", { y: 13, "text-anchor": "middle" }, lines[1]),
    svgEl("text", { y: r + 16, "text-anchor": "middle", class: "under" }, lines[2]),
  );
}

const STATES = { in_sync: "in sync", catching_up: "catching up", peer_catching_up: "peer catching up" };

function renderPeerTable(peers) {
  $("mesh-peers").replaceChildren(
    ...peers.map((p) =>
      el(
        "tr",
        { "data-device": p.device },
        el("td", { text: p.stall }),
        el("td", { class: "mono", text: shortId(p.device) }),
        el("td", { text: STATES[p.state] || p.state }),
        el("td", { class: "num", text: String(p.behind) }),
        el("td", { class: "num", text: String(p.ahead) }),
        el("td", { class: "num", text: `${Math.round(p.connected_for_ms / 1000)} s` }),
        el("td", { class: "num", text: `${(p.last_heard_ms_ago / 1000).toFixed(1)} s ago` }),
      ),
    ),
  );
}

function renderCloud() {
  const cloud = state.status?.cloud;
  const box = $("cloud-watermark");
  if (!cloud) {
    box.textContent = "…";
    return;
  }
  const w = cloud.watermark;
  if (!w && !cloud.uplink) {
    box.textContent = "No cloud configured.";
    return;
  }
  const parts = [];
  if (w) {
    parts.push(`The cloud holds ${w.offset} entries (offset ${w.offset}, recorded ${time(w.recorded_at_ms)}).`);
    parts.push(
      cloud.sales_not_uploaded === 0
        ? "All of this tablet's sales are in the cloud."
        : `${cloud.sales_not_uploaded} of this tablet's sales are not in the cloud yet` +
            (w.this_device_through_ms ? ` (it holds them up to ${time(w.this_device_through_ms)}).` : "."),
    );
  } else {
    parts.push(`No cloud watermark has reached this tablet yet; ${cloud.sales_not_uploaded} of its sales are not known to be in the cloud.`);
  }
  if (cloud.uplink) parts.push(`Uplink: ${cloud.uplink.state}${cloud.uplink.last_error ? ` (${cloud.uplink.last_error})` : ""}.`);
  box.textContent = parts.join(" ");
  box.dataset.offset = w ? String(w.offset) : "";
  box.dataset.allUploaded = String(cloud.sales_not_uploaded === 0);
}
