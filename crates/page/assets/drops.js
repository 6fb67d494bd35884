// Drops on the till: a countdown before one opens, then the units left here, at the other stalls
// and online, what each sold, and when it sold out.

import { byTestId, el, time } from "/api.js";
import { state, subscribe } from "/store.js";

/** A sold-out drop stays on the till this long, for the staff to see when it went. */
const SOLD_OUT_SHOWN_MS = 60 * 60 * 1000;

let loadedAt = 0; // performance.now() when state.drops was read: the countdown runs from it

export function initDrops() {
  subscribe("drops", () => {
    loadedAt = performance.now();
    render();
  });
  // The countdown ticks between loads.
  setInterval(() => {
    if ((state.drops || []).some((d) => d.status === "scheduled")) render();
  }, 1000);
}

function render() {
  const now = Date.now();
  const shown = (state.drops || []).filter((d) => d.status !== "sold_out" || (d.sold_out_at_ms || now) + SOLD_OUT_SHOWN_MS > now);
  const panel = byTestId("drops");
  panel.replaceChildren(...shown.map(card));
  panel.hidden = shown.length === 0;
}

function card(d) {
  const sum = (pick, f) => d.channels.filter(pick).reduce((n, c) => n + c[f], 0);
  const here = (c) => c.this_device;
  const online = (c) => c.role === "online";
  const stalls = (c) => !here(c) && !online(c);
  const opensInMs = Math.max(0, d.opens_in_ms - (performance.now() - loadedAt));
  const scheduled = d.status === "scheduled" && opensInMs > 0;
  const status = scheduled ? `opens in ${countdown(opensInMs)}` : d.status === "sold_out" ? `sold out${d.sold_out_at_ms ? ` at ${time(d.sold_out_at_ms)}` : ""}` : "open";
  const hasOnline = d.channels.some(online);
  return el(
    "div",
    { testid: "drop", class: `drop ${scheduled ? "scheduled" : d.status}`, "data-drop": d.id, "data-status": scheduled ? "scheduled" : d.status },
    el("div", { class: "drop-head" }, el("strong", { text: d.name }), " ", el("span", { testid: "drop-status", class: "drop-status", text: status })),
    el(
      "div",
      { testid: "drop-left", class: "drop-left" },
      `left: here ${sum(here, "held")} · other stalls ${sum(stalls, "held")}`,
      hasOnline ? ` · online ${sum(online, "held")}` : "",
    ),
    el(
      "div",
      { testid: "drop-sold", class: "drop-sold muted" },
      `sold ${d.sold} of ${d.units}: here ${sum(here, "sold")} · other stalls ${sum(stalls, "sold")}`,
      hasOnline ? ` · online ${sum(online, "sold")}` : "",
    ),
  );
}

function countdown(ms) {
  const s = Math.ceil(ms / 1000);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const pad = (n) => String(n).padStart(2, "0");
  return h > 0 ? `${h}:${pad(m)}:${pad(s % 60)}` : `${m}:${pad(s % 60)}`;
}
