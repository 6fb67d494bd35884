//! Staff sessions (`/api/v1/session`) and the guard every request passes: no cross-site writes,
//! and, when sign-in is required, no API call without a signed-in staff member.
//!
//! Architecture invariant: the session token travels only as an HttpOnly, SameSite=Strict cookie;
//! a request from another site is refused before any handler runs, whatever it carries.

use super::{ApiError, ApiResult, AppState};
use crate::runtime::now_ms;
use crate::staff::{Sessions, StaffBook, StaffError, SESSION_TTL_MS};
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use stallmesh_api::till::{SessionView, SignInRequest, SignedInView};
use std::net::SocketAddr;
use std::sync::Arc;

pub const SESSION_COOKIE: &str = "stallmesh_session";

/// The node's staff desk: its book, its sessions, and whether sign-in is required.
pub struct StaffDesk {
    pub book: StaffBook,
    pub sessions: Sessions,
    pub required: bool,
}

pub type Desk = Arc<StaffDesk>;

/// The staff member a request was made by (put there by [`guard`]).
#[derive(Debug, Clone)]
pub struct SignedIn(pub String);

fn session_token(headers: &HeaderMap) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        (name == SESSION_COOKIE && !value.is_empty()).then(|| value.to_string())
    })
}

/// Refuses a write another site's page made the browser send: the session cookie is SameSite=Strict
/// already, and this also covers a node that asks for no sign-in (on loopback).
fn same_origin(method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let refused = |why: String| Err(ApiError::new(StatusCode::FORBIDDEN, "cross_site_request", why));
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if site != "same-origin" && site != "none" {
            return refused(format!("a {site} request may not change anything here"));
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
        let origin_host = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")).unwrap_or(origin);
        if host.is_empty() || origin_host != host {
            return refused(format!("a request from {origin} may not change anything on {host}"));
        }
    }
    Ok(())
}

/// Refuses a request whose Host is a DNS name other than `localhost` or an mDNS `.local` name: a
/// web page that re-points its own domain at this node (DNS rebinding) would otherwise pass as
/// same-origin. Tablets are reached by address or by their `.local` name.
fn known_host(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else { return Ok(()) };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(':') => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let known = name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".local");
    if known {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::FORBIDDEN, "unknown_host", format!("this node answers to its address or its .local name, not {name:?}")))
    }
}

/// Every request: unknown Host names and cross-site writes refused; with sign-in required, API calls
/// need a session — except a non-browser client on this device itself (its own CLI), trusted as a
/// loopback-only node is. A browser (it sends Origin or Sec-Fetch-*) always needs the session, so a
/// proxy or tunnel on the tablet forwarding LAN traffic does not switch sign-in off.
pub(super) async fn guard(State(app): State<AppState>, mut request: Request, next: Next) -> Response {
    if let Err(e) = known_host(request.headers()).and_then(|()| same_origin(request.method(), request.headers())) {
        return e.into_response();
    }
    let staff = session_token(request.headers()).and_then(|t| app.staff.sessions.staff_of(&t, now_ms()));
    let path = request.uri().path();
    let from_browser = request.headers().contains_key(header::ORIGIN) || request.headers().contains_key("sec-fetch-site");
    let from_this_device = !from_browser
        && request.extensions().get::<ConnectInfo<SocketAddr>>().is_some_and(|ConnectInfo(peer)| peer.ip().to_canonical().is_loopback());
    let needs_session = app.staff.required && path.starts_with("/api/") && path != "/api/v1/session" && !from_this_device;
    match staff {
        Some(s) => {
            request.extensions_mut().insert(SignedIn(s));
        }
        None if needs_session => {
            return ApiError::new(StatusCode::UNAUTHORIZED, "sign_in_required", "sign in with your staff name and PIN").into_response();
        }
        None => {}
    }
    next.run(request).await
}

/// `GET /api/v1/session`.
#[utoipa::path(get, path = "/api/v1/session", tag = "session", responses((status = 200, description = "Whether sign-in is required and who is signed in", body = stallmesh_api::till::SessionView)))]
pub(super) async fn show(State(app): State<AppState>, headers: HeaderMap) -> ApiResult<Json<SessionView>> {
    let staff = session_token(&headers).and_then(|t| app.staff.sessions.staff_of(&t, now_ms()));
    let staff_names = app.staff.book.names().map_err(staff_error)?;
    Ok(Json(SessionView { required: app.staff.required, signed_in: staff.is_some(), staff, staff_names }))
}

/// `POST /api/v1/session`: checks the PIN (off the executor: the hash is slow on purpose).
#[utoipa::path(post, path = "/api/v1/session", tag = "session", request_body = stallmesh_api::till::SignInRequest, responses((status = 201, description = "Signed in: the session is an HttpOnly cookie", body = stallmesh_api::till::SignedInView), (status = 429, description = "`too_many_attempts`: wait before trying again", body = stallmesh_api::ErrorBody)))]
pub(super) async fn sign_in(
    State(app): State<AppState>,
    client: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Result<Json<SignInRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, HeaderMap, Json<SignedInView>)> {
    let Json(req) = body?;
    let desk = app.staff.clone();
    let name = req.staff.clone();
    let client = client.map_or_else(|| "unknown".to_string(), |axum::Extension(ConnectInfo(a))| a.ip().to_canonical().to_string());
    let replaces = session_token(&headers);
    let token = tokio::task::spawn_blocking(move || desk.sessions.sign_in(&desk.book, &req.staff, &req.pin, &client, replaces.as_deref(), now_ms()))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let token = match token {
        Ok(t) => t,
        Err(e) => {
            let outcome = if matches!(e, StaffError::TooManyAttempts { .. }) { "locked" } else { "refused" };
            app.node.metrics.staff_sign_ins.get_or_create(&crate::metrics::Outcome { outcome }).inc();
            // Debug-formatted: a name from the request cannot forge log lines.
            tracing::warn!(staff = ?name.chars().take(crate::staff::MAX_STAFF_NAME_LEN).collect::<String>(), error = %e, "staff sign-in refused");
            return Err(staff_error(e));
        }
    };
    app.node.metrics.staff_sign_ins.get_or_create(&crate::metrics::Outcome { outcome: "signed_in" }).inc();
    tracing::info!(staff = %name, "staff signed in");
    let mut headers = HeaderMap::new();
    let cookie = format!("{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}", SESSION_TTL_MS / 1000);
    headers.insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).expect("hex token"));
    Ok((StatusCode::CREATED, headers, Json(SignedInView { staff: name, expires_in_ms: SESSION_TTL_MS })))
}

/// `DELETE /api/v1/session`.
#[utoipa::path(delete, path = "/api/v1/session", tag = "session", responses((status = 204, description = "Signed out (the cookie is cleared)")))]
pub(super) async fn sign_out(State(app): State<AppState>, headers: HeaderMap) -> (StatusCode, HeaderMap) {
    if let Some(t) = session_token(&headers) {
        app.staff.sessions.sign_out(&t);
    }
    let mut out = HeaderMap::new();
    let expired = format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    out.insert(header::SET_COOKIE, HeaderValue::from_str(&expired).expect("ascii"));
    (StatusCode::NO_CONTENT, out)
}

fn staff_error(e: StaffError) -> ApiError {
    let (status, code) = match &e {
        StaffError::WrongPin | StaffError::Unknown(_) => (StatusCode::UNAUTHORIZED, "wrong_pin"),
        StaffError::TooManyAttempts { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_attempts"),
        StaffError::BadName | StaffError::BadPin | StaffError::Full => (StatusCode::BAD_REQUEST, "invalid"),
        StaffError::File { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "staff_book_unreadable"),
    };
    ApiError::new(status, code, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn writes_from_another_site_are_refused_and_same_origin_ones_pass() {
        let post = Method::POST;
        assert!(same_origin(&post, &headers(&[("host", "10.0.0.2:7878"), ("origin", "http://10.0.0.2:7878")])).is_ok());
        assert!(same_origin(&post, &headers(&[("host", "10.0.0.2:7878")])).is_ok(), "curl and the CLI send no Origin");
        assert!(same_origin(&post, &headers(&[("host", "10.0.0.2:7878"), ("origin", "http://evil.example")])).is_err());
        assert!(same_origin(&post, &headers(&[("host", "127.0.0.1:7878"), ("origin", "http://127.0.0.1:8080")])).is_err());
        assert!(same_origin(&post, &headers(&[("host", "10.0.0.2:7878"), ("sec-fetch-site", "cross-site")])).is_err());
        assert!(same_origin(&post, &headers(&[("host", "10.0.0.2:7878"), ("sec-fetch-site", "same-site")])).is_err());
        assert!(same_origin(&Method::GET, &headers(&[("origin", "http://evil.example")])).is_ok(), "reads change nothing");
    }

    #[test]
    fn only_addresses_localhost_and_local_names_are_answered() {
        for host in ["10.0.0.2:7878", "127.0.0.1:7878", "[::1]:7878", "localhost:7878", "till-1.local:7878", "10.0.0.2"] {
            assert!(known_host(&headers(&[("host", host)])).is_ok(), "{host}");
        }
        for host in ["evil.example:7878", "rebind.attacker.net", "localhost.evil.example:7878"] {
            assert!(known_host(&headers(&[("host", host)])).is_err(), "{host}");
        }
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let h = headers(&[("cookie", "a=1; stallmesh_session=abc; b=2")]);
        assert_eq!(session_token(&h).as_deref(), Some("abc"));
        assert_eq!(session_token(&headers(&[("cookie", "stallmesh_session=")])), None);
    }
}
