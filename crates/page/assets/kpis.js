// KPIs: revenue, average order, revenue per open hour, sales per hour, top products, the
// suggestions experiment's lift, and each drop's sell-through per channel.

import { api, byTestId, describeError, el, money, percent, say, svgEl, time } from "/api.js";

const $ = (id) => byTestId(id);
let seq = 0;

export async function showKpis() {
  const mine = ++seq;
  try {
    const [k, d] = await Promise.all([api("/api/v1/kpis"), api("/api/v1/drops")]);
    if (mine === seq) {
      render(k);
      renderDrops(d.drops || []);
    }
    say($("kpi-message"), "");
  } catch (err) {
    if (mine === seq) say($("kpi-message"), describeError(err), "error");
  }
}

function render(k) {
  const cur = k.currency || "EUR";
  $("kpi-revenue").textContent = money(k.revenue_cents, cur);
  $("kpi-sales").textContent = `${k.sales} sale${k.sales === 1 ? "" : "s"}`;
  $("kpi-aov").textContent = k.average_order_cents === null ? "—" : money(k.average_order_cents, cur);
  $("kpi-revenue-per-hour").textContent =
    k.revenue_per_open_hour_cents === null ? "—" : money(k.revenue_per_open_hour_cents, cur);
  $("kpi-open-hours").textContent = `over ${k.open_hours} open hour${k.open_hours === 1 ? "" : "s"}`;
  renderPerHour(k.per_hour || [], cur);
  $("kpi-top").replaceChildren(
    ...(k.top_products || []).map((p) =>
      el(
        "li",
        { "data-sku": p.sku },
        el("span", { class: "name", text: p.name || p.sku }),
        el("span", { class: "num", text: `${p.units} sold` }),
        el("strong", { class: "num", text: money(p.revenue_cents, cur) }),
      ),
    ),
  );
  if (!(k.top_products || []).length) $("kpi-top").append(el("li", { class: "muted", text: "No sales yet." }));
  renderLift(k.lift);
}

const CHART = { w: 720, h: 260, top: 24, bottom: 36, left: 12, right: 12 };

function renderPerHour(hours, cur) {
  const rows = [...hours].sort((a, b) => a.hour_start_ms - b.hour_start_ms);
  const max = Math.max(1, ...rows.map((r) => r.sales));
  const plotH = CHART.h - CHART.top - CHART.bottom;
  const slot = (CHART.w - CHART.left - CHART.right) / Math.max(rows.length, 1);
  const barW = Math.max(4, Math.min(60, slot * 0.7));
  const bars = rows.map((r, i) => {
    const h = (r.sales / max) * plotH;
    const x = CHART.left + i * slot + (slot - barW) / 2;
    const y = CHART.top + plotH - h;
    const hour = new Date(r.hour_start_ms).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
    return svgEl(
      "g",
      { class: "bar", "data-hour-start-ms": r.hour_start_ms, "data-sales": r.sales },
      svgEl("title", {}, `${hour}: ${r.sales} sales, ${money(r.revenue_cents, cur)}`),
      svgEl("rect", { x, y, width: barW, height: Math.max(h, 1), rx: 3 }),
      svgEl("text", { x: x + barW / 2, y: y - 6, "text-anchor": "middle", class: "value" }, String(r.sales)),
      svgEl("text", { x: x + barW / 2, y: CHART.h - 14, "text-anchor": "middle", class: "label" }, hour),
    );
  });
  const svg = svgEl(
    "svg",
    { viewBox: `0 0 ${CHART.w} ${CHART.h}`, testid: "kpi-per-hour", role: "img", "aria-label": "Sales per hour" },
    svgEl("line", { x1: CHART.left, x2: CHART.w - CHART.right, y1: CHART.top + plotH, y2: CHART.top + plotH, class: "axis" }),
    ...bars,
    rows.length ? null : svgEl("text", { x: CHART.w / 2, y: CHART.h / 2, "text-anchor": "middle", class: "label" }, "No sales yet"),
  );
  $("kpi-per-hour").replaceWith(svg);
}

function armText(name, a) {
  return `${name}: ${a.converted} of ${a.sales} sales took a suggestion (${percent(a.conversion_rate)})`;
}

function renderLift(lift) {
  const box = $("kpi-lift");
  if (!lift) {
    box.replaceChildren(el("p", { text: "Not enough sales yet." }));
    return;
  }
  const signed = (x) => (x === null || x === undefined ? "—" : `${x >= 0 ? "+" : ""}${(x * 100).toFixed(1)}%`);
  const headline =
    lift.lift === null || lift.lift === undefined
      ? "Not enough sales yet"
      : `Lift ${signed(lift.lift)}` +
        (lift.lift_ci_low !== null && lift.lift_ci_low !== undefined
          ? ` (95% interval ${signed(lift.lift_ci_low)} to ${signed(lift.lift_ci_high)})`
          : "");
  box.replaceChildren(
    el("p", { class: "big", testid: "kpi-lift-value", text: headline }),
    el("p", { text: armText("Suggestions shown", lift.treatment) }),
    el("p", { text: armText("Held back (control)", lift.control) }),
  );
}

// Drops: per channel (online, and each stall over its tablets) the units planned, sold and left,
// and the sell-through (sold of what it had: sold + left, since rights move between channels).
function renderDrops(drops) {
  const box = $("kpi-drops");
  if (!drops.length) {
    box.replaceChildren(el("p", { class: "muted", text: "No drops planned." }));
    return;
  }
  box.replaceChildren(...drops.map(dropTable));
}

function dropTable(d) {
  const channels = new Map();
  for (const c of d.channels) {
    const name = c.role === "online" ? "Online" : c.stall || "Unknown tablet";
    const g = channels.get(name) || { planned: 0, sold: 0, left: 0 };
    g.planned += c.planned;
    g.sold += c.sold;
    g.left += c.held;
    channels.set(name, g);
  }
  const status =
    d.status === "sold_out"
      ? `sold out${d.sold_out_at_ms ? ` at ${time(d.sold_out_at_ms)}, ${span(d.sold_out_at_ms - d.start_ms)} after opening` : ""}`
      : d.status === "scheduled"
        ? `opens at ${time(d.start_ms)}`
        : "open";
  const num = (text) => el("td", { class: "num", text: String(text) });
  return el(
    "div",
    { testid: "kpi-drop", class: "kpi-drop", "data-drop": d.id },
    el("p", {}, el("strong", { text: d.name }), ` · ${d.sold} of ${d.units} sold · `, el("span", { testid: "kpi-drop-status", text: status })),
    el(
      "table",
      { class: "kpi-drop-channels" },
      el("thead", {}, el("tr", {}, ...["Channel", "Planned", "Sold", "Left", "Sell-through"].map((h) => el("th", { text: h })))),
      el(
        "tbody",
        {},
        ...[...channels].map(([name, g]) =>
          el(
            "tr",
            { testid: "kpi-drop-channel", "data-channel": name },
            el("td", { text: name }),
            num(g.planned),
            num(g.sold),
            num(g.left),
            num(g.sold + g.left > 0 ? percent(g.sold / (g.sold + g.left), 0) : "—"),
          ),
        ),
      ),
    ),
  );
}

function span(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  return s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min` : s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}
