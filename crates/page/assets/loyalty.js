// Loyalty: issue a card, vouchers (mint, list, redeem) and what was spent twice.

import { api, byTestId, describeError, el, fill, money, say, shortId } from "/api.js";
import { currency } from "/store.js";
import { useCard } from "/card.js";

const $ = (id) => byTestId(id);

export function initLoyalty() {
  $("card-issue").addEventListener("click", issueCard);
  $("mint-form").addEventListener("submit", (e) => {
    e.preventDefault();
    mint();
  });
}

export function showLoyalty() {
  return Promise.all([loadVouchers(), loadExposures()]).catch((err) => say($("loyalty-message"), describeError(err), "error"));
}

async function issueCard() {
  const button = $("card-issue");
  button.disabled = true;
  try {
    const card = await api("/api/v1/loyalty/cards", { method: "POST", json: {} });
    // The QR code is the server's SVG, shown as an image so nothing in it can run.
    const qr = el("img", { class: "qr", alt: `QR code of card ${card.id}`, src: `data:image/svg+xml;charset=utf-8,${encodeURIComponent(card.qr_svg)}` });
    $("issued-card").replaceChildren(
      qr,
      el(
        "div",
        {},
        el("p", {}, "Card ", el("code", { testid: "issued-card-id", text: card.id })),
        el("p", {}, el("code", { testid: "issued-card-text", class: "qr-text", text: card.qr_text })),
        el("button", {
          type: "button",
          testid: "issued-card-use",
          class: "primary",
          text: "Use on this sale",
          onclick: () => {
            location.hash = "#till";
            useCard(card.qr_text);
          },
        }),
      ),
    );
    $("issued-card").hidden = false;
    say($("loyalty-message"), "");
  } catch (err) {
    say($("loyalty-message"), describeError(err), "error");
  } finally {
    button.disabled = false;
  }
}

async function loadVouchers() {
  const { vouchers } = await api("/api/v1/loyalty/vouchers");
  $("vouchers").replaceChildren(...vouchers.map(voucher));
  $("vouchers-empty").hidden = vouchers.length > 0;
}

function voucher(v) {
  return el(
    "li",
    { testid: "voucher", "data-voucher-id": v.id, "data-status": v.status, class: `voucher ${v.status}` },
    el("span", { class: "name", text: v.label }),
    el("span", { class: "num", text: money(v.value_cents, currency()) }),
    el("span", { class: "status", testid: "voucher-status", text: v.status }),
    el("span", { class: "muted", text: v.held_by.length ? `held by ${v.held_by.map(shortId).join(", ")}` : "" }),
    el("button", {
      type: "button",
      testid: "voucher-redeem",
      disabled: v.status !== "open",
      text: "Redeem",
      onclick: (e) => redeem(v, e.currentTarget),
    }),
  );
}

async function redeem(v, button) {
  button.disabled = true;
  try {
    const after = await api(`/api/v1/loyalty/vouchers/${encodeURIComponent(v.id)}/redeem`, { method: "POST", json: {} });
    const proven = after.redemptions.some((r) => r.proven);
    say($("loyalty-message"), `Redeemed “${v.label}”${proven ? "" : " (offline, without proof)"}.`);
  } catch (err) {
    say($("loyalty-message"), describeError(err), "error");
  }
  await showLoyalty();
}

/** "2.50" or "2,50" in the market's currency → cents. */
function cents(text) {
  const n = Number.parseFloat(String(text).replace(",", "."));
  return Number.isFinite(n) && n >= 0 ? Math.round(n * 100) : null;
}

async function mint() {
  const label = $("mint-label").value.trim();
  const value = cents($("mint-value").value || "0");
  const count = Number.parseInt($("mint-count").value || "1", 10);
  if (!label || value === null || !(count >= 1)) {
    say($("loyalty-message"), "Give the voucher a label, a value and a count of at least 1.", "error");
    return;
  }
  const button = $("mint-submit");
  button.disabled = true;
  try {
    const body = { label, value_cents: value };
    if (count > 1) body.count = count;
    const { vouchers } = await api("/api/v1/loyalty/vouchers", { method: "POST", json: body });
    say($("loyalty-message"), `Minted ${vouchers.length} voucher${vouchers.length === 1 ? "" : "s"}.`);
    $("mint-label").value = "";
    await loadVouchers();
  } catch (err) {
    say($("loyalty-message"), describeError(err), "error");
  } finally {
    button.disabled = false;
  }
}

async function loadExposures() {
  const list = await api("/api/v1/loyalty/exposures");
  const items = list.exposures.map((x) =>
    el(
      "li",
      { "data-asset": x.asset, "data-id": x.id },
      `${x.asset === "points" ? "Card" : "Voucher"} ${x.id}: ${x.units} ${x.asset === "points" ? "points" : "extra redemptions"} over ${x.redemptions} redemptions`,
    ),
  );
  fill($("exposures"), 
    el("p", {
      text: list.exposures.length
        ? `Spent twice: ${list.points_exposed} points, ${list.vouchers_exposed} voucher redemptions.`
        : "Nothing spent twice.",
    }),
    items.length ? el("ul", {}, items) : null,
  );
}
