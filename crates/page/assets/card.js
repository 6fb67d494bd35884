// The loyalty card slot on the till: look a card up (typed, pasted or scanned from a photo),
// attach it to the basket with points to redeem.

import { api, ApiError, byTestId, describeError, say, shortId } from "/api.js";
import { photoSource } from "/camera.js";

const $ = (id) => byTestId(id);

/** The card last looked up: its QR text and CardView. */
let looked = null;
/** The card on the current basket: { text, id }. */
let attached = null;

export function initCard() {
  $("card-open").addEventListener("click", () => togglePanel());
  $("card-form").addEventListener("submit", (e) => {
    e.preventDefault();
    lookup();
  });
  $("card-attach-form").addEventListener("submit", (e) => {
    e.preventDefault();
    attach();
  });
  $("card-detach").addEventListener("click", detach);
  photoSource({
    file: $("card-scan-file"),
    camera: $("card-camera"),
    panel: $("card-camera-panel"),
    captureTestId: "card-capture",
    message: $("card-message"),
    use: scan,
  });
  $("redeem-points").addEventListener("input", renderAttached);
  renderAttached();
}

function togglePanel(open) {
  const panel = $("card-panel");
  panel.hidden = open === undefined ? !panel.hidden : !open;
  $("card-open").setAttribute("aria-expanded", String(!panel.hidden));
  if (!panel.hidden) $("card-input").focus();
}

/** Puts a card's QR text in the slot and looks it up (from the loyalty screen's new card). */
export function useCard(text) {
  togglePanel(true);
  $("card-input").value = text;
  return lookup();
}

async function scan(blob, type) {
  say($("card-message"), "Reading the card…");
  try {
    const data = await api("/api/v1/loyalty/scan", { method: "POST", bytes: blob, type: type || "image/jpeg" });
    $("card-input").value = data.qr_text;
    await lookup();
  } catch (err) {
    const message =
      err instanceof ApiError && err.code === "no_qr_code"
        ? "No card code found in that photo: hold the card closer, or type its code."
        : describeError(err);
    say($("card-message"), message, "error");
  }
}

async function lookup() {
  const text = $("card-input").value.trim();
  if (!text) {
    say($("card-message"), "Type, paste or scan the card's code (SMC1:…).", "error");
    return false;
  }
  try {
    const view = await api(`/api/v1/loyalty/cards/${encodeURIComponent(text)}`);
    looked = { text, view };
    renderLooked();
    say($("card-message"), "");
    return true;
  } catch (err) {
    looked = null;
    renderLooked();
    say($("card-message"), describeError(err), "error");
    return false;
  }
}

function renderLooked() {
  const v = looked?.view;
  $("card-balance").textContent = v ? String(v.balance_points) : "—";
  $("card-details").textContent = v
    ? `Card ${v.id} · ${v.held_here} points here, ${v.held_reachable} reachable · offline allowance ${v.offline_budget_left}` +
      (v.exposure ? ` · ${v.exposure.units} points spent twice` : "")
    : "";
}

async function attach() {
  const text = $("card-input").value.trim();
  if (looked?.text !== text && !(await lookup())) return;
  attached = { text: looked.text, id: looked.view.id };
  renderAttached();
}

function detach() {
  attached = null;
  $("redeem-points").value = "0";
  renderAttached();
}

function renderAttached() {
  const status = $("card-status");
  status.textContent = attached
    ? `Card ${shortId(attached.id)} on this sale` + (redeemPoints() ? `, redeeming ${redeemPoints()} points` : "")
    : "";
  status.hidden = !attached;
  $("card-detach").hidden = !attached;
}

function redeemPoints() {
  const n = Number.parseInt($("redeem-points").value || "0", 10);
  return Number.isFinite(n) && n > 0 ? n : 0;
}

/** The sale's `loyalty`, if a card is attached. */
export function saleLoyalty() {
  return attached ? { card: attached.text, redeem_points: redeemPoints() } : null;
}

/** A sale went through: the card leaves the till, its balance is looked up again. */
export function afterSale() {
  if (!attached) return;
  detach();
  if (looked) lookup();
}

/** Something in loyalty changed (a commit): refresh the balance shown. */
export function refreshCard() {
  if (looked && $("card-input").value.trim() === looked.text) lookup();
}
