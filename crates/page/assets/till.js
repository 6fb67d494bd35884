// The till: product tiles, the basket and the sale, search (words, photo, scanner), suggestions
// and the market's recent sales.

import { api, ApiError, byTestId, debounce, describeError, el, fill, money, say, shortId, time } from "/api.js";
import { deviceLabel, metrics, state, subscribe, thisDevice } from "/store.js";
import { photoSource } from "/camera.js";
import { initCard, saleLoyalty, afterSale as cardAfterSale } from "/card.js";

const $ = (id) => byTestId(id);

/** The open basket: SKU → qty (in the order added), its client_ref and the suggestions' record. */
const basket = { lines: new Map(), clientRef: null, record: null, dismissed: new Set() };
let selling = false;
/** SKUs tapped while a sale was in flight: they go into the basket once it is answered. */
const queued = [];
let refreshSoon = () => {};

export function initTill(options) {
  refreshSoon = options.refreshSoon;
  subscribe("products", () => {
    renderTiles();
    renderBasket();
  });
  subscribe("stock", renderHeld);
  $("sell").addEventListener("click", sell);
  initSearch();
  initScanner();
  initCard();
  renderBasket();
}

export function showTill() {
  loadRecent().catch(() => {});
}

// ---- tiles

function renderTiles() {
  $("tiles").replaceChildren(...state.products.map(tile));
  renderHeld();
}

function tile(p) {
  const placeholder = () => el("span", { class: "nophoto", "aria-hidden": "true", text: p.name.slice(0, 1) });
  const photo = p.has_photo
    ? el("img", {
        src: `/api/v1/products/${encodeURIComponent(p.sku)}/photo`,
        loading: "lazy",
        alt: "",
        onerror: (e) => {
          e.target.hidden = true;
          e.target.after(placeholder());
        },
      })
    : placeholder();
  return el(
    "button",
    { type: "button", testid: "tile", "data-sku": p.sku, class: "tile", onclick: () => add(p.sku) },
    photo,
    el("span", { class: "name", text: p.name }),
    el("span", { class: "price", text: money(p.price_cents, p.currency) }),
    el("span", { class: "held", title: "units this tablet holds", text: "0" }),
  );
}

function renderHeld() {
  const held = new Map((state.stock?.stock || []).map((r) => [r.sku, r.this_device]));
  for (const node of $("tiles").querySelectorAll('[data-testid="tile"]')) {
    const units = held.get(node.dataset.sku) || 0;
    const span = node.querySelector(".held");
    span.textContent = String(units);
    span.classList.toggle("none", units === 0);
  }
}

// ---- basket

function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  // Outside a secure context randomUUID is missing; getRandomValues is not.
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Adds one of `sku` to the basket, opening a new basket (and client_ref) if it is empty. */
export function add(sku) {
  if (!state.bySku.has(sku)) return;
  if (selling) {
    queued.push(sku);
    return;
  }
  if (basket.lines.size === 0) openBasket();
  basket.lines.set(sku, (basket.lines.get(sku) || 0) + 1);
  basketChanged();
}

function openBasket() {
  basket.clientRef = uuid();
  basket.record = null;
  basket.dismissed.clear();
  $("receipt").hidden = true;
  $("refusal").hidden = true;
  say($("error-banner"), "");
}

function changeQty(sku, delta) {
  const qty = (basket.lines.get(sku) || 0) + delta;
  if (qty <= 0) basket.lines.delete(sku);
  else basket.lines.set(sku, qty);
  basketChanged();
}

function basketChanged() {
  renderBasket();
  requestRecommendations();
}

function basketTotal() {
  let cents = 0;
  let currency = null;
  for (const [sku, qty] of basket.lines) {
    const p = state.bySku.get(sku);
    if (!p) continue;
    cents += p.price_cents * qty;
    currency = currency || p.currency;
  }
  return { cents, currency };
}

function renderBasket() {
  // Re-rendering replaces the buttons: keep keyboard focus on the same one.
  const focused = document.activeElement;
  const keep = focused?.closest?.('[data-testid="basket-line"]') && {
    sku: focused.closest('[data-testid="basket-line"]').dataset.sku,
    testid: focused.dataset.testid,
  };
  $("basket").replaceChildren(...[...basket.lines].map(([sku, qty]) => basketLine(sku, qty)));
  const { cents, currency } = basketTotal();
  $("basket-total").textContent = money(cents, currency || state.products[0]?.currency);
  $("basket-empty").hidden = basket.lines.size > 0;
  renderSellButton();
  if (keep) {
    const line = $("basket").querySelector(`[data-sku="${CSS.escape(keep.sku)}"]`);
    (line?.querySelector(`[data-testid="${keep.testid}"]`) || $("sell")).focus();
  }
}

function basketLine(sku, qty) {
  const p = state.bySku.get(sku);
  const name = p?.name || sku;
  return el(
    "li",
    { testid: "basket-line", "data-sku": sku, class: "line" },
    el("span", { class: "name", text: name }),
    el("button", {
      type: "button",
      testid: "qty-minus",
      class: "qtybtn",
      "aria-label": qty === 1 ? `Remove ${name}` : `One less ${name}`,
      text: "−",
      onclick: () => changeQty(sku, -1),
    }),
    el("span", { class: "qty", "aria-label": "quantity", text: String(qty) }),
    el("button", {
      type: "button",
      testid: "qty-plus",
      class: "qtybtn",
      "aria-label": `One more ${name}`,
      text: "+",
      onclick: () => changeQty(sku, 1),
    }),
    el("span", { class: "amount", text: p ? money(p.price_cents * qty, p.currency) : "" }),
  );
}

function renderSellButton() {
  const button = $("sell");
  button.disabled = selling || basket.lines.size === 0;
  button.textContent = selling ? "Selling…" : "Sell";
  button.setAttribute("aria-busy", String(selling));
}

/** Sales listed under "Recent sales". */
const RECENT_SALES_SHOWN = 10;
/** How long a sale may take before the till says so and keeps the basket for a retry. */
const SALE_TIMEOUT_MS = 5000;

// ---- the sale

async function sell() {
  if (selling || basket.lines.size === 0) return;
  const started = performance.now();
  selling = true;
  renderSellButton();
  say($("error-banner"), "");
  const body = {
    lines: [...basket.lines].map(([sku, qty]) => ({ sku, qty })),
    client_ref: basket.clientRef,
  };
  if (basket.record) body.recommendation = basket.record;
  const loyalty = saleLoyalty();
  if (loyalty) body.loyalty = loyalty;
  try {
    // Long enough for the node's wait for a reachable peer's units (a few seconds).
    const sale = await api("/api/v1/sales", { method: "POST", json: body, timeoutMs: SALE_TIMEOUT_MS });
    saleRecorded(sale, started);
  } catch (err) {
    saleFailed(err);
  } finally {
    selling = false;
    renderSellButton();
    for (const sku of queued.splice(0)) add(sku);
  }
}

function saleRecorded(sale, started) {
  $("refusal").hidden = true;
  renderReceipt(sale);
  basket.lines.clear();
  basket.clientRef = null;
  basket.record = null;
  renderBasket();
  renderRecommendations(null);
  cardAfterSale();
  requestAnimationFrame(() => {
    const ms = performance.now() - started;
    metrics.saleTimingsMs.push(ms);
    metrics.lastSaleMs = ms;
  });
  refreshSoon(["sale"]);
}

/** The basket and its client_ref stay: a retry of a sale that did go through returns it. */
function saleFailed(err) {
  if (err instanceof ApiError && err.code === "insufficient_stock_rights" && err.body.details) {
    renderRefusal(err.body.details);
    return;
  }
  $("refusal").hidden = true;
  if (err instanceof ApiError && err.code === "sign_in_required") return;
  if (err instanceof ApiError && err.code === "client_ref_reused") {
    // The earlier attempt went through with the basket as it was then; what is in it now is
    // another sale, which needs its own client_ref. Staff check the recent sales first.
    basket.clientRef = uuid();
    refreshSoon(["sale"]);
    say($("error-banner"), "The earlier tap of Sell did go through, with the basket as it was then (see Recent sales). " +
      "The basket has changed since: take out what was already sold, then tap Sell for the rest.", "error");
    return;
  }
  let message = describeError(err);
  if (err instanceof TypeError) message += " The basket is kept: tap Sell again — it cannot sell twice.";
  if (err instanceof ApiError && err.body.points) {
    const p = err.body.points;
    message += ` (asked ${p.requested} points; this tablet holds ${p.held_here}, offline allowance ${p.offline_budget_left})`;
  }
  say($("error-banner"), message, "error");
}

function renderReceipt(sale) {
  const box = $("receipt");
  if (!sale) {
    box.replaceChildren(el("h3", { text: "Sold" }), el("p", { text: "The sale was recorded." }));
    box.hidden = false;
    return;
  }
  const lines = sale.lines.map((l) =>
    el(
      "li",
      { class: "receipt-line", "data-sku": l.sku },
      el("span", { text: `${l.qty} × ${state.bySku.get(l.sku)?.name || l.sku}` }),
      el("span", { text: money(l.price_cents * l.qty, sale.currency) }),
    ),
  );
  const loyalty = sale.loyalty;
  fill(box, 
    el(
      "div",
      { class: "receipt-head" },
      el("h3", { text: "Sold ✓" }),
      el("span", { class: "muted" }, "Sale ", el("code", { testid: "receipt-sale-id", text: sale.id })),
    ),
    el("ul", { class: "receipt-lines" }, lines),
    loyalty &&
      el(
        "p",
        { testid: "receipt-loyalty", class: "receipt-loyalty" },
        el("span", { testid: "receipt-points-earned", text: `+${loyalty.points_earned} points earned` }),
        loyalty.points_redeemed + loyalty.points_unproven > 0 &&
          el("span", {
            testid: "receipt-points-redeemed",
            text: ` · ${loyalty.points_redeemed + loyalty.points_unproven} points redeemed (−${money(loyalty.discount_cents, sale.currency)})`,
          }),
        loyalty.points_unproven > 0 && el("span", { text: ` · ${loyalty.points_unproven} from the offline allowance` }),
      ),
    el(
      "p",
      { class: "receipt-total" },
      el("span", { text: "Total" }),
      el("strong", { testid: "receipt-total", text: money(sale.total_cents, sale.currency) }),
    ),
    el("p", {
      class: "muted",
      text: [time(sale.time_ms), sale.staff ? `served by ${sale.staff}` : null].filter(Boolean).join(" · "),
    }),
  );
  box.hidden = false;
}

function renderRefusal(d) {
  const name = state.bySku.get(d.sku)?.name || d.sku;
  const reachable = d.reachable_devices ? new Set(d.reachable_devices) : null;
  const holders = Object.entries(d.held_elsewhere || {})
    .filter(([, units]) => units > 0)
    .map(([device, units]) =>
      el(
        "li",
        { "data-device": device },
        `${deviceLabel(device)}: ${units}`,
        reachable ? (reachable.has(device) ? " — reachable" : " — out of reach") : "",
      ),
    );
  const num = (testid, n) => el("strong", { testid, text: String(n) });
  fill($("refusal"), 
    el("h3", { text: `Not enough ${name} on this tablet` }),
    el(
      "p",
      {},
      "Asked for ",
      num("refusal-requested", d.requested),
      "; this tablet holds ",
      num("refusal-held-here", d.held_here),
      "; other tablets hold ",
      num("refusal-held-elsewhere", d.held_elsewhere_total),
      " in all.",
    ),
    holders.length ? el("ul", { class: "holders" }, holders) : el("p", { text: "No other tablet holds any." }),
    typeof d.held_on_unreachable_devices === "number" &&
      el("p", {}, num("refusal-unreachable", d.held_on_unreachable_devices), " of them are on tablets out of reach now."),
    d.waited_ms ? el("p", { class: "muted", text: `Waited ${(d.waited_ms / 1000).toFixed(1)} s for other tablets.` }) : null,
    el("button", { type: "button", testid: "ask-peers", class: "primary", text: "Ask other tablets and sell", onclick: sell }),
  );
  $("refusal").hidden = false;
}

// ---- search by words, by photo, and the barcode scanner

let searchSeq = 0;

function initSearch() {
  const input = $("search");
  input.addEventListener("input", debounce(runSearch, 150));
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const product = productByCode(input.value);
    if (product) {
      add(product.sku);
      input.value = "";
      renderHits([]);
    } else runSearch();
  });
  photoSource({
    file: $("photo-file"),
    camera: $("photo-camera"),
    panel: $("photo-camera-panel"),
    captureTestId: "photo-capture",
    message: $("search-note"),
    use: imageSearch,
  });
}

async function runSearch() {
  const q = $("search").value.trim();
  const seq = ++searchSeq;
  if (!q) {
    renderHits([]);
    say($("search-note"), "");
    return;
  }
  try {
    const data = await api(`/api/v1/search?${new URLSearchParams({ q })}`);
    if (seq !== searchSeq) return;
    renderHits(data.hits);
    say($("search-note"), data.hits.length ? "" : `Nothing found for “${q}”.`);
  } catch (err) {
    if (seq === searchSeq) say($("search-note"), describeError(err), "error");
  }
}

async function imageSearch(blob, type) {
  const seq = ++searchSeq;
  say($("search-note"), "Looking for products like this photo…");
  try {
    const data = await api("/api/v1/search/image", { method: "POST", bytes: blob, type: type || "image/jpeg" });
    if (seq !== searchSeq) return;
    renderHits(data.hits);
    say($("search-note"), data.hits.length ? "Products like the photo:" : "No product looks like this photo.");
  } catch (err) {
    if (seq === searchSeq) say($("search-note"), describeError(err), "error");
  }
}

function renderHits(hits) {
  $("search-results").replaceChildren(
    ...hits.map((h) =>
      el(
        "li",
        {},
        el(
          "button",
          { type: "button", testid: "search-hit", "data-sku": h.sku, class: "hit", onclick: () => add(h.sku) },
          el("span", { class: "name", text: h.name }),
          el("span", { class: "muted", text: h.sku }),
        ),
      ),
    ),
  );
}

function productByCode(code) {
  const wanted = code.trim().toLowerCase();
  return wanted ? state.products.find((p) => p.sku.toLowerCase() === wanted) : undefined;
}

const SCAN_IDLE_MS = 500;

/** A USB scanner types the SKU and Enter; keystrokes outside form fields are collected. */
function initScanner() {
  let buffer = "";
  let timer = 0;
  document.addEventListener("keydown", (e) => {
    const t = e.target;
    if (t instanceof HTMLElement && (t.isContentEditable || t.closest("input, textarea, select"))) return;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "Enter") {
      const code = buffer.trim();
      buffer = "";
      if (!code) return;
      const product = productByCode(code);
      if (product) {
        e.preventDefault();
        if ($("screen-till").hidden) location.hash = "#till";
        add(product.sku);
      } else if (code.length >= 3) {
        say($("error-banner"), `No product has the code “${code}”.`, "error");
      }
      return;
    }
    if (e.key.length === 1) {
      buffer += e.key;
      clearTimeout(timer);
      timer = setTimeout(() => (buffer = ""), SCAN_IDLE_MS);
    }
  });
}

// ---- suggestions ("bought together") and their feedback

let recSeq = 0;

async function requestRecommendations() {
  const seq = ++recSeq;
  if (basket.lines.size === 0) {
    renderRecommendations(null);
    return;
  }
  const params = new URLSearchParams({ basket: [...basket.lines.keys()].join(","), session: basket.clientRef });
  try {
    const data = await api(`/api/v1/recommendations?${params}`);
    if (seq !== recSeq || basket.lines.size === 0) return;
    basket.record = data.record;
    renderRecommendations(data);
  } catch {
    // Suggestions are an extra: a basket sells without them.
    if (seq === recSeq) renderRecommendations(null);
  }
}

function renderRecommendations(data) {
  const shown =
    data && data.arm === "treatment"
      ? data.recommendations.filter((r) => !basket.dismissed.has(r.sku) && !basket.lines.has(r.sku))
      : [];
  $("recs").replaceChildren(...shown.map(recommendation));
  $("recs-box").hidden = shown.length === 0;
}

function reasonText(r) {
  if (r.reason === "bought_together") {
    return `Often bought with this basket (${r.bought_together} sale${r.bought_together === 1 ? "" : "s"})`;
  }
  return "Like items bought with this basket";
}

function recommendation(r) {
  const more = el("div", { class: "rec-more", hidden: true });
  const li = el(
    "li",
    { testid: "rec", "data-sku": r.sku, class: "rec" },
    el("div", { class: "rec-text" }, el("strong", { text: r.name }), el("span", { class: "muted", text: reasonText(r) })),
    el(
      "div",
      { class: "row" },
      el("button", { type: "button", testid: "rec-add", class: "primary", text: "Add", onclick: () => add(r.sku) }),
      el("button", { type: "button", testid: "rec-dismiss", text: "Dismiss", onclick: () => showDismiss(r, li, more) }),
      el("button", { type: "button", testid: "rec-override", text: "Other pick", onclick: () => showOverride(r, li, more) }),
    ),
    more,
  );
  return li;
}

const REASONS = [
  ["not_relevant", "Not relevant"],
  ["out_of_stock", "Out of stock"],
  ["customer_declined", "Customer declined"],
  ["other", "Other"],
];

function showDismiss(r, li, more) {
  more.replaceChildren(
    el("span", { class: "muted", text: "Why?" }),
    ...REASONS.map(([reason, label]) =>
      el("button", {
        type: "button",
        testid: "rec-reason",
        "data-reason": reason,
        text: label,
        onclick: () => {
          hideRecommendation(r, li);
          sendFeedback({ action: "dismiss", sku: r.sku, reason, chosen_sku: null });
        },
      }),
    ),
  );
  more.hidden = false;
  more.querySelector("button").focus();
}

function showOverride(r, li, more) {
  const select = el(
    "select",
    { testid: "rec-override-select", "aria-label": "Your pick instead" },
    state.products.map((p) => el("option", { value: p.sku, text: `${p.name} (${money(p.price_cents, p.currency)})` })),
  );
  const form = el(
    "form",
    {
      class: "row",
      onsubmit: (e) => {
        e.preventDefault();
        const chosen = select.value;
        const feedback = { action: "override", sku: r.sku, reason: null, chosen_sku: chosen };
        sendFeedback(feedback); // with the basket as it was when the suggestion was made
        hideRecommendation(r, li);
        add(chosen);
      },
    },
    select,
    el("button", { type: "submit", testid: "rec-override-confirm", class: "primary", text: "Add my pick" }),
  );
  more.replaceChildren(form);
  more.hidden = false;
  select.focus();
}

function hideRecommendation(r, li) {
  basket.dismissed.add(r.sku);
  li.remove();
  $("recs-box").hidden = $("recs").children.length === 0;
}

async function sendFeedback(f) {
  const body = { ...f, basket: [...basket.lines.keys()], arm: basket.record?.arm || "treatment" };
  try {
    await api("/api/v1/recommendations/feedback", { method: "POST", json: body });
  } catch (err) {
    say($("error-banner"), `Feedback not saved: ${describeError(err)}`, "error");
  }
}

// ---- the market's recent sales

export async function loadRecent() {
  const data = await api(`/api/v1/sales?limit=${RECENT_SALES_SHOWN}`);
  const me = thisDevice();
  $("recent-sales").replaceChildren(
    ...data.sales.slice(0, 10).map((s) =>
      el(
        "li",
        { testid: "recent-sale", "data-sale-id": s.id, class: s.device === me ? "mine" : "" },
        el("span", { class: "when", text: time(s.time_ms) }),
        el("span", { class: "who", title: s.device, text: shortId(s.device) + (s.device === me ? " (here)" : "") }),
        el("strong", { class: "amount", text: money(s.total_cents, s.currency) }),
      ),
    ),
  );
  $("recent-empty").hidden = data.sales.length > 0;
}
