//! The POS page, served by the node the way Syncthing serves its own GUI: every file is embedded
//! in the binary at build time, nothing is fetched from outside, and nothing needs building (plain
//! JavaScript modules). `router()` serves `/` and each asset by name.
//!
//! Architecture invariant: the page's Content-Security-Policy allows only this origin (plus `blob:`
//! and `data:` images for camera frames), so a page that tried to load a script, font or style from
//! elsewhere would fail in the browser, not silently depend on the internet.

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use include_dir::{include_dir, Dir};
use sha2::{Digest, Sha256};

static ASSETS: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/assets");

/// Largest total of the page's files: first load stays well under the 300 KB (gzipped)
/// even uncompressed, on a tablet's Wi-Fi.
pub const MAX_PAGE_BYTES: usize = 300 * 1024;

/// Only this origin: scripts, styles, fetches and the event stream; camera frames are `blob:`.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; \
     media-src 'self' blob:; connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

/// One embedded file.
pub struct Asset {
    pub name: &'static str,
    pub bytes: &'static [u8],
    pub content_type: &'static str,
}

/// Every file of the page, by name (a flat folder).
pub fn assets() -> impl Iterator<Item = Asset> {
    ASSETS.files().filter_map(|f| {
        let name = f.path().to_str()?;
        Some(Asset { name, bytes: f.contents(), content_type: content_type(name)? })
    })
}

/// The sum of every file's size: what a first load transfers at most.
pub fn total_bytes() -> usize {
    assets().map(|a| a.bytes.len()).sum()
}

fn content_type(name: &str) -> Option<&'static str> {
    Some(match name.rsplit_once('.')?.1 {
        "html" => "text/html; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "json" => "application/json",
        _ => return None,
    })
}

/// `/` (the page) and `/{asset}`. Merged into the node's router; API paths are more specific.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/", get(|headers: HeaderMap| async move { serve("index.html", &headers) })).route(
        "/{asset}",
        get(|Path(name): Path<String>, headers: HeaderMap| async move { serve(&name, &headers) }),
    )
}

fn serve(name: &str, request: &HeaderMap) -> Response {
    let Some(asset) = assets().find(|a| a.name == name) else {
        return (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "no such file").into_response();
    };
    // The content's hash: a tablet revalidates (one small request) instead of re-downloading, and
    // an upgraded node's new files are never mixed with cached old ones.
    let etag = format!("\"{}\"", hex::encode(&Sha256::digest(asset.bytes)[..12]));
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::ETAG, HeaderValue::from_str(&etag).expect("hex is a valid header value"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if request.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    (headers, asset.bytes).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_complete_and_within_its_size_budget() {
        let names: Vec<&str> = assets().map(|a| a.name).collect();
        for needed in ["index.html", "app.js", "style.css"] {
            assert!(names.contains(&needed), "{needed} is embedded: {names:?}");
        }
        assert!(total_bytes() <= MAX_PAGE_BYTES, "{} bytes > {MAX_PAGE_BYTES}", total_bytes());
        // Every file in the folder is one the node can serve with a type.
        assert_eq!(include_dir::Dir::files(&ASSETS).count(), names.len(), "an asset of unknown type: {names:?}");
    }

    #[test]
    fn nothing_is_loaded_from_outside_the_node() {
        for a in assets() {
            let text = String::from_utf8_lossy(a.bytes);
            // XML namespaces are names, not addresses anything is fetched from.
            let text = text.replace("http://www.w3.org/2000/svg", "").replace("http://www.w3.org/1999/xhtml", "");
            for outside in ["http://", "https://", "//fonts.", "//cdn"] {
                assert!(!text.contains(outside), "{} refers to {outside}…", a.name);
            }
        }
    }
}
