// Same-origin JSON API access and small DOM/format helpers shared by every screen.

export class ApiError extends Error {
  constructor(status, body) {
    super(body.message || body.error || `HTTP ${status}`);
    this.status = status;
    this.code = body.error || `http_${status}`;
    this.body = body;
  }
}

let signInRequired = () => {};

/** Called when any request answers 401 `sign_in_required`. */
export function onSignInRequired(fn) {
  signInRequired = fn;
}

/**
 * Fetches `path`; `json` is sent as a JSON body, `bytes` as a raw body of `type`.
 * Resolves to the parsed answer; rejects with ApiError (HTTP error) or TypeError (network).
 */
/** How long any request may take before it counts as a network error (a till must not hang). */
const REQUEST_TIMEOUT_MS = 10000;

export async function api(path, { method = "GET", json, bytes, type, timeoutMs = REQUEST_TIMEOUT_MS } = {}) {
  // A hung connection (Wi-Fi gone mid-request) ends as a network error the caller can retry.
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" }, signal: AbortSignal.timeout(timeoutMs) };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (bytes !== undefined) {
    init.body = bytes;
    init.headers["Content-Type"] = type || "application/octet-stream";
  }
  let res, text;
  try {
    res = await fetch(path, init);
    text = await res.text();
  } catch (err) {
    if (err && (err.name === "TimeoutError" || err.name === "AbortError")) throw new TypeError(`no answer within ${timeoutMs} ms`);
    throw err;
  }
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!res.ok) {
    const body = data && typeof data === "object" ? data : { error: `http_${res.status}`, message: text || res.statusText };
    const err = new ApiError(res.status, body);
    if (res.status === 401 && err.code === "sign_in_required") signInRequired();
    throw err;
  }
  return data;
}

/** A readable sentence for any failure of `api`. */
export function describeError(err) {
  if (err instanceof ApiError) return err.message;
  if (err instanceof TypeError) return "Cannot reach this tablet's node (network error).";
  return String(err && err.message ? err.message : err);
}

/**
 * Builds an element: `attrs` keys `testid`, `class`, `text`, `on<event>`, `data-*`, boolean or
 * string attributes, and `props` (assigned as properties). Children are nodes or strings (as text).
 */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElementNS(
    attrs.svg ? "http://www.w3.org/2000/svg" : "http://www.w3.org/1999/xhtml",
    tag,
  );
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false || key === "svg") continue;
    if (key === "testid") node.setAttribute("data-testid", value);
    else if (key === "text") node.textContent = value;
    else if (key === "props") Object.assign(node, value);
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(typeof child === "string" || typeof child === "number" ? String(child) : child);
  }
  return node;
}

export const svgEl = (tag, attrs = {}, ...children) => el(tag, { ...attrs, svg: true }, ...children);

/** Element by its data-testid (first match under `root`). */
export const byTestId = (id, root = document) => root.querySelector(`[data-testid="${id}"]`);

const formatters = new Map();

/** Integer cents as money in `currency` (ISO code), e.g. €12.50. */
export function money(cents, currency) {
  const code = currency || "EUR";
  let f = formatters.get(code);
  if (!f) {
    try {
      f = new Intl.NumberFormat(undefined, { style: "currency", currency: code });
    } catch {
      f = { format: (v) => `${v.toFixed(2)} ${code}` };
    }
    formatters.set(code, f);
  }
  return f.format((cents || 0) / 100);
}

export const shortId = (hex) => (hex || "").slice(0, 8);

export function time(ms) {
  return new Date(ms).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function percent(x, digits = 1) {
  return x === null || x === undefined ? "—" : `${(x * 100).toFixed(digits)}%`;
}

/** Shows `message` in `node` (hidden when empty), with `kind` as a class (ok/error). */
export function say(node, message, kind = "ok") {
  node.textContent = message || "";
  node.hidden = !message;
  node.classList.toggle("error", kind === "error");
  node.classList.toggle("ok", kind !== "error");
}

export function debounce(fn, ms) {
  let timer = 0;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

/** Replaces `node`'s children, skipping null/false/undefined (conditional parts). */
export function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}
